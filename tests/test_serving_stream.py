"""Workers AI event streams over real HTTP: format, incrementality, disconnect -> cancel, late errors."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from serving.app import create_app
from serving_fakes import LiveServer, fake_backend, run_url


def sse_events(response):
    """Yield (arrival_time, data) for each `data:` event; comments are checked and skipped."""
    buf = b""
    for chunk in response.iter_content(chunk_size=None):
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            lines = block.decode("utf-8").split("\n")
            if all(line.startswith(":") for line in lines):
                continue
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            yield time.monotonic(), lines[0][len("data: "):]
    assert buf == b"", buf


def parse(response):
    events = [data for _, data in sse_events(response)]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.fixture
def live(tmp_path, request):
    params = getattr(request, "param", {})
    backend, scheduler, _ = fake_backend(**params.get("fake", {}))
    app = create_app(backend, data_dir=tmp_path, **params.get("app", {}))
    with LiveServer(app) as server:
        server.scheduler = scheduler
        yield server


def test_stream_format_matches_the_non_stream_answer(live):
    body = {"prompt": "héllo 🌍 wörld", "raw": True, "seed": 7}
    whole = requests.post(run_url(live.url), json=body, timeout=10).json()["result"]
    r = requests.post(run_url(live.url), json={**body, "stream": True}, stream=True, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    events = parse(r)
    assert events[-1] == "[DONE]"
    *pieces, final = events[:-1]
    assert all(set(e) == {"response", "p"} and e["response"] for e in pieces)
    assert "".join(e["response"] for e in pieces) == whole["response"] == "dlröw 🌍 olléh"
    assert [e["response"] for e in pieces] == list("dlröw 🌍 olléh")  # whole characters only
    assert final["response"] == "" and final["usage"] == whole["usage"] == {
        "prompt_tokens": 14, "completion_tokens": 13, "total_tokens": 27}  # 13 chars + BOS
    pads = [e["p"] for e in pieces + [final]]
    assert all(re.fullmatch(r"[a-zA-Z0-9]*", p) and len(p) < 64 for p in pads)
    assert len({len(p) for p in pads}) > 1  # random lengths


@pytest.mark.parametrize("live", [{"app": {"stream_padding": False}}], indirect=True)
def test_padding_can_be_switched_off(live):
    r = requests.post(run_url(live.url), json={"prompt": "abc", "raw": True, "stream": True}, timeout=10)
    assert parse(r) == [{"response": "c"}, {"response": "b"}, {"response": "a"},
                        {"response": "", "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}},
                        "[DONE]"]


@pytest.mark.parametrize("live", [{"fake": {"delay": 0.1}}], indirect=True)
def test_first_event_arrives_before_generation_ends(live):
    start = time.monotonic()
    r = requests.post(run_url(live.url), json={"prompt": "abcdefghijklmnopqrst", "raw": True, "stream": True},
                      stream=True, timeout=30)
    arrivals = [(t - start, data) for t, data in sse_events(r)]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert json.loads(arrivals[0][1])["response"] == "t"
    assert last >= 1.9  # 20 tokens at 0.1 s each
    assert first < 0.6, arrivals[:3]  # one token's time plus overhead, not the whole generation
    gaps = [b[0] - a[0] for a, b in zip(arrivals[:19], arrivals[1:20])]
    assert min(gaps) > 0.03  # events really arrive one by one, not in a burst at the end


def metric(server, name):
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.parametrize("live", [{"fake": {"delay": 0.05}}], indirect=True)
def test_client_disconnect_cancels_and_frees_the_slot(live):
    r = requests.post(run_url(live.url), json={"prompt": "x" * 400, "raw": True, "stream": True},
                      stream=True, timeout=30)
    events = sse_events(r)
    next(events)
    assert metric(live, "gemma_jax_scheduler_active_slots") == 1.0
    r.close()  # the client goes away mid-stream (20 s of generation left)
    handle = live.scheduler.handles[-1]
    assert handle.cancelled.wait(5), "disconnect did not cancel the generation"
    assert handle.finished.wait(5)
    deadline = time.monotonic() + 5
    while metric(live, "gemma_jax_scheduler_active_slots") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(live, "gemma_jax_scheduler_active_slots") == 0.0
    assert metric(live, 'gemma_jax_generations_total{outcome="cancelled"}') == 1.0
    assert metric(live, "gemma_jax_generations_in_flight") == 0.0
    assert handle.completion.completion_tokens < 100


@pytest.mark.parametrize("live", [{"fake": {"fail_after": 3}}], indirect=True)
def test_error_after_the_stream_began_is_a_final_event(live):
    r = requests.post(run_url(live.url), json={"prompt": "abcdef", "raw": True, "stream": True}, timeout=10)
    assert r.status_code == 200
    events = parse(r)
    assert [e["response"] for e in events[:3]] == ["f", "e", "d"]
    assert len(events) == 4 and "[DONE]" not in events
    assert events[3]["response"] == "" and events[3]["errors"] == [
        {"code": 3043, "message": "AiError: Internal server error: fake failure mid-generation"}]


@pytest.mark.parametrize("live", [{"fake": {"delay": 0.1}, "app": {"request_timeout": 0.45}}], indirect=True)
def test_timeout_mid_stream_is_a_final_event_and_cancels(live):
    r = requests.post(run_url(live.url), json={"prompt": "abcdefghijklmnop", "raw": True, "stream": True},
                      timeout=10)
    events = parse(r)
    assert 1 <= len(events) - 1 <= 5
    assert events[-1]["errors"] == [{"code": 3007, "message": "AiError: Request timeout"}]
    assert live.scheduler.handles[-1].cancelled.wait(2)


@pytest.mark.parametrize("live", [{"fake": {"delay": 0.3}, "app": {"heartbeat": 0.05}}], indirect=True)
def test_keepalive_comments_while_waiting(live):
    r = requests.post(run_url(live.url), json={"prompt": "ab", "raw": True, "stream": True}, stream=True,
                      timeout=10)
    raw = r.raw.read().decode()
    assert ": keep-alive\n\n" in raw
    data = [line for line in raw.split("\n\n") if line.startswith("data: ")]
    assert [json.loads(d[6:])["response"] for d in data[:2]] == ["b", "a"] and data[-1] == "data: [DONE]"


def test_errors_before_the_stream_starts_keep_their_status(live):
    r = requests.post(run_url(live.url), json={"prompt": "a" * 2000, "raw": True, "stream": True}, timeout=10)
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 5021
    r = requests.post(run_url(live.url), json={"prompt": "a", "lora": "nope", "stream": True}, timeout=10)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == 3037
    r = requests.post(run_url(live.url), json={"prompt": "a", "stream": "true"}, timeout=10)
    assert r.headers["Content-Type"].startswith("text/event-stream")  # "true" coerced like raw
