"""Running the app under gunicorn: one worker process that owns the device, many threads.

Why one worker: the model, its caches and the scheduler thread live on one accelerator; a second
worker process would load a second copy (or fight over the device). Concurrency comes from the
`gthread` worker's threads, which only wait on the scheduler's queues. The app (and the model) is
built inside the worker after the fork (`load()` runs there, never `preload_app`), so the master
process never imports jax or touches the device.

Slow clients: the worker class is `serving.worker.PacedThreadWorker`, gthread with request heads and
small bodies read in its event loop, so clients that trickle bytes hold no thread (see its docstring
for the exact rules and RELIABILITY.md for what tests/test_slowloris.py measures).

Life cycle: the master binds the socket; the worker answers from its first second
(`serving.startup.Starting`: `/health` 503 `{"status": "warming", ...}` with the stage and the
executables compiled so far, every other route 503 / 3040 with Retry-After) while a thread calls
`backend_factory()` (which loads the model and compiles every bucket: `warmup`), starts the
scheduler and builds the app; then it logs one readiness line (`gemma-jax ready: ...`) and every
request goes to the app. If that thread fails, the worker logs why and exits as a worker that could
not boot, so the master exits non-zero. The event loop runs throughout, so `worker_timeout` bounds a
stuck event loop, not a long compile. On SIGTERM gunicorn stops accepting, lets in-flight requests
finish for `graceful_timeout` seconds, then the worker's exit hook stops the scheduler
(`backend.stop()`) and logs `gemma-jax stopped`; the master exits 0.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from gunicorn.app.base import BaseApplication

from serving import startup
from serving import worker as worker_lib
from serving.backend import Backend

log = logging.getLogger("serving.server")

_worker_backend: list[Backend] = []  # the worker's backend, for the exit hook


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _GunicornApp(BaseApplication):
    def __init__(self, make_app: Callable[[], Any], options: Mapping[str, Any]):
        self._make_app, self._options = make_app, dict(options)
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            if key in self.cfg.settings:  # e.g. control_socket_disable only exists in gunicorn >= 25.1
                self.cfg.set(key, value)

    def load(self):
        return self._make_app()


WORKER_BOOT_ERROR = 3  # gunicorn's exit status for a worker that could not boot: the master halts
SWITCH_INTERVAL_S = 0.001  # the GIL's switch interval in the worker (Python's default: 5 ms)


def _start_in_background(build: Callable[[], Any], starting: startup.Starting, describe: Callable[[], str]) -> None:
    """Build the app in a thread while `starting` answers; hand requests to it once built."""
    def run():
        try:
            app = build()
        except BaseException:  # noqa: BLE001 - nothing can serve: say why, exit as a failed boot
            log.exception("gemma-jax could not start")
            _worker_exit(None, type("W", (), {"pid": os.getpid()})())
            logging.shutdown()
            os._exit(WORKER_BOOT_ERROR)
        starting.ready(app)
        log.info("gemma-jax ready: %s", describe())

    threading.Thread(target=run, name="gemma-jax-start", daemon=True).start()


def _worker_exit(server, worker) -> None:
    while _worker_backend:
        backend = _worker_backend.pop()
        try:
            backend.stop()
        except Exception:  # noqa: BLE001 - shutting down anyway; say why
            log.exception("scheduler stop failed")
    log.info("gemma-jax stopped (pid %d)", worker.pid)


QUIET_LIBRARIES = ("absl", "orbax", "jax", "jaxlib", "flax", "etils", "tensorstore", "urllib3", "filelock")


def configure_logging(level: str = "info") -> None:
    """Our lines at `level`; the libraries' (absl, orbax, jax, ...) only from WARNING up, so a start
    logs what the server does, not each checkpoint read or compile."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    floor = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(floor)
    try:
        from absl import logging as absl_logging  # noqa: PLC0415 - only if installed (orbax brings it)
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)


def serve(
    backend_factory: Callable[[], Backend],
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int = 16,
    *,
    app_kwargs: Mapping[str, Any] | None = None,
    graceful_timeout: float = 30.0,
    worker_timeout: float = 900.0,
    log_level: str = "info",
    model_name: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. `backend_factory` runs in a thread of the worker (it loads the
    model) while the worker already answers (module docstring); model_name: for /health meanwhile."""
    configure_logging(log_level)
    app_kwargs = dict(app_kwargs or {})
    worker_lib.LIMITS.buffered_body = int(app_kwargs.get("max_body_bytes", 1 << 20))

    def build():
        from serving.app import create_app  # noqa: PLC0415 - imported in the worker

        startup.PROGRESS.stage("loading")
        with startup.quiet_heap():  # no GIL-holding full collections while /health must answer
            backend = backend_factory()
            backend.start()
            _worker_backend.append(backend)
            startup.PROGRESS.stage("loading finetunes")
            return create_app(backend, **app_kwargs)

    def make_app():
        # The device thread and compiles hold the GIL for long stretches of Python; a shorter switch
        # interval keeps HTTP threads (health checks, streams) answering promptly beside them.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        starting = startup.Starting(startup.PROGRESS, model_name)
        describe = lambda: (f"serving {_worker_backend[0].model_name} on http://{bind_address(host, port)} "
                            f"(pid {os.getpid()}, {max(1, int(threads))} threads)")
        _start_in_background(build, starting, describe)
        return starting

    options = {
        "bind": [bind_address(host, port)],
        "workers": 1,
        "worker_class": worker_lib.PacedThreadWorker,
        "threads": max(1, int(threads)),
        "worker_connections": 1000,  # open connections; slow heads beyond it are closed oldest first
        "preload_app": False,
        "timeout": int(worker_timeout),
        "graceful_timeout": int(graceful_timeout),
        "keepalive": 5,
        "accesslog": None,  # serving.access logs one JSON line per request instead
        "errorlog": "-",
        "loglevel": log_level,
        "proc_name": "gemma-jax",
        "worker_exit": _worker_exit,
        # one shared per-user control socket would clash between servers on one machine
        "control_socket_disable": True,
    }
    _GunicornApp(make_app, options).run()
