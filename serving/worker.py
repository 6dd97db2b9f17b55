"""The gunicorn worker: gthread, but slow clients never hold a thread while they dawdle.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives, and the
thread then blocks reading the rest of the request. A client that sends its headers one byte per
second (slowloris) therefore holds a thread for as long as it likes, and `--threads` such clients stop
the server. This worker keeps gthread's design (one event loop, a thread pool) and moves the waiting
into the event loop:

- the request head is read there, non-blocking, and a connection reaches a thread only once its
  head is complete (`\\r\\n\\r\\n`); a head must complete within `HEAD_TIMEOUT` of its first byte and
  be at most `MAX_HEAD_BYTES`, else the connection is closed;
- a body announced by Content-Length of at most `Limits.buffered_body` bytes (every JSON request:
  the app refuses larger ones anyway) is read there too, before any thread sees the request, within
  `BODY_GRACE + length / MIN_RATE` seconds; at most `BUFFER_BUDGET` bytes are held so at once;
- what a thread still reads itself (chunked bodies, uploads, `Expect: 100-continue`) is paced: the
  read fails once `BODY_GRACE + received / MIN_RATE` seconds have passed, and a write waits at most
  `SEND_TIMEOUT` seconds for a client that stopped reading;
- when all `worker_connections` are taken, the oldest connection still sending its head is closed
  to make room for the new one, so slow clients cannot fill the connection table either;
- an answer that says `Connection: close` (the app's 3006/3007 refusals of a body it did not read)
  really closes the connection, after a bounded linger in the thread, never in the event loop;
- a complete request that finds every thread busy (each open stream holds one) is answered at once
  from the event loop with Workers AI's 429 / 3040 envelope and the connection closed, instead of
  waiting in the thread pool's queue: over capacity is a quick 429, never a hang, whatever
  `--threads`, `--max-batch` and `--max-queue` are.

So a client that sends a JSON request promptly is served while any number of clients trickle their
heads or small bodies, and threads are only ever held by requests being handled, by bodies arriving
at MIN_RATE or faster, or for at most BODY_GRACE seconds (tests/test_slowloris.py, RELIABILITY.md).
"""

from __future__ import annotations

import dataclasses
import errno
import selectors
import socket
import time
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import _DEFER, ThreadWorker

HEAD_TIMEOUT = 10.0  # seconds from a head's first byte to its end
MAX_HEAD_BYTES = 64 << 10
BODY_GRACE = 10.0  # seconds a body may take before MIN_RATE applies
MIN_RATE = 64 << 10  # bytes per second a body must average after BODY_GRACE
SEND_TIMEOUT = 60.0  # seconds one write may wait for a client that does not read
LINGER = 2.0  # seconds a closing connection is drained (in its thread) so the answer is not reset
BUFFER_BUDGET = 256 << 20  # bytes of bodies held by the event loop at once


@dataclasses.dataclass
class Limits:
    buffered_body: int = 1 << 20  # bodies up to this size are read in the event loop (serve() sets it)


LIMITS = Limits()


