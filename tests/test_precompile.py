"""A cold start compiles in a child process (`serving.precompile`), the worker then reads the cache.

`test_startup.py` shows what it is for (`/health` within 100 ms while a cold cache fills); here,
each run is a fresh process doing what `factory.build_backend` does on a CPU: `precompile` into a
fresh cache directory, then build the engine and warm it up in-process, counting jax's persistent
cache hits and misses (`jax.monitoring`) over the in-process part; and a child whose build fails
leaves the start to the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from serving import precompile
from serving.cli import add_serve_arguments

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--random-weights", "tiny_gemma3_short", "--max-batch", "2", "--lora-slots", "0"]

WORKER = textwrap.dedent(
    """
    import argparse, json, sys
    from jax import monitoring

    events = []
    monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    from gemma_jax import compilation_cache
    from serving import precompile
    from serving.cli import add_serve_arguments
    from serving.factory import build_engine

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(json.loads(sys.argv[2]))
    cache = compilation_cache.enable(sys.argv[1])
    reports = []
    ran = precompile.precompile(args, cache, lambda done, total: reports.append((done, total)))
    events.clear()
    engine, _ = build_engine(args)
    engine.warmup()
    print(json.dumps({"ran": ran, "reports": reports, "marker": precompile.marker_key(args),
                      "compiles": sum(engine.compile_counts().values()),
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
    """
)


def run_worker(cache: Path, port: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", WORKER, str(cache), json.dumps([*FLAGS, "--port", str(port)])],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(*extra: str) -> argparse.Namespace:
    return add_serve_arguments(argparse.ArgumentParser()).parse_args([*FLAGS, *extra])


def test_the_marker_names_what_is_compiled(monkeypatch):
    key = precompile.marker_key(parse())
    # where the server listens, keeps files and its token: the same executables
    assert precompile.marker_key(parse("--port", "9", "--host", "0.0.0.0", "--data-dir", "/x",
                                       "--api-token", "t", "--threads", "3")) == key
    assert precompile.marker_key(parse("--max-batch", "4")) != key
    assert precompile.marker_key(parse("--quantize", "w8a8")) != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert precompile.marker_key(parse()) != key


def test_a_cold_start_compiles_in_a_child_and_the_worker_only_reads(tmp_path):
    cache = tmp_path / "jax-cache"
    first = run_worker(cache, 8081)
    assert first["ran"]
    reports = first["reports"]
    total = reports[-1][1]
    assert reports[0][0] < total and reports[-1] == [total, total] and total == first["compiles"] >= 4
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert (cache / precompile.MARKER_DIR / first["marker"]).exists()
    # every executable of the worker's own build and warmup came from the child's cache
    assert first["misses"] == 0 and first["hits"] >= first["compiles"], first

    second = run_worker(cache, 8082)  # another port: the marker says it was done, no child
    assert not second["ran"] and second["reports"] == [] and second["marker"] == first["marker"]
    assert second["misses"] == 0 and second["hits"] >= second["compiles"], second


def test_a_child_that_fails_leaves_the_start_to_the_worker(tmp_path, caplog):
    """The child's build fails (an unknown config): no marker, and the caller is told to compile
    itself (where the same error then says what is wrong)."""
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--random-weights", "no_such_config"])
    reports, started = [], []
    with caplog.at_level("WARNING", logger="serving.precompile"):
        ran = precompile.precompile(args, tmp_path, lambda *r: reports.append(r), started=lambda: started.append(1))
    assert ran is False and started == [1] and reports == []
    assert not (tmp_path / precompile.MARKER_DIR).exists()
    assert "precompiling in a child process failed (exit code 1)" in caplog.text
