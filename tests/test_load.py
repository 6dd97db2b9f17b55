"""The short CI version of benchmarks/load.py against a real `gemma-jax serve` process on 127.0.0.1.

The server is the real CLI (gunicorn, Engine, Scheduler) with random `tiny_gemma3` weights (fast to
compile; the real tokenizer), 2 slots, a queue of 16 and a LoRA bank; a random PEFT adapter is
uploaded through the finetunes API. Phase 1: 16 clients for 10 s mixing streaming / non-streaming,
`prompt` / `messages`, base / adapter: no 5xx, no hang, every stream ends with [DONE], no 429 (the
queue holds every client), and the server is idle right after. Phase 2: with the device slowed by the
test-only fault hook (`GEMMA_JAX_TEST_FAULT`, "generate <seconds>": a slow device, so that holders
hold), slots and queue are filled and 16 more clients each get 429 / 3040 within a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import load  # noqa: E402

SLOTS, QUEUE, CLIENTS, EXCESS = 2, 16, 16, 16


@pytest.fixture(scope="module")
def served(tmp_path_factory, gguf_file):
    tmp = tmp_path_factory.mktemp("load")
    trigger = tmp / "fault"
    # GEMMA_JAX_WARMUP=0: compile on first use (the warm-up rounds below), not every bucket at start
    env = {"GEMMA_JAX_CACHE": str(gguf_file.parent), "GEMMA_JAX_TEST_FAULT": str(trigger), "GEMMA_JAX_WARMUP": "0"}
    flags = ["--data-dir", str(tmp / "data"), "--random-weights", "tiny_gemma3", "--max-batch", str(SLOTS),
             "--max-queue", str(QUEUE), "--threads", str(SLOTS + QUEUE + EXCESS + CLIENTS + 8),
             "--lora-slots", "2", "--max-lora-rank", "8"]
    with load.server(flags, log_path=tmp / "server.log", env=env, ready_timeout=300) as base:
        yield base, trigger, tmp / "server.log"


def set_fault(trigger: Path, text: str | None) -> None:
    if text is None:
        trigger.unlink(missing_ok=True)
        return
    part = trigger.with_suffix(".part")
    part.write_text(text)
    os.replace(part, trigger)


def test_mixed_load_then_over_capacity(served, tmp_path):
    base, trigger, log = served
    from serving.factory import RANDOM_CONFIGS

    adapter = load.write_random_adapter(tmp_path / "adapter", RANDOM_CONFIGS["tiny_gemma3"]())
    load.upload_adapter(base, "ci-adapter", adapter, {})
    warm, _, _ = load.warm_up(base, clients=CLIENTS, max_tokens=8, lora="ci-adapter", headers={}, timeout=300)
    assert [r.problem for r in warm if r.problem] == []

    results, seconds = load.load_phase(base, clients=CLIENTS, duration=10, max_tokens=8, lora="ci-adapter",
                                       headers={}, timeout=120)
    assert [r.problem for r in results if r.problem] == []
    assert {r.status for r in results} == {200}  # no 5xx, no hang, and no 429: the queue holds everyone
    kinds = {r.kind for r in results}
    assert kinds == {f"{s}+{i}{a}" for s in ("stream", "json") for i in ("prompt", "messages") for a in ("", "+lora")}
    streams = [r for r in results if r.kind.startswith("stream")]
    assert streams and all(r.ttft is not None and 0 < r.ttft <= r.seconds for r in streams)
    assert all(r.tokens >= 1 for r in results)
    m = load.metrics(base)
    assert m['gemma_jax_scheduler_requests_total{outcome="completed"}'] == len(warm) + len(results)
    assert m['gemma_jax_scheduler_requests_total{outcome="failed"}'] == 0
    assert load.wait_until(lambda: load.idle(base), 5) is not None

    set_fault(trigger, "generate 0.05")  # a slow device: holders stay put through the burst
    try:
        burst, problems = load.capacity_phase(base, excess=EXCESS, hold_tokens=400, headers={}, limit=1.0)
    finally:
        set_fault(trigger, None)
    assert problems == []
    assert len(burst) == EXCESS and all(r.status == 429 and r.seconds < 1.0 for r in burst)
    # the holders are gone: cancelled where they ran, dropped from the queue where they waited
    assert load.wait_until(lambda: load.idle(base), 10) is not None
    m = load.metrics(base)
    assert m['gemma_jax_scheduler_requests_total{outcome="cancelled"}'] == SLOTS + QUEUE
    assert m['gemma_jax_http_requests_total{method="POST",route="/client/v4/accounts/<account_id>/ai/run/<path:model>",status="429"}'] == EXCESS
    r = requests.post(load.run_url(base), json={"prompt": "after", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["result"]["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in log.read_text()
