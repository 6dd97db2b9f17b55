"""JAX's persistent compilation cache, kept in the gemma-jax cache directory.

Every prefill / generate shape the engine compiles costs compile time at each start of the
server. With the cache on, XLA executables are written to disk keyed on the HLO, the
compile options, the backend and the jax / jaxlib versions, and a restarted server loads them
instead of compiling again. Nothing else changes: a key that misses compiles as before.

`enable()` sets, through `jax.config` (names present in jax 0.10 and 0.11):

- `jax_enable_compilation_cache` and `jax_compilation_cache_dir`: on, in `cache_dir`;
- `jax_persistent_cache_min_compile_time_secs = 0` and `jax_persistent_cache_min_entry_size_bytes
  = -1` (no size limit, and no override by jax): cache every executable. jax's default skips
  compiles under 1 s, which is most CPU compiles and the small helpers around the model;

then resets jax's cache handle: jax opens the cache once per process, so without the reset a
cache already opened in another directory, or found disabled by an earlier compile, would stay so.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

from gemma_jax.embedded_gguf import cache_dir as _gemma_cache_dir

CACHE_SUBDIR = "jax-cache"


def default_dir() -> Path:
    """`jax-cache` inside the gemma-jax cache directory (`$GEMMA_JAX_CACHE`, ...)."""
    return _gemma_cache_dir() / CACHE_SUBDIR


def enable(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `cache_dir` (created); returns its path.

    Call it before the first jit you want cached; calling it again with another directory moves
    the cache there for the compiles that follow.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _jax_cache.reset_cache()
    return path
