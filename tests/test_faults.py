"""Faults inside the engine, on a real `gemma-jax serve` process (issue 10 item 3).

The test-only hook (`GEMMA_JAX_TEST_FAULT`, a trigger file: `tiny_server.TinyServer.fault`) makes one
engine dispatch raise, or one prefill, or slows every dispatch (a slow device). Checked:
- a failed dispatch fails exactly the requests in it: the running streams end with an error event
  (3043, naming the fault) and no [DONE]; the requests still queued are served with the right text
  (an independent greedy loop, `tiny_server.reference`); one dispatch failure and as many failed
  requests as were running are counted; the next request is served normally;
- a failed dispatch under a non-streaming request answers the Workers AI envelope (500 / 3043);
- a failed prefill fails only its own request (envelope, 3043), the next one is served;
- a request past its deadline (`--request-timeout`) gets 408 / 3007 (envelope; an error event once a
  stream has begun) and frees its slot at once (/metrics).
In-process, `Scheduler(fault=...)`: a dispatch failure leaves later requests untouched, and a device
thread that dies fails what it held and refuses new requests instead of hanging them.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tiny_server import TinyServer, reference

SLOTS, TIMEOUT = 4, 20.0  # generous: compiles on a loaded 2-core machine must fit in it
PROMPT, MAX_TOKENS = "Why is the sky blue?", 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_file):
    with TinyServer(tmp_path_factory.mktemp("faults"), gguf_file, "--max-batch", str(SLOTS), "--max-queue", "64",
                    "--threads", "32", "--request-timeout", str(TIMEOUT)) as s:
        # compile what the tests below use (a first compile may take longer than TIMEOUT here)
        for stream in (False, True, False, True):
            requests.post(s.base + "/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it", timeout=300,
                          json={"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": stream})
        yield s


def run(server, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(server.base + "/client/v4/accounts/a/ai/run/@hf/google/gemma-7b-it", json=body,
                         timeout=timeout)


def check_served(server) -> None:
    text, n = reference(PROMPT, MAX_TOKENS)
    r = run(server, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["response"] == text and r.json()["result"]["usage"]["completion_tokens"] == n


def wait_for(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def events_of(raw: bytes) -> tuple[list[dict], bool]:
    blocks = [b for b in raw.split(b"\n\n") if b.startswith(b"data: ")]
    done = bool(blocks) and blocks[-1] == b"data: [DONE]"
    return [json.loads(b[6:]) for b in blocks if b != b"data: [DONE]"], done


def test_a_failed_dispatch_fails_only_its_requests(server):
    check_served(server)
    failures = server.metric("gemma_jax_scheduler_dispatch_failures_total")
    failed = server.metric('gemma_jax_scheduler_requests_total{outcome="failed"}')
    server.fault("generate 0.05")  # slow: the streams are still running when the fault comes
    streams = [server.connect({"prompt": f"Story {i}.", "max_tokens": 400, "stream": True}) for i in range(SLOTS)]
    responses = [c.getresponse() for c in streams]  # each has begun (first event waited for)
    assert [r.status for r in responses] == [200] * SLOTS
    queued: list[requests.Response] = []
    waiting = [threading.Thread(target=lambda: queued.append(run(server, {
        "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}))) for _ in range(2)]
    for t in waiting:
        t.start()
    wait_for(lambda: server.metric("gemma_jax_scheduler_queue_depth") == 2)
    server.fault("generate")  # replaces the slow trigger: the next dispatch raises, once
    raws = [r.read() for r in responses]
    for t in waiting:
        t.join(120)
    for raw in raws:
        events, done = events_of(raw)
        assert not done and events[-1]["response"] == ""
        [error] = events[-1]["errors"]
        assert error["code"] == 3043 and "InjectedFault" in error["message"] and "generate" in error["message"]
        assert all("errors" not in e and e["response"] for e in events[:-1])
    text, n = reference(PROMPT, MAX_TOKENS)
    assert [(r.status_code, r.json()["result"]["response"]) for r in queued] == [(200, text)] * 2
    assert server.metric("gemma_jax_scheduler_dispatch_failures_total") == failures + 1
    assert server.metric('gemma_jax_scheduler_requests_total{outcome="failed"}') == failed + SLOTS
    assert not server.trigger.exists()  # fired once
    check_served(server)


def test_a_failed_dispatch_answers_the_envelope(server):
    server.fault("generate 0.05")
    answer: list[requests.Response] = []
    t = threading.Thread(target=lambda: answer.append(run(server, {"prompt": "Long.", "max_tokens": 400})))
    t.start()
    wait_for(lambda: server.metric("gemma_jax_scheduler_active_slots") == 1)
    server.fault("generate")
    t.join(120)
    [r] = answer
    assert r.status_code == 500
    body = r.json()
    assert body["success"] is False and body["result"] == {} and body["messages"] == []
    [error] = body["errors"]
    assert error["code"] == 3043 and error["message"].startswith("AiError: ") and "InjectedFault" in error["message"]
    check_served(server)


def test_a_failed_prefill_fails_only_its_request(server):
    server.fault("prefill")
    for stream in (False, True):  # before the first event a stream still answers with a status
        if stream:
            server.fault("prefill")
        r = run(server, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream})
        assert r.status_code == 500 and r.json()["errors"][0]["code"] == 3043
        assert "InjectedFault" in r.json()["errors"][0]["message"] and "prefill" in r.json()["errors"][0]["message"]
        check_served(server)
    assert server.metric("gemma_jax_scheduler_prefill_failures_total") == 2


def test_past_its_deadline_a_request_gets_408_and_frees_its_slot(server):
    timeouts = server.metric('gemma_jax_generations_total{outcome="timeout"}')
    server.fault("generate 0.5")  # 400 tokens = 50 dispatches >= 25 s, past the 20 s deadline
    try:
        answers: dict[bool, requests.Response] = {}
        threads = [threading.Thread(target=lambda s=s: answers.__setitem__(s, run(server, {
            "prompt": "Long.", "max_tokens": 400, "stream": s}))) for s in (False, True)]
        started = time.monotonic()
        for t in threads:
            t.start()
        wait_for(lambda: server.metric("gemma_jax_scheduler_active_slots") == 2)
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - started
        # both slots free within a second of the deadline, while the device is still slow
        wait_for(lambda: server.metric("gemma_jax_scheduler_active_slots") == 0, 1.0)
    finally:
        server.fault(None)
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 3
    r = answers[False]
    assert r.status_code == 408
    assert r.json() == {"result": {}, "success": False, "messages": [],
                        "errors": [{"code": 3007, "message": "AiError: Request timeout"}]}
    events, done = events_of(answers[True].content)
    assert answers[True].status_code == 200 and not done  # the stream had begun: an error event ends it
    assert events[-1] == {"response": "", "errors": [{"code": 3007, "message": "AiError: Request timeout"}]}
    assert server.metric('gemma_jax_generations_total{outcome="timeout"}') == timeouts + 2
    assert server.metric("gemma_jax_generations_in_flight") == 0
    check_served(server)


# -- in-process: the scheduler alone ------------------------------------------------------------------
class _Dies:
    """A fault hook that raises on the n-th dispatch."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, stage: str) -> None:
        if stage == "generate":
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("boom")