class PacedSocket:
    """A client socket whose reads, while a deadline is set, fail once `grace + received / rate`
    seconds have passed since `pace()`, and whose writes wait at most SEND_TIMEOUT. Everything else
    is the socket's own (the event loop registers it by fileno)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._started: float | None = None
        self._received = 0

    def pace(self) -> None:
        self._started, self._received = time.monotonic(), 0

    def unpace(self) -> None:
        self._started = None

    def recv(self, size: int, *flags) -> bytes:
        if self._started is None:
            return self._sock.recv(size, *flags)
        left = self._started + BODY_GRACE + self._received / MIN_RATE - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "the client sent its request too slowly")
        before = self._sock.gettimeout()  # e.g. gunicorn's own bound while draining a body
        self._sock.settimeout(left if before is None else min(left, before))
        try:
            data = self._sock.recv(size, *flags)
        finally:
            self._sock.settimeout(before)
        self._received += len(data)
        return data

    def sendall(self, data, *flags) -> None:
        before = self._sock.gettimeout()
        self._sock.settimeout(SEND_TIMEOUT)
        try:
            self._sock.sendall(data, *flags)
        finally:
            self._sock.settimeout(before)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@dataclasses.dataclass
class _Reading:
    """A connection whose head (and small body) the event loop is still reading."""
    conn: object
    deadline: float
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    need: int | None = None  # total bytes once the head is parsed and its body is to be buffered
    held: int = 0  # bytes of BUFFER_BUDGET reserved for its body


def _content_length(head: bytes) -> tuple[int | None, bool]:
    """(Content-Length if the head announces a plain one, whether the body must be left to a thread)."""
    length, to_thread = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if length is not None or not value.isdigit():
                return None, True  # let gunicorn's parser judge (and refuse) it
            length = int(value)
        elif name in (b"transfer-encoding", b"expect"):
            to_thread = True
    return length, to_thread


def _closing_app(app):
    """WSGI middleware: an answer with `Connection: close` makes gunicorn close the connection
    (gunicorn drops hop-by-hop headers from the app and would otherwise keep it alive, then drain
    the unread body)."""

    def wrapped(environ, start_response):
        def start(status, headers, exc_info=None):
            if any(k.lower() == "connection" and v.strip().lower() == "close" for k, v in headers):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


class PacedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with the event-loop reading described in the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reading: dict[int, _Reading] = {}  # by id(conn), oldest first
        self._buffered = 0
        self._busy = 0  # requests handed to the thread pool and not finished (event-loop thread only)
        self._busy_body: bytes | None = None

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = _closing_app(self.wsgi)

    # -- event loop ------------------------------------------------------------------------------
    def accept(self, listener):
        super().accept(listener)
        while self.nr_conns >= self.worker_connections and self._reading:
            oldest = next(iter(self._reading.values()))
            self._drop(oldest)  # full: the slowest head makes room

    def enqueue_req(self, conn):
        if self.cfg.is_ssl or getattr(conn, "head_ready", False):
            conn.head_ready = False
            if self._busy >= self.cfg.threads:
                return self._refuse_busy(conn)
            self._busy += 1
            return super().enqueue_req(conn)
        if not isinstance(conn.sock, PacedSocket):
            conn.sock = PacedSocket(conn.sock)
        reading = _Reading(conn, time.monotonic() + HEAD_TIMEOUT)
        if conn.parser is not None:  # read-ahead of a kept-alive connection: the next head's start
            reading.buf += conn.parser.unreader.take_buffered()
        conn.sock.setblocking(False)
        self._reading[id(conn)] = reading
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, reading))
        self._advance(reading)

    def _on_readable(self, reading: _Reading, _fileobj) -> None:
        try:
            while True:
                data = reading.conn.sock._sock.recv(65536)
                if not data:
                    self._drop(reading)  # the client went away
                    return
                reading.buf += data
                if len(data) < 65536:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(reading)
            return
        self._advance(reading)

    def _advance(self, reading: _Reading) -> None:
        """Hand the connection to a thread once what the event loop reads has arrived."""
        if reading.need is None:
            end = reading.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(reading.buf) > MAX_HEAD_BYTES:
                    self._drop(reading)
                return
            length, to_thread = _content_length(bytes(reading.buf[:end]))
            reading.need = end + 4
            if (not to_thread and length is not None and length <= LIMITS.buffered_body
                    and self._buffered + length <= BUFFER_BUDGET):
                reading.need += length
                reading.held = length
                self._buffered += length
                reading.deadline = time.monotonic() + BODY_GRACE + length / MIN_RATE
        if len(reading.buf) >= reading.need:
            self._forget(reading)
            conn = reading.conn
            conn.prebuffered = bytes(reading.buf)
            conn.head_ready = True
            self.enqueue_req(conn)

    def _forget(self, reading: _Reading) -> None:
        self._reading.pop(id(reading.conn), None)
        self._buffered -= reading.held
        reading.held = 0
        try:
            self.poller.unregister(reading.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, reading: _Reading) -> None:
        self._forget(reading)
        self.nr_conns -= 1
        reading.conn.close()

    def finish_request(self, conn, fs):
        self._busy -= 1
        return super().finish_request(conn, fs)

    def _refuse_busy(self, conn) -> None:
        """Every thread is busy: answer 429 / 3040 here and close (the request is not read further)."""
        if self._busy_body is None:
            import json  # noqa: PLC0415

            from serving import errors  # noqa: PLC0415 - only in the worker (it imports jax)

            e = errors.out_of_capacity()
            body = json.dumps(e.body()).encode()
            self._busy_body = (f"HTTP/1.1 {e.status} Too Many Requests\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        sock = conn.sock._sock if isinstance(conn.sock, PacedSocket) else conn.sock
        try:
            sock.settimeout(1.0)  # a few hundred bytes into an empty socket buffer: never blocks long
            sock.sendall(self._busy_body)
        except OSError:
            pass
        conn.__dict__.pop("prebuffered", None)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for reading in [r for r in self._reading.values() if r.deadline <= now]:
            self._drop(reading)

    # -- threads ---------------------------------------------------------------------------------
    def handle(self, conn):
        prebuffered = conn.__dict__.pop("prebuffered", None)
        if prebuffered is not None:
            conn.data_ready = True
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(prebuffered)
        paced = isinstance(conn.sock, PacedSocket)
        if paced:
            conn.sock.pace()
        try:
            result = super().handle(conn)
        finally:
            if paced:
                conn.sock.unpace()
        if not result and result is not _DEFER:
            util.close_graceful(conn.sock, timeout=LINGER)  # here, not in the event loop
        return result
