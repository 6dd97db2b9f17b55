"""The persistent compilation cache survives a restart: a second process loads, not compiles.

Each run is a fresh Python process (jax keeps an in-memory cache per process, so only a new
process shows the disk cache at work). jax reports `/jax/compilation_cache/cache_hits` and
`cache_misses` through `jax.monitoring`; the child counts them around one jit call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gemma_jax import compilation_cache

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from gemma_jax import compilation_cache

    events = []
    monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    jax.config.update("jax_enable_compilation_cache", False)  # jax finds the cache off at a first compile
    jax.jit(lambda x: x - 1)(jnp.ones(3)).block_until_ready()
    path = compilation_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)

    x = jnp.arange(64.0).reshape(8, 8)
    x.block_until_ready()
    events.clear()
    y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(axis=0) * 3.0)(x)
    print(json.dumps({
        "path": str(path),
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "misses": events.count("/jax/compilation_cache/cache_misses"),
        "y": y.tolist(),
    }))
    """
)


def run_child(env_cache: Path, *args: str) -> dict:
    env = {**os.environ, "GEMMA_JAX_CACHE": str(env_cache), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def entries(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_default_dir_is_in_the_gemma_jax_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path / "gj"))
    assert compilation_cache.default_dir() == tmp_path / "gj" / "jax-cache"


def test_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "gemma-jax" / "jax-cache"
    first = run_child(tmp_path / "gemma-jax")  # enable() with no argument: $GEMMA_JAX_CACHE/jax-cache
    assert Path(first["path"]) == cache.resolve()
    assert first["misses"] >= 1 and first["hits"] == 0
    written = entries(cache)
    assert written  # the executables are on disk

    second = run_child(tmp_path / "elsewhere", str(cache))  # the same directory, given explicitly
    assert second["hits"] >= 1 and second["misses"] == 0
    assert entries(cache) == written  # nothing recompiled, nothing rewritten
    assert second["y"] == first["y"]

    other = run_child(tmp_path / "elsewhere", str(tmp_path / "empty"))  # a new directory compiles again
    assert other["misses"] >= 1 and other["hits"] == 0
    assert other["y"] == first["y"]
