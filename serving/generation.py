"""Reading one request's handle from an HTTP thread: deadlines, heartbeats, cancel, metrics.

A `RequestHandle` iterator blocks until the engine produces the next piece, with no timeout. A small
pump thread per request moves the handle's events onto a queue, so the HTTP thread can wait with a
timeout: that is how a request deadline (-> 3007) is enforced even while the engine is silent, and
how a stream sends keep-alive comments while queued, which is also what detects a client that went
away (the write fails, the WSGI server closes our generator, `close()` cancels the handle and the
engine frees the slot).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from gemma_jax.engine.api import Completion, RequestHandle, StreamEvent
from serving import errors
from serving.metrics import Metrics

HEARTBEAT_S = 5.0


class Run:
    """One submitted request as seen by the server. Iterate `items()`; then read `completion`."""

    def __init__(self, handle: RequestHandle, metrics: Metrics, *, timeout: float | None,
                 heartbeat: float = HEARTBEAT_S, prompt_tokens: int = 0):
        self.handle, self.metrics = handle, metrics
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.heartbeat = heartbeat
        self.completion: Completion | None = None
        self.generated = 0
        self._queue: queue.Queue = queue.Queue()
        self._finished = False
        self._closed = False
        self._lock = threading.Lock()
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(prompt_tokens)
        threading.Thread(target=self._pump, name="gemma-jax-pump", daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self.handle:
                self._queue.put(("event", event, time.monotonic()))
            remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            self._queue.put(("done", self.handle.result(timeout=remaining), None))
        except BaseException as e:  # noqa: BLE001 - handed to the HTTP thread, which maps it
            self._queue.put(("error", e, None))

    def items(self) -> Iterator[StreamEvent | None]:
        """Text events as they come; None on a heartbeat tick. Raises ApiError on failure/timeout."""
        last = None
        while True:
            wait = self.heartbeat
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    self._fail("timeout")
                    raise errors.timeout()
            try:
                kind, payload, at = self._queue.get(timeout=wait)
            except queue.Empty:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._fail("timeout")
                    raise errors.timeout()
                yield None
                continue
            if kind == "error":
                self._fail("error")
                raise errors.from_exception(payload)
            if kind == "done":
                self.completion = payload
                self._finish("completed")
                return
            n = max(1, len(payload.token_ids))
            if last is None:
                self.metrics.ttft.observe(at - self.started)
            else:
                for _ in range(n):
                    self.metrics.itl.observe((at - last) / n)
            last = at
            self.generated += len(payload.token_ids)
            self.metrics.tokens.inc(len(payload.token_ids))
            yield payload

    def wait(self) -> Completion:
        """Consume everything (non-streaming requests) and return the completion."""
        for _ in self.items():
            pass
        assert self.completion is not None
        return self.completion

    def close(self) -> None:
        """Cancel the handle unless it finished (the client went away or a step failed)."""
        with self._lock:
            if self._finished or self._closed:
                return
            self._closed = True
        self.handle.cancel()
        self._finish("cancelled")

    def _fail(self, outcome: str) -> None:
        with self._lock:
            if self._finished:
                return
            self._closed = True
        self.handle.cancel()
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self.metrics.in_flight.dec()
        self.metrics.generations.labels(outcome).inc()


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens}
