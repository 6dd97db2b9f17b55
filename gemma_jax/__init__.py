"""gemma-jax: Gemma in JAX/Flax behind the Workers AI text-generation API.

The notebook API is importable from the top (loaded lazily, so `import gemma_jax` stays cheap):

    model = gemma_jax.load()                      # the embedded Gemma 3 270M
    gemma_jax.generate(model, ["The capital of France is"], max_tokens=16, temperature=0)
    gemma_jax.stream(model, "Once upon a time", seed=7)
    gemma_jax.logits(model, "The capital of France is")
"""

_NOTEBOOK = ("Model", "load", "generate", "stream", "logits", "encode")

__all__ = list(_NOTEBOOK)


def __getattr__(name):
    if name in _NOTEBOOK:
        from gemma_jax import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'gemma_jax' has no attribute {name!r}")
