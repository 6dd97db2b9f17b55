"""One entry point for "give me a model": (config, params, tokenizer) from whatever the user has.

A native checkpoint directory (`gemma-jax convert`), a .gguf file, or nothing (the embedded Gemma 3
270M, converted once into the cache directory). Used by `gemma-jax generate`, `gemma-jax serve`
and `gemma_jax.load()`. Each format's loader is imported only when it is needed.
"""

from __future__ import annotations


def load_parts(checkpoint: str | None = None, dtype="float32"):
    """(config, params, tokenizer) from a native checkpoint directory, a .gguf file, or (None) the
    embedded Gemma 3 270M. ValueError if a checkpoint has no tokenizer."""
    import jax.numpy as jnp

    from gemma_jax.tokenizer import Tokenizer

    dtype = jnp.dtype(dtype)
    if checkpoint is None:
        from gemma_jax.embedded import load_embedded

        return load_embedded(dtype=dtype)
    if str(checkpoint).endswith(".gguf"):
        from gemma_jax.weights.gguf import load_gguf

        config, params = load_gguf(checkpoint, dtype=dtype)
        return config, params, Tokenizer.from_gguf(checkpoint)
    from gemma_jax.weights import native

    config, params, proto = native.load_checkpoint(checkpoint, dtype=dtype)
    if proto is None:
        raise ValueError(f"{checkpoint} has no tokenizer.model; cannot turn text into tokens")
    return config, params, Tokenizer.from_model_proto(proto)
