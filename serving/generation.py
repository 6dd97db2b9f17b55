"""Reading one request's handle from an HTTP thread: deadlines, heartbeats, cancel, metrics.

The HTTP thread reads the handle itself with `handle.next(timeout)`, waking at least every `POLL_S`
seconds: that is how a request deadline (-> 3007) is enforced even while the engine is silent, how a
stream sends keep-alive comments every `heartbeat` seconds, and how a client that went away is
noticed even while nothing is written to it (queued, or a non-streaming request): at each wake the
client's socket (gunicorn's or werkzeug's, from the Flask request the Run was made in) is polled; a
socket closed by the peer (EOF or reset) ends the run as "cancelled" and the engine frees the slot.
A client that half-closes its sending side is taken as gone too (nginx's default as well). Once a
stream writes, a failed write also ends it: the WSGI server closes our generator and `close()`
cancels the handle.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

from gemma_jax.engine.api import Completion, RequestHandle, StreamEvent
from serving import errors
from serving.metrics import Metrics

HEARTBEAT_S = 5.0
POLL_S = 0.5  # how often a waiting request checks its deadline and its client
_CURRENT = object()


def request_socket() -> socket.socket | None:
    """The client socket of the current Flask request (gunicorn or werkzeug), if there is one."""
    try:
        from flask import has_request_context, request  # noqa: PLC0415 - only where Flask serves
    except ImportError:
        return None
    if not has_request_context():
        return None
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    for _ in range(3):  # a wrapper (serving/worker.py's PacedSocket) keeps the socket as `_sock`
        if isinstance(sock, socket.socket) or sock is None:
            break
        sock = getattr(sock, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def client_gone(sock: socket.socket | None) -> bool:
    """True if the peer closed or reset `sock` (without blocking; a socket with unread data is not)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


def client_closed() -> errors.ApiError:
    """The answer nobody reads: the client went away (nginx's 499, for the access log and metrics)."""
    return errors.ApiError(499, 499, "Client closed the request")


class Run:
    """One submitted request as seen by the server. Iterate `items()`; then read `completion`."""

    def __init__(self, handle: RequestHandle, metrics: Metrics, *, timeout: float | None, heartbeat: float,
                 prompt_tokens: int, client=_CURRENT):
        """client: the socket polled for a peer that went away (default: the current Flask request's)."""
        self.handle, self.metrics = handle, metrics
        self.client = request_socket() if client is _CURRENT else client
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.heartbeat = heartbeat
        self.completion: Completion | None = None
        self._next_poll = self.started
        self._finished = False
        self._lock = threading.Lock()  # close() may come from another thread than items()
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(prompt_tokens)

    def items(self) -> Iterator[StreamEvent | None]:
        """Text events as they come; None on a heartbeat tick. Raises ApiError on failure/timeout, and
        `client_closed()` (499) if the client went away."""
        last = None
        beat = time.monotonic() + self.heartbeat  # when the next keep-alive is due
        while True:
            now = time.monotonic()
            wait = min(POLL_S, max(0.0, beat - now))
            if self.deadline is not None:
                wait = min(wait, self.deadline - now)
                if wait <= 0:
                    self._end("timeout")
                    raise errors.timeout()
            try:
                event = self.handle.next(wait)
            except TimeoutError:  # nothing within `wait`: deadline, client gone, or a heartbeat tick
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline:
                    self._end("timeout")
                    raise errors.timeout() from None
                self._check_client(now)
                if now >= beat:
                    beat = now + self.heartbeat
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
            self._check_client(at)  # a non-streaming request writes nothing until it ends
            n = max(1, len(event.token_ids))
            if last is None:
                self.metrics.ttft.observe(at - self.started)
            else:
                for _ in range(n):
                    self.metrics.itl.observe((at - last) / n)
            last = at
            beat = at + self.heartbeat
            self.metrics.tokens.inc(len(event.token_ids))
            yield event

    def _check_client(self, now: float) -> None:
        """At most every POLL_S: end the run (499) if its client went away."""
        if self.client is None or now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        if client_gone(self.client):
            self._end("cancelled")
            raise client_closed()

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
