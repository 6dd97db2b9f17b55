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
  `--threads`, `--max-batch` and `--max-queue` are;
- operations requests (GET or HEAD of `/health`, `/metrics`, `/openapi.json`, whole in the bytes
  the event loop read) are never refused for capacity: they run on their own `OPERATIONS_THREADS`
  threads, not counted as busy, through the same `handle` / `finish_request` path, so a monitor sees
  the server while every thread streams; a kept-alive connection returns to the event loop after
  each answer and its next request is classified again (a generation request on it can get 429);
- a request gunicorn's parser refuses (request line, HTTP version, header syntax or size,
  Content-Length, Transfer-Encoding, Expect) is answered with the JSON envelope (`handle_error`:
  400 / 5006, 414 or 431 / 3006; OpenAI's shape on `/v1/` paths) and the connection closed, never
  gunicorn's HTML page; only a failure of ours is 500 / 3043. Broken chunked framing is the app's to
  answer while it reads the body (400 / 5006, serving/http.py); met while gthread drains a body the
  app left unread, the answer is already out and the connection just closes (no second answer).

So a client that sends a JSON request promptly is served while any number of clients trickle their
heads or small bodies, and threads are only ever held by requests being handled, by bodies arriving
at MIN_RATE or faster, or for at most BODY_GRACE seconds (tests/test_slowloris.py, RELIABILITY.md;
tests/test_busy_threads.py and tests/test_http_errors.py for the last two points).
"""

from __future__ import annotations

import dataclasses
import errno
import http
import json
import selectors
import socket
import ssl
import time
from concurrent import futures
from datetime import datetime
from functools import partial

from gunicorn import util
from gunicorn.http import errors as parse_errors
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers.gthread import _DEFER, ThreadWorker

HEAD_TIMEOUT = 10.0  # seconds from a head's first byte to its end
MAX_HEAD_BYTES = 64 << 10
BODY_GRACE = 10.0  # seconds a body may take before MIN_RATE applies
MIN_RATE = 64 << 10  # bytes per second a body must average after BODY_GRACE
SEND_TIMEOUT = 60.0  # seconds one write may wait for a client that does not read
LINGER = 2.0  # seconds a closing connection is drained (in its thread) so the answer is not reset
BUFFER_BUDGET = 256 << 20  # bytes of bodies held by the event loop at once
OPERATIONS_PATHS = (b"/health", b"/metrics", b"/openapi.json")  # GET / HEAD: never refused for capacity
OPERATIONS_THREADS = 2  # their own threads, beside --threads


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
        self.request_line = b""  # the start of the current request's first line, for handle_error

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


def _operations_request(buffered: bytes | None) -> bool:
    """Whether `buffered` (what the event loop read) starts with a whole GET / HEAD of an operations
    route: one no thread will have to read a body for."""
    if not buffered:
        return False
    end = buffered.find(b"\r\n\r\n")
    parts = buffered[:max(end, 0)].split(b"\r\n", 1)[0].split(b" ")
    if end < 0 or len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return False
    if parts[1].split(b"?", 1)[0] not in OPERATIONS_PATHS:
        return False
    length, to_thread = _content_length(buffered[:end])
    return not to_thread and len(buffered) >= end + 4 + (length or 0)


def _target(req, client) -> str:
    """The request's path as far as it is known: the parsed one, else the request line's target."""
    path = getattr(req, "path", None)
    if isinstance(path, str):
        return path
    parts = getattr(client, "request_line", b"").split(b" ")
    return parts[1].decode("latin-1") if len(parts) >= 2 and parts[1].startswith(b"/") else ""


def _client_fault(exc: BaseException):
    """The ApiError for an exception gunicorn's parser raised over a client's bytes; None if the
    fault is ours (a response header the app made, gunicorn's configuration, anything else)."""
    from serving import errors  # noqa: PLC0415 - only in the worker (it imports jax)

    detail = str(exc)[:200]
    if isinstance(exc, (parse_errors.InvalidResponseHeader, parse_errors.InvalidResponseHeaderName,
                        parse_errors.ConfigurationProblem)):
        return None
    if isinstance(exc, parse_errors.LimitRequestLine):
        return errors.uri_too_long(detail)
    if isinstance(exc, parse_errors.LimitRequestHeaders):
        return errors.headers_too_large(detail)
    if isinstance(exc, (parse_errors.InvalidChunkSize, parse_errors.ChunkMissingTerminator,
                        parse_errors.InvalidChunkExtension)):
        return errors.malformed_body(detail)
    if isinstance(exc, parse_errors.ExpectationFailed):
        return errors.malformed_request(detail, status=417)
    if isinstance(exc, parse_errors.ForbiddenProxyRequest):
        return errors.malformed_request("request forbidden", status=403)
    if isinstance(exc, parse_errors.ParseException):  # UnsupportedTransferCoding too (gunicorn: 501)
        return errors.malformed_request(detail)
    if isinstance(exc, ssl.SSLError):
        return errors.malformed_request(detail, status=403)
    return None


def _error_answer(error, path: str) -> bytes:
    """A whole HTTP/1.1 answer for `error`: Workers AI's envelope, OpenAI's shape under /v1/."""
    from serving import errors  # noqa: PLC0415 - only in the worker (it imports jax)

    body = errors.body_for(error, path)
    if path.startswith("/v1/") and error.status < 500:  # statuses the app never answers (403) are the client's
        body["error"]["type"] = "invalid_request_error"
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode() + data


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
        self._operations: futures.ThreadPoolExecutor | None = None

    def init_process(self):
        self._operations = futures.ThreadPoolExecutor(OPERATIONS_THREADS, thread_name_prefix="gemma-jax-ops")
        super().init_process()  # runs the worker until it stops

    def run(self):
        try:
            super().run()
        finally:
            if self._operations is not None:
                self._operations.shutdown(wait=False)

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
            if self._operations is not None and _operations_request(conn.__dict__.get("prebuffered")):
                fs = self._operations.submit(self.handle, conn)
                fs.add_done_callback(lambda fut: self.method_queue.defer(self._finish_operations, conn, fut))
                return None
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

    def _finish_operations(self, conn, fs):
        """gthread's finish_request for an operations request (it never counted in `_busy`): keep-alive
        puts the connection back in the event loop, whose next request enqueue_req classifies again."""
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
            if isinstance(conn.sock, PacedSocket):
                conn.sock.request_line = prebuffered[:256].split(b"\r\n", 1)[0]
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

    def _keepalive_after(self, conn, keepalive):
        """gthread drains an unread body after the answer; if that body's framing is broken or it stops
        arriving, the answer already went out: close the connection, never answer twice."""
        try:
            return super()._keepalive_after(conn, keepalive)
        except (parse_errors.ParseException, OSError) as e:
            self.log.debug("closing after the answer: the unread body could not be drained: %s", e)
            return False

    def handle_error(self, req, client, addr, exc):
        """gunicorn's handle_error (same statuses for client faults, same logging), but the answer is
        the JSON envelope of serving/errors.py, and a client's fault is never a 5xx."""
        from serving import errors  # noqa: PLC0415 - only in the worker (it imports jax)

        started = datetime.now()
        addr = addr or ("", -1)  # unix socket
        error = _client_fault(exc)
        if error is not None:
            self.log.warning("Invalid request from ip=%s: %s", addr[0], exc)
            if req is None and getattr(exc, "req", None) is not None:
                req = exc.req  # InvalidHeader keeps the request it was reading, for the access log
        else:
            if hasattr(req, "uri") and hasattr(req, "method"):
                self.log.exception("Error handling request %s %s", req.method, req.uri)
            else:
                self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
            error = errors.internal_error()
        answer = _error_answer(error, _target(req, client))
        if req is not None:
            try:
                environ = default_environ(req, client, self.cfg)
                environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = addr[0], str(addr[1])
                resp = Response(req, client, self.cfg)
                resp.status = f"{error.status} {http.HTTPStatus(error.status).phrase}"
                resp.response_length = len(answer)
                self.log.access(resp, req, environ, datetime.now() - started)
            except Exception:  # noqa: BLE001 - the access line is not worth failing the answer for
                self.log.debug("no access line for the error answer", exc_info=True)
        try:
            util.write(client, answer)
        except Exception:  # noqa: BLE001 - the client may be gone
            self.log.debug("Failed to send error message.")
