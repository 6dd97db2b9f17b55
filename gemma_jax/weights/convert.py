"""`gemma-jax convert`: HF safetensors, Kaggle/DeepMind Flax or GGUF weights -> our native checkpoint.

    gemma-jax convert --from {hf,kaggle,gguf} SRC OUT [--dtype bfloat16|float32] [--variant 2b|7b]
                      [--quantize int8|w8a8|w8a8-embedding|q8_0]

Converting once means every later start is one orbax restore straight into the device sharding
(`weights/native.py`), whatever the weights came as. The tokenizer travels with the weights:
`tokenizer.model` from the HF directory, from beside the Kaggle checkpoint, or rebuilt from a GGUF's
own vocabulary. `--quantize int8` writes the int8 weight-only tree (`gemma_jax/quantize.py`; the
scales in --dtype, the compute dtype), `--quantize w8a8` the same arrays whose products run on int8
activations too, `--quantize w8a8-embedding` w8a8 for the embedding alone, `--quantize q8_0` every
weight in blocks of 32 with a scale each (for CPUs: our kernel's layout); config.json records
which. The output always carries a NOTICE (Gemma's weights are under the Gemma Terms of Use, which
a redistribution must pass on, and a converted copy is a modified file).

This module imports no JAX at import time, so `gemma-jax --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

FORMATS = ("hf", "kaggle", "gguf")
QUANTIZE = ("int8", "w8a8", "w8a8-embedding", "q8_0")  # gemma_jax.quantize.METHODS, without importing JAX here

GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"


def notice_for(source_format: str, src: str, quantize: str | None = None) -> str:
    """The NOTICE written with a converted checkpoint."""
    return (f"{GEMMA_NOTICE}\n\n"
            f"Modified files: converted by gemma-jax from the {source_format} checkpoint "
            f"{os.path.basename(os.path.normpath(src))} (tensors re-laid out for named-dimension einsums"
            f"{', vocabulary padding removed' if source_format == 'kaggle' else ''}"
            f"{', dequantized, norm weights without the +1' if source_format == 'gguf' else ''}"
            f"{_quantized_note(quantize)}).\n")


def _quantized_note(quantize: str | None) -> str:
    if not quantize:
        return ""
    which = "embedding" if quantize == "w8a8-embedding" else "projections and embedding"
    scales = "a scale per block of 32 weights" if quantize == "q8_0" else "per-channel scales"
    return f", {which} quantized to int8 with {scales}"


def load_source(source_format: str, src: str, dtype, variant: str | None = None):
    """(config, params, tokenizer_model_bytes | None) from weights in another format."""
    if source_format == "hf":
        from gemma_jax.weights.hf import load_hf

        config, params = load_hf(src, dtype)
        return config, params, _read_optional(os.path.join(src, "tokenizer.model"))
    if source_format == "kaggle":
        from gemma_jax.weights.kaggle import find_tokenizer, load_kaggle

        if variant is None:
            raise ValueError("--from kaggle needs --variant (2b or 7b): the model size is never guessed")
        config, params = load_kaggle(src, dtype=dtype, variant=variant)
        tok = find_tokenizer(src)
        return config, params, _read_optional(tok) if tok else None
    if source_format == "gguf":
        from gemma_jax.tokenizer import Tokenizer
        from gemma_jax.weights.gguf import load_gguf

        config, params = load_gguf(src, dtype=dtype)
        try:
            tokenizer = Tokenizer.from_gguf(src).sp.serialized_model_proto()
        except (ValueError, KeyError) as e:  # a GGUF without a sentencepiece vocabulary
            print(f"gemma-jax: no tokenizer written ({e})", file=sys.stderr)
            tokenizer = None
        return config, params, tokenizer
    raise ValueError(f"unknown source format {source_format!r}: expected one of {FORMATS}")


def convert(source_format: str, src: str | os.PathLike, out: str | os.PathLike, dtype="bfloat16",
            variant: str | None = None, overwrite: bool = False, notice: str | None = None,
            quantize: str | None = None) -> str:
    """Convert `src` into a native checkpoint at `out`. Returns the absolute output path.
    quantize: None, or "int8" to save the int8 weight-only tree (scales in `dtype`)."""
    src = os.fspath(src)
    if variant is not None and source_format != "kaggle":
        raise ValueError("--variant only applies to --from kaggle (HF and GGUF files carry their config)")
    if variant is None and source_format == "kaggle":
        raise ValueError("--from kaggle needs --variant (2b or 7b): the model size is never guessed")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} does not exist")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {QUANTIZE}, not {quantize!r}")

    import jax.numpy as jnp

    from gemma_jax.weights import native

    config, params, tokenizer = load_source(source_format, src, jnp.dtype(dtype), variant)
    if quantize is not None:
        from gemma_jax.quantize import quantize_params

        params = quantize_params(params, config, jnp.dtype(dtype), method=quantize)
    return native.save_checkpoint(out, config, params, tokenizer,
                                  notice if notice is not None else notice_for(source_format, src, quantize),
                                  overwrite=overwrite)


def _read_optional(path: str) -> bytes | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


# --- the subcommand ------------------------------------------------------------------------------
def add_convert_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert HF / Kaggle / GGUF weights into a native gemma-jax checkpoint",
        description="Convert Gemma weights into a native gemma-jax checkpoint directory (orbax params, "
                    "config.json, tokenizer.model, NOTICE) that restores straight into a device sharding.")
    p.add_argument("--from", dest="source_format", choices=FORMATS, required=True,
                   help="hf: a directory with config.json + *.safetensors; kaggle: a DeepMind Flax "
                        "(orbax) checkpoint directory; gguf: a .gguf file")
    p.add_argument("src", help="the weights to convert")
    p.add_argument("out", help="the checkpoint directory to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the saved parameters (default bfloat16)")
    p.add_argument("--variant", choices=("2b", "7b"),
                   help="model size of a Kaggle checkpoint (required with --from kaggle)")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="save int8 weights (scales in --dtype, the compute dtype; projections and "
                        "embedding take 1 byte per weight): int8, per-output-channel scales, weight-only; "
                        "w8a8, its products on int8 activations too; w8a8-embedding, w8a8 for the "
                        "embedding alone; q8_0, a scale per block of 32 weights (our CPU kernel's layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    p.add_argument("--notice", metavar="FILE", help="write this file as NOTICE instead of the default Gemma notice")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args) -> int:
    notice = None
    if args.notice:
        with open(args.notice, encoding="utf-8") as f:
            notice = f.read()
    try:
        path = convert(args.source_format, args.src, args.out, args.dtype, args.variant, args.overwrite, notice,
                       args.quantize)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"gemma-jax convert: {e}") from None
    print(f"gemma-jax: wrote {path}", file=sys.stderr)
    return 0
