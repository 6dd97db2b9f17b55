"""The real `gemma-jax serve` command as a subprocess: gunicorn, the backend factory, a real Engine.

`python -m serving.cli serve --random-weights tiny_gemma3 --max-batch 2` (what the console script
runs) on a free loopback port: random weights start fast, the tokenizer is the embedded GGUF's (the
cache dir given by GEMMA_JAX_CACHE). The reference is computed here, in the test process: the same
random weights (`serving.factory.load_model` with the same flags) and an independent greedy loop over
the full forward, no cache (`test_embedded._reference_greedy`), decoded with the same tokenizer.
Checked: the readiness line, a Workers AI run (envelope, the reference's text, usage), the same run
streamed (event format, padding, usage, [DONE]; the pieces concatenate to the reference's text), an
OpenAI chat request (one user turn is the same prompt as Workers AI's default scoped prompt, so the
reference's text again), auth, /metrics counting the generated tokens, then SIGTERM -> exit 0 within
the graceful timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tomllib
from pathlib import Path

import pytest
import requests

from gemma_jax.tokenizer import encode_chat, format_prompt
from serving.factory import load_model
from serving_fakes import MODEL, run_url
from test_embedded import _reference_greedy
from test_serving_gunicorn import free_port, metric, server_process

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cli-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GRACEFUL = 5
PROMPT = "Why is the sky blue?"
MAX_TOKENS = 8


def test_console_script_is_serving_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gemma-jax"] == "serving.cli:main"


@pytest.fixture(scope="module")
def server(gguf_file, tmp_path_factory):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", GEMMA_JAX_CACHE=str(gguf_file.parent),
               GEMMA_JAX_API_TOKEN=TOKEN, GEMMA_JAX_WARMUP="0")  # warm starts: test_startup.py
    argv = [sys.executable, "-m", "serving.cli", "serve", "--random-weights", "tiny_gemma3", "--max-batch", "2",
            "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path_factory.mktemp("data")),
            "--threads", "4", "--graceful-timeout", str(GRACEFUL)]
    with server_process(argv, env, 150, cwd=ROOT) as (proc, lines):
        yield proc, f"http://127.0.0.1:{port}", lines


@pytest.fixture(scope="module")
def reference():
    """(tokenizer, prompt ids, greedy ids without the stop id, their text) of PROMPT, computed here."""
    config, params, tok = load_model(argparse.Namespace(random_weights="tiny_gemma3", dtype="float32",
                                                        checkpoint=None))
    ids = tok.encode(format_prompt(PROMPT))
    drawn = _reference_greedy(config, params, ids, MAX_TOKENS)  # stops before a stop id
    assert len(set(drawn)) >= 3  # random weights, but a varied continuation
    return tok, ids, drawn, tok.decode(drawn)


def test_serve_answers_workers_ai_and_openai_then_stops_on_sigterm(server, reference):
    proc, base, lines = server
    tok, ids, drawn, want = reference
    stopped = len(drawn) < MAX_TOKENS
    n = len(drawn) + stopped  # a stop token counts as generated
    ready = next(line for line in lines if "gemma-jax ready" in line)
    assert f"serving {MODEL} on {base}" in ready

    assert requests.post(run_url(base), json={"prompt": "hi"}, timeout=10).status_code == 401
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    prompt_tokens = len(ids)
    r = requests.post(run_url(base), json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer == {"result": {"response": want, "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}},
        "success": True, "errors": [], "messages": []}
    result = answer["result"]

    r = requests.post(run_url(base), json={**body, "stream": True}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    blocks = [b for b in r.text.split("\n\n") if not b.startswith(":")]  # (": keep-alive" comments)
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    assert blocks[-2] == "data: [DONE]"
    events = [json.loads(b[len("data: "):]) for b in blocks[:-2]]
    assert all(re.fullmatch(r"[A-Za-z0-9]*", e.pop("p")) for e in events)  # padding on by default (0..63)
    assert events[-1] == {"response": "", "usage": result["usage"]}
    assert all(set(e) == {"response"} and e["response"] for e in events[:-1])
    assert "".join(e["response"] for e in events) == want

    messages = [{"role": "user", "content": PROMPT}]
    r = requests.post(f"{base}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert chat["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    assert len(encode_chat(tok, messages)) == prompt_tokens
    assert chat["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                             "total_tokens": prompt_tokens + n}

    assert metric(base, "gemma_jax_scheduler_tokens_generated") == 3 * n
    assert metric(base, "gemma_jax_generated_tokens_total") == 3 * len(drawn)  # delivered as text
    assert metric(base, "gemma_jax_prompt_tokens_total") == 3 * prompt_tokens
    assert metric(base, "gemma_jax_time_to_first_token_seconds_count") == 3
    assert metric(base, "gemma_jax_scheduler_active_slots") == 0 and metric(base, "gemma_jax_scheduler_slots") == 2

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACEFUL + 10) == 0
    log = "".join(lines)
    assert "gemma-jax stopped" in log and "Traceback" not in log
