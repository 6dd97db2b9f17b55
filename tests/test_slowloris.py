"""Slow clients cannot starve others (serving/worker.py), on the production server (gunicorn, 8 threads,
the fake backend) over real sockets on 127.0.0.1.

- 50 clients sending their head one byte per second, and 50 sending a small body one byte per second,
  while ordinary requests keep completing in well under 2 s; the trickling heads are closed by the
  server after HEAD_TIMEOUT and the small bodies after BODY_GRACE (both held by no thread meanwhile); a
  trickling chunked body (read by a thread) gets 408 (3007) after BODY_GRACE;
- 1100 connections that sent one byte (more than worker_connections) do not lock others out;
- keep-alive, pipelining and `Expect: 100-continue` still work through the event-loop reader.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from serving import worker
from serving_fakes import MODEL
from server_group import ServerGroup

RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerGroup(tmp_path_factory.mktemp("slow-data")) as group:  # --threads 8
        yield group


def timed_request(server) -> float:
    started = time.monotonic()
    r = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30,
                      headers={"Connection": "close"})
    assert r.status_code == 200 and r.json()["result"]["response"] == "tsaf", r.text
    return time.monotonic() - started


class Trickler(threading.Thread):
    """Sends `data` one byte per second on its own connection; records when the server answered or
    closed it (`closed_after`, seconds from the connection)."""

    def __init__(self, port: int, data: bytes):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.data, self.stop, self.closed_after, self.answer = data, threading.Event(), None, None
        self.started = time.monotonic()

    def run(self):
        for i in range(len(self.data)):
            try:
                self.sock.sendall(self.data[i:i + 1])
            except OSError:
                break
            if self.stop.wait(1.0):
                return
            self.sock.settimeout(0.0)
            try:
                self.answer = self.sock.recv(65536)  # an answer (408) or b"": the server closed it
                break
            except BlockingIOError:
                pass
            except OSError:
                break
            finally:
                self.sock.settimeout(None)
        self.closed_after = time.monotonic() - self.started

    def close(self):
        self.stop.set()
        self.sock.close()


def test_trickling_heads_and_bodies_do_not_starve_others(server):
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + b"X-Pad: y\r\n" * 20
    body = json.dumps({"prompt": "p" * 1000}).encode()
    slow_body = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    heads = [Trickler(server.port, head) for _ in range(50)]
    bodies = [Trickler(server.port, b"") for _ in range(50)]
    for t in bodies:
        t.sock.sendall(slow_body)  # the head at once, then the body byte by byte
        t.data = body
    chunked = Trickler(server.port, b"")
    chunked.sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunked.data = b"1\r\n{\r\n" * 100
    everyone = [*heads, *bodies, chunked]
    try:
        for t in everyone:
            t.start()
        time.sleep(1.5)  # all of them are trickling now
        durations = [timed_request(server) for _ in range(20)]
        assert max(durations) < 2.0, durations
        deadline = time.monotonic() + worker.HEAD_TIMEOUT + 5
        while time.monotonic() < deadline and any(t.closed_after is None for t in everyone):
            time.sleep(0.25)
        durations += [timed_request(server) for _ in range(5)]
        head_closed = [t.closed_after for t in heads]
        assert all(c is not None and c <= worker.HEAD_TIMEOUT + 3 for c in head_closed), head_closed
        # a chunked body is read by a thread: cut off after BODY_GRACE (1 byte/s is far under MIN_RATE)
        assert chunked.closed_after is not None and chunked.closed_after <= worker.BODY_GRACE + 3
        assert chunked.answer.startswith(b"HTTP/1.1 408") and b'"code":3007' in chunked.answer, chunked.answer
        assert all(t.answer in (b"", None) for t in heads)  # no answer, just the close (FIN, or RST when bytes were unread)
        body_closed = [t.closed_after for t in bodies]  # event loop: BODY_GRACE + 1 KB / MIN_RATE, then closed
        assert all(c is not None and c <= worker.BODY_GRACE + 3 for c in body_closed), body_closed
        assert all(t.answer in (b"", None) for t in bodies)  # closed without an answer (FIN or RST, as for heads)
        print(f"\nslowloris: 50 heads + 50 bodies + 1 chunked body at 1 byte/s, 8 threads: 25 requests, "
              f"max {max(durations) * 1000:.0f} ms, median {sorted(durations)[12] * 1000:.0f} ms; heads "
              f"closed after {min(head_closed):.1f}-{max(head_closed):.1f} s, bodies after "
              f"{min(body_closed):.1f}-{max(body_closed):.1f} s, chunked body (408) after "
              f"{chunked.closed_after:.1f} s")
    finally:
        for t in everyone:
            t.close()


def test_more_slow_connections_than_worker_connections(server):
    socks = []
    try:
        for _ in range(1100):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"P")
            socks.append(s)
        time.sleep(0.5)
        durations = [timed_request(server) for _ in range(5)]
        assert max(durations) < 2.0, durations
        closed = 0
        for s in socks:
            s.settimeout(0.0)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed > 0, closed  # the oldest unfinished heads made room (the rest may still be in the backlog)
        print(f"\n1100 one-byte connections (cap 1000): {closed} oldest closed, requests in "
              f"max {max(durations) * 1000:.0f} ms")
    finally:
        for s in socks:
            s.close()


def test_keepalive_pipelining_and_expect_continue(server):
    with requests.Session() as session:  # keep-alive: the second request comes back through the event loop
        for text in ("one", "two", "three"):
            r = session.post(server.url + RUN, json={"prompt": text, "raw": True}, timeout=10)
            assert r.json()["result"]["response"] == text[::-1]
    body = json.dumps({"prompt": "ab", "raw": True}).encode()
    request = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # two requests in one write
        s.sendall(request + request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.count(b"HTTP/1.1 200") == 2 and answer.count(b'"response":"ba"') == 2, answer
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n".encode())
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"response":"ba"' in answer, answer
