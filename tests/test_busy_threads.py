"""Over capacity on the HTTP side: when every worker thread is held (each open stream holds one), a
further request is answered at once with 429 / 3040 by the event loop (serving/worker.py), never
left waiting in the thread pool's queue; once a thread frees, requests are served again.

Real gunicorn server with the fake backend (tests/serving_fakes.py), 2 threads, slow streams.
"""

from __future__ import annotations

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
