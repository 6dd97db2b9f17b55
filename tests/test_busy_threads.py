"""Over capacity on the HTTP side: when every worker thread is held (each open stream holds one), a
further request is answered at once with 429 / 3040 by the event loop (serving/worker.py), never
left waiting in the thread pool's queue; once a thread frees, requests are served again. Operations
requests (/health, /metrics, /openapi.json) are never refused: they run on the worker's own
operations threads, also on a kept-alive connection, while generation requests still get 429.

Real gunicorn server with the fake backend (tests/serving_fakes.py), 2 threads, slow streams.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest
import requests

from server_group import ServerGroup
from serving_fakes import MODEL

RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerGroup(tmp_path_factory.mktemp("busy-data"), extra_args=("--threads", "2", "--fake-delay", "0.1")) as group:
        yield group


def test_a_request_finding_every_thread_busy_gets_429_at_once(server):
    holders, opened = [], threading.Barrier(3)

    def hold():
        with requests.post(server.url + RUN, json={"prompt": "x" * 40, "raw": True, "stream": True},
                           stream=True, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)  # the stream is open and holds its thread
            opened.wait(timeout=30)
            holders.append((r.status_code, first, [line for line in lines if line]))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    opened.wait(timeout=30)  # both threads are held by streams (about 4 s of tokens each)

    started = time.monotonic()
    r = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30)
    took = time.monotonic() - started
    assert r.status_code == 429, r.text
    assert r.json() == {"result": {}, "success": False, "messages": [],
                        "errors": [{"code": 3040, "message": "AiError: Capacity temporarily exceeded, please try again."}]}
    assert r.headers["Connection"] == "close"
    assert took < 1.0, took

    for t in threads:
        t.join(timeout=60)
    assert [status for status, _, _ in holders] == [200, 200]
    assert all(rest[-1] == b"data: [DONE]" for _, _, rest in holders)  # the holders were not disturbed

    again = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30)
    assert again.status_code == 200 and again.json()["result"]["response"] == "tsaf", again.text


CAPACITY_429 = {"result": {}, "success": False, "messages": [],
                "errors": [{"code": 3040, "message": "AiError: Capacity temporarily exceeded, please try again."}]}


def hold_threads(server, n: int, prompt_chars: int):
    """Open `n` slow streams (each holds an HTTP thread for prompt_chars x 0.1 s); returns (threads,
    results) once every stream has sent its first event."""
    results, opened = [], threading.Barrier(n + 1)

    def hold():
        with requests.post(server.url + RUN, json={"prompt": "x" * prompt_chars, "raw": True, "stream": True},
                           stream=True, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            opened.wait(timeout=30)
            results.append((r.status_code, [line for line in lines if line]))

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    opened.wait(timeout=30)
    return threads, results


def test_operations_routes_are_served_while_every_thread_is_busy(server):
    threads, holders = hold_threads(server, 2, 100)  # about 10 s of tokens each
    fresh, kept = [], []
    try:
        for _ in range(5):  # each on a new connection
            for path in ("/health", "/metrics"):
                started = time.monotonic()
                r = requests.get(server.url + path, timeout=10, headers={"Connection": "close"})
                fresh.append(time.monotonic() - started)
                assert r.status_code == 200, (path, r.status_code, r.text)
        r = requests.get(server.url + "/health", timeout=10)
        assert r.json()["status"] == "ok" and r.json()["scheduler"]["active_slots"] == 2, r.text
        assert "gemma_jax_scheduler_active_slots 2.0" in requests.get(server.url + "/metrics", timeout=10).text
        assert requests.head(server.url + "/health", timeout=10).status_code == 200
        assert requests.get(server.url + "/openapi.json", timeout=10).json()["openapi"].startswith("3.1")

        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # one kept-alive connection
            for i in range(10):
                path = ("/health", "/metrics")[i % 2]
                started = time.monotonic()
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, body = read_answer(sock)
                kept.append(time.monotonic() - started)
                assert status == 200 and body, (path, status, body[:200])
            # a generation request on the same connection is classified again: still over capacity
            request = json.dumps({"prompt": "fast", "raw": True}).encode()
            sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
            status, body = read_answer(sock)
            assert status == 429 and json.loads(body) == CAPACITY_429, (status, body)

        r = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30)
        assert r.status_code == 429 and r.json() == CAPACITY_429, r.text
    finally:
        for t in threads:
            t.join(timeout=60)
    print(f"\noperations while 2/2 threads stream: new connections {len(fresh)} requests, median "
          f"{statistics.median(fresh) * 1000:.1f} ms, max {max(fresh) * 1000:.1f} ms; kept-alive {len(kept)}, "
          f"median {statistics.median(kept) * 1000:.1f} ms, max {max(kept) * 1000:.1f} ms")
    assert max(fresh) < 0.1 and max(kept) < 0.1, (fresh, kept)
    assert [status for status, _ in holders] == [200, 200]
    assert all(rest[-1] == b"data: [DONE]" for _, rest in holders)
    again = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30)
    assert again.status_code == 200 and again.json()["result"]["response"] == "tsaf", again.text


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """One answer with a Content-Length from `sock`: (status, body)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        part = sock.recv(65536)
        assert part, data
        body += part
    assert len(body) == length, (head, body)
    return int(lines[0].split(" ")[1]), body