def test_scheduler_fault_hook_and_a_dead_device_thread():
    import tempfile

    from engine_reference import naive_greedy
    from gemma_jax.engine.api import Request, RequestFailed, SamplingParams
    from gemma_jax.engine.scheduler import Scheduler
    from real_backend import make_engine, tiny_model, train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(d)
    config, params = tiny_model(tok)
    engine = make_engine(config, params)
    ids = tuple(tok.encode("hello world"))
    greedy = SamplingParams(temperature=0.0)
    want = [int(t) for t in naive_greedy(config, params, [list(ids)], 12)[0] if t not in config.stop_ids]
    with Scheduler(engine, tok, fault=_Dies(2)) as scheduler:
        first = scheduler.submit(Request(prompt_ids=ids, max_tokens=12, sampling=greedy))
        with pytest.raises(RequestFailed, match="boom"):
            first.result(120)
        second = scheduler.submit(Request(prompt_ids=ids, max_tokens=12, sampling=greedy))
        assert list(second.result(120).token_ids) == want  # the engine recovered with a fresh state
        assert scheduler.stats()["dispatch_failures"] == 1

    # a device thread that dies (here: no fresh cache after a failed dispatch) fails what it
    # held and refuses new requests, instead of leaving them to wait forever
    broken = make_engine(config, params)

    def reset():
        raise RuntimeError("device lost")

    broken.reset = reset
    with Scheduler(broken, tok, fault=_Dies(1)) as scheduler:
        held = scheduler.submit(Request(prompt_ids=ids, max_tokens=12, sampling=greedy))
        with pytest.raises(RequestFailed):
            held.result(120)
        deadline = time.monotonic() + 30
        while scheduler.stats()["running"]:
            assert time.monotonic() < deadline, "the dead device thread was not noticed"
            time.sleep(0.01)
        with pytest.raises(RequestFailed, match="device lost"):
            scheduler.submit(Request(prompt_ids=ids, max_tokens=12, sampling=greedy))
