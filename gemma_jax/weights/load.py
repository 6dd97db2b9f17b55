"""One entry point for "give me a model": (config, params, tokenizer) from whatever the user has.

A native checkpoint directory (`gemma-jax convert`), a .gguf file, or nothing (the embedded Gemma 3
270M, converted once into the cache directory). Used by `gemma-jax generate`, `gemma-jax serve`
and `gemma_jax.load()`. Each format's loader is imported only when it is needed. With
`quantize="int8"` the weights are quantized once loaded (`gemma_jax/quantize.py`), whatever their
source; a checkpoint saved quantized (`convert --quantize int8`) loads quantized either way.
`serve` and `generate` take `--quantize auto` by default (`resolve_quantize`): "q8_0" for the
embedded model computing in float32 on a CPU, the weights as loaded otherwise.

With a mesh, every array goes straight onto its final placement (`params.param_shardings`, what
`Engine` runs on): a native checkpoint restores into it, each device reading its own shard; a GGUF
tensor is converted on the host and put onto its shards as it is read (quantized there too). No
device ever holds the whole model, so a model larger than one chip loads onto a mesh of them. The
mesh depends on the config (`mesh_flag.build_mesh`): `read_config` gives it without loading weights.
"""

from __future__ import annotations

QUANTIZE_CHOICES = ("auto", "none", "int8", "w8a8", "w8a8-embedding", "q8_0")  # --quantize; quantize.METHODS + 2
CPU_DEFAULT = "q8_0"  # auto's method for the embedded model on a CPU, where its kernel builds
CPU_FALLBACK = "w8a8-embedding"  # auto's method there when it does not (`cpu_kernel.available`)


def resolve_quantize(flag: str | None, *, embedded: bool, dtype) -> str | None:
    """--quantize's value -> a method (`quantize.METHODS`) or None (the weights as loaded).

    "auto" (the default of `serve` and `generate`) is `CPU_DEFAULT` when the model is the embedded
    Gemma 3 270M (`embedded`), computing in float32, on a CPU backend: every weight int8 in blocks
    of 32, multiplied by our CPU kernel, the format whose quality against float32 is measured to
    hold (teacher-forced top-1 >= 99% over 1,025 greedy steps, `benchmarks/quantize_quality.py`)
    and that decodes fastest on a CPU (`benchmarks/cpu_vs_llamacpp.py`; both in BENCHMARKS.md).
    Where the kernel cannot be built (no C++ compiler: `cpu_kernel.available()`), `CPU_FALLBACK`:
    the tied embedding as w8a8, the layers float. Any other model, dtype or backend: None, as
    "none" always is; a method name is itself."""
    if flag in (None, "none"):
        return None
    if flag == "auto":
        import jax
        import jax.numpy as jnp

        if not (embedded and jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32):
            return None
        from gemma_jax import cpu_kernel

        return CPU_DEFAULT if cpu_kernel.available() else CPU_FALLBACK
    if flag not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {QUANTIZE_CHOICES}, not {flag!r}")
    return flag


def read_config(checkpoint: str | None = None):
    """The config `load_parts(checkpoint)` returns, read without loading any weights (config.json,
    a GGUF header, or the embedded checkpoint's, converted first if needed)."""
    if checkpoint is None:
        from gemma_jax.embedded import read_embedded_config

        return read_embedded_config()
    if str(checkpoint).endswith(".gguf"):
        from gemma_jax.weights import gguf

        return gguf.read_config(checkpoint)
    from gemma_jax.weights import native

    return native.read_config(checkpoint)


def load_parts(checkpoint: str | None = None, dtype="float32", quantize: str | None = None, *, mesh=None):
    """(config, params, tokenizer) from a native checkpoint directory, a .gguf file, or (None) the
    embedded Gemma 3 270M. ValueError if a checkpoint has no tokenizer. quantize: None, or a method
    (`quantize.METHODS`: "int8", "w8a8", "w8a8-embedding", "q8_0"; weights quantized with their scales in
    `dtype`, the compute dtype; `resolve_quantize` turns a flag into one). mesh: each array placed by
    `params.param_shardings` on it as it loads (None: the first device)."""
    import jax.numpy as jnp

    from gemma_jax import params as P

    dtype = jnp.dtype(dtype)
    config, params, tokenizer = _load(checkpoint, dtype, quantize, mesh)
    if quantize is not None and not P.is_quantized(params):  # a float checkpoint: quantized leaf by leaf
        params = P.place_params(params, config, mesh, dtype, quantize)
    return config, params, tokenizer


def _load(checkpoint: str | None, dtype, quantize: str | None, mesh):
    from gemma_jax.tokenizer import Tokenizer

    if checkpoint is None:
        from gemma_jax.embedded import load_embedded

        return load_embedded(dtype=dtype, mesh=mesh)
    if str(checkpoint).endswith(".gguf"):
        from gemma_jax.weights.gguf import load_gguf

        config, params = load_gguf(checkpoint, dtype=dtype, mesh=mesh, quantize=quantize)
        return config, params, Tokenizer.from_gguf(checkpoint)
    from gemma_jax.weights import native

    config, params, proto = native.load_checkpoint(checkpoint, dtype=dtype, mesh=mesh)
    if proto is None:
        raise ValueError(f"{checkpoint} has no tokenizer.model; cannot turn text into tokens")
    return config, params, Tokenizer.from_model_proto(proto)
