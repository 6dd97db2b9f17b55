"""A cold start's compiles in a child process, so that the worker's GIL stays free to answer.

JAX writes each executable it compiles to the persistent cache (`gemma_jax.compilation_cache`), and
jaxlib serializes the executable while holding the GIL, so no HTTP thread of the worker runs
meanwhile (reading an executable back from the cache does not hold it; BENCHMARKS.md has the
stalls measured). So on a CPU, before the worker builds its engine, `precompile` runs the same
build and `warmup` in a spawned child, which fills the cache; the worker's own warmup then only
traces and reads. Progress reaches `/health` as the stage "precompiling" (the child's compiled /
total), then "compiling".

The child is skipped when a marker says an earlier child finished for the same start: the same
flags (but the HTTP side's: `_UNCOMPILED`), jax and jaxlib versions, platform, XLA_FLAGS and
gemma_jax / serving sources (`marker_key`). The marker is only a hint: an executable the cache lost
since is compiled by the worker itself. The caller runs it only for a single-host start with
warmup (the followers of a multi-host engine must make each call with the leader), and it runs no
child on an accelerator (the child would take the device the worker is about to use).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("serving.precompile")

# Flags that do not change what the engine compiles: the HTTP side (a token is never hashed into a
# file name). A flag missing here only costs a child run when it changes.
_UNCOMPILED = ("host", "port", "data_dir", "threads", "graceful_timeout", "log_level", "func", "api_token",
               "max_body_bytes", "max_upload_bytes", "max_queue", "model_name", "no_stream_padding",
               "protect_metrics", "request_timeout")
MARKER_DIR = "gemma-jax-precompiled"


def marker_key(args: argparse.Namespace) -> str:
    """A hex digest of what decides the executables a start compiles (module docstring)."""
    import jax
    import jaxlib

    import gemma_jax

    h = hashlib.sha256()
    flags = sorted((k, repr(v)) for k, v in vars(args).items() if k not in _UNCOMPILED)
    h.update(repr((flags, jax.__version__, jaxlib.__version__, jax.default_backend(), jax.device_count(),
                   os.environ.get("XLA_FLAGS", ""), sys.version_info[:2])).encode())
    for package in (Path(gemma_jax.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:32]


def precompile(args: argparse.Namespace, cache_dir: Path | None, report: Callable[[int, int], None],
               started: Callable[[], None] = lambda: None) -> bool:
    """Run `build_engine(args)` and its warmup in a spawned child that writes `cache_dir` (JAX's
    persistent cache), unless the marker says it was done (module docstring); for a single-host
    start with warmup. started() once a child is started, report(compiled, total) as it compiles.
    Returns whether a child ran and finished; a child that fails is logged and the caller compiles
    in-process as usual."""
    import jax

    if cache_dir is None or jax.default_backend() != "cpu":
        return False
    marker = Path(cache_dir) / MARKER_DIR / marker_key(args)
    if marker.exists():
        return False
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(args, str(cache_dir), theirs, os.getpid()), daemon=True,
                        name="gemma-jax-precompile")
    try:
        child.start()
    except OSError as e:  # no process to spare (limits, memory): the worker compiles
        log.warning("could not start a process to precompile in (%s); compiling here instead", e)
        return False
    started()
    theirs.close()
    done = False
    try:
        while True:
            try:
                message = ours.recv()
            except EOFError:
                break
            if message == "done":
                done = True
            else:
                report(*message)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    if not done or child.exitcode != 0:
        log.warning("precompiling in a child process failed (exit code %s); compiling here instead", child.exitcode)
        return False
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as e:  # a read-only cache: the next start precompiles again, nothing else lost
        log.warning("could not write the precompile marker %s (%s)", marker, e)
    return True


def _child(args: argparse.Namespace, cache_dir: str, conn, parent: int) -> None:
    """The spawned child: the worker's build and warmup, into the same persistent cache."""
    from serving.server import configure_logging

    configure_logging("warning")  # the worker says what the start does; the child only what goes wrong
    from gemma_jax import compilation_cache
    from serving.factory import build_engine

    compilation_cache.enable(cache_dir)
    engine, _ = build_engine(args)

    def progress(done: int, total: int) -> None:
        if os.getppid() != parent:  # the worker is gone: stop compiling for nobody
            os._exit(1)
        conn.send((done, total))

    engine.warmup(progress=progress)
    conn.send("done")
    conn.close()
