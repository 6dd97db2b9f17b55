"""The worker before it is ready: answer at once, say how far the start has come.

From the first second the worker listens, its WSGI app is a `Starting` app: `GET /health` answers
503 `{"status": "warming", "stage": ..., "compiled": n, "total": N, "elapsed_s": s}` (executables
compiled so far by `Engine.warmup` and how many it compiles in all, null before it starts; stage
"precompiling": the same counts from a child process filling a cold cache, `serving.precompile`), and
every other route answers 503 with Workers AI's 3040 envelope and `Retry-After`, while a thread
loads the model, compiles it and builds the Flask app. Then every request goes to that app
(`/health` answers 200). `PROGRESS` is what the loading thread reports and `/health` reads.

Answering at once also needs the GIL: tracing a model makes hundreds of thousands of objects, and
each of Python's full garbage collections over them holds the GIL for 0.1-0.5 s (measured on the
tiny model's warm-up), stalling every HTTP thread. So while the server starts (`quiet_heap`) the
oldest generation is never collected automatically, and after each step `settle_heap` collects the
young generations (cheap) and freezes what survives (`gc.freeze`); once ready, automatic full
collections resume, over only the objects made since.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable
from typing import Any

RETRY_AFTER_S = 5


class Progress:
    """The stage of a start and, while compiling, executables compiled / total; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._stage, self._compiled, self._total = "starting", 0, None

    def stage(self, name: str) -> None:
        with self._lock:
            self._stage = name

    def compiled(self, done: int, total: int, stage: str = "compiling") -> None:
        """`Engine.warmup`'s progress callback (stage "precompiling": a child process's warmup,
        `serving.precompile`)."""
        with self._lock:
            self._stage, self._compiled, self._total = stage, int(done), int(total)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"stage": self._stage, "compiled": self._compiled, "total": self._total,
                    "elapsed_s": round(time.monotonic() - self._started, 1)}


PROGRESS = Progress()  # the worker process's start


def settle_heap() -> None:
    """Collect the young garbage generations, then freeze every surviving object (module docstring)."""
    gc.collect(1)
    gc.freeze()


class quiet_heap:
    """While the server starts: no automatic full collection; the heap settled on entry and exit."""

    def __enter__(self):
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self._thresholds[0], self._thresholds[1], 2**31 - 1)
        settle_heap()

    def __exit__(self, *exc):
        settle_heap()
        gc.set_threshold(*self._thresholds)


def compiled(done: int, total: int) -> None:
    """`Engine.warmup`'s progress callback in a server: report, and keep full collections short."""
    settle_heap()
    PROGRESS.compiled(done, total)


class Starting:
    """A WSGI app that answers for the app being built, then hands every request to it (`ready`)."""

    def __init__(self, progress: Progress, model_name: str | None = None):
        self.progress, self.model_name = progress, model_name
        self._app: Callable | None = None

    def ready(self, app: Callable) -> None:
        self._app = app

    def __call__(self, environ: dict, start_response: Callable):
        app = self._app
        if app is not None:
            return app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            body = {"status": "warming", **({"model": self.model_name} if self.model_name else {}),
                    **self.progress.snapshot()}
        else:
            from serving import errors  # noqa: PLC0415 - the envelope's one definition

            snap = self.progress.snapshot()
            total = "?" if snap["total"] is None else snap["total"]
            e = errors.warming_up(f"{snap['stage']}, {snap['compiled']} of {total} executables compiled")
            body = errors.body_for(e, path)
        data = json.dumps(body).encode("utf-8")
        start_response("503 Service Unavailable", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
            ("Retry-After", str(RETRY_AFTER_S)), ("Cache-Control", "no-store")])
        return [data]
