"""Reading one request's handle from an HTTP thread: deadlines, heartbeats, cancel, metrics.

The HTTP thread reads the handle itself with `handle.next(timeout)`, waking at least every
`heartbeat` seconds: that is how a request deadline (-> 3007) is enforced even while the engine is
silent, and how a stream sends keep-alive comments while queued, which is also what detects a client
that went away (the write fails, the WSGI server closes our generator, `close()` cancels the handle
and the engine frees the slot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from gemma_jax.engine.api import Completion, RequestHandle, StreamEvent
from serving import errors
from serving.metrics import Metrics

HEARTBEAT_S = 5.0


class Run:
    """One submitted request as seen by the server. Iterate `items()`; then read `completion`."""

    def __init__(self, handle: RequestHandle, metrics: Metrics, *, timeout: float | None, heartbeat: float,
                 prompt_tokens: int):
        self.handle, self.metrics = handle, metrics
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.heartbeat = heartbeat
        self.completion: Completion | None = None
        self._finished = False
        self._lock = threading.Lock()  # close() may come from another thread than items()
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(prompt_tokens)

    def items(self) -> Iterator[StreamEvent | None]:
        """Text events as they come; None on a heartbeat tick. Raises ApiError on failure/timeout."""
        last = None
        while True:
            wait = self.heartbeat
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    self._end("timeout")
                    raise errors.timeout()
            try:
                event = self.handle.next(wait)
            except TimeoutError:  # nothing within `wait`: the deadline passed, or a heartbeat tick
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._end("timeout")
                    raise errors.timeout() from None
                yield None
                continue
            except Exception as e:  # noqa: BLE001 - the request failed: mapped to its error answer
                self._end("error")
                raise errors.from_exception(e) from None
            if event is None:
                self.completion = self.handle.result()
                self._end("completed", cancel=False)
                return
            at = time.monotonic()
            n = max(1, len(event.token_ids))
            if last is None:
                self.metrics.ttft.observe(at - self.started)
            else:
                for _ in range(n):
                    self.metrics.itl.observe((at - last) / n)
            last = at
            self.metrics.tokens.inc(len(event.token_ids))
            yield event

    def wait(self) -> Completion:
        """Consume everything (non-streaming requests) and return the completion."""
        for _ in self.items():
            pass
        assert self.completion is not None
        return self.completion

    def close(self) -> None:
        """Cancel the handle unless it finished (the client went away or a step failed)."""
        self._end("cancelled")

    def _end(self, outcome: str, cancel: bool = True) -> None:
        """Count the outcome once; cancel the handle unless it completed."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if cancel:
            self.handle.cancel()
        self.metrics.in_flight.dec()
        self.metrics.generations.labels(outcome).inc()


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens}
