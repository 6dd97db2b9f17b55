"""One entry point for "give me a model": (config, params, tokenizer) from whatever the user has.

A native checkpoint directory (`gemma-jax convert`), a .gguf file, or nothing (the embedded Gemma 3
270M, converted once into the cache directory). Used by `gemma-jax generate`, `gemma-jax serve`
and `gemma_jax.load()`. Each format's loader is imported only when it is needed. With
`quantize="int8"` the weights are quantized once loaded (`gemma_jax/quantize.py`), whatever their
source; a checkpoint saved quantized (`convert --quantize int8`) loads quantized either way.
"""

from __future__ import annotations


def load_parts(checkpoint: str | None = None, dtype="float32", quantize: str | None = None):
    """(config, params, tokenizer) from a native checkpoint directory, a .gguf file, or (None) the
    embedded Gemma 3 270M. ValueError if a checkpoint has no tokenizer. quantize: None, or "int8"
    (weights quantized with their scales in `dtype`, the compute dtype)."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    config, params, tokenizer = _load(checkpoint, dtype)
    if quantize is not None:
        from gemma_jax.quantize import quantize_params

        params = quantize_params(params, config, dtype, method=quantize)
    return config, params, tokenizer


def _load(checkpoint: str | None, dtype):
    from gemma_jax.tokenizer import Tokenizer

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
