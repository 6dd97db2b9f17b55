"""End to end: the real Scheduler + Engine (tiny random-weight Gemma) + a small trained sentencepiece
tokenizer behind the HTTP server (`tests/real_backend.py`). The reference is an independent greedy
loop over `model.forward` (`engine_reference.naive_greedy`: full recompute each step, no cache, numpy
argmax), decoded with the same tokenizer."""

from __future__ import annotations

import json

import pytest
import requests

from engine_reference import naive_greedy
from real_backend import make_engine, serve, tiny_model, train_tokenizer
from serving_fakes import MODEL, run_url

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("spm"))
    config, params = tiny_model(tok)
    with serve(make_engine(config, params), tok, tmp_path_factory.mktemp("data")) as (server, _):
        yield server, tok, config, params


def test_real_engine_behind_http(stack):
    server, tok, config, params = stack
    prompt = "hello world"
    body = {"prompt": prompt, "raw": True, "temperature": 0, "max_tokens": MAX_TOKENS}
    prompt_ids = tok.encode(prompt)
    drawn = naive_greedy(config, params, [prompt_ids], MAX_TOKENS)[0]
    text_ids = [i for i in drawn if i not in config.stop_ids]
    assert len(set(text_ids)) > 3  # a real continuation, not one repeated token
    expected_text = tok.decode(text_ids)

    r = requests.post(run_url(server.url), json=body, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["response"] == expected_text
    assert result["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(drawn),
                               "total_tokens": len(prompt_ids) + len(drawn)}

    r = requests.post(run_url(server.url), json={**body, "stream": True}, timeout=120)
    events = [b[6:] for b in r.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(e["response"] for e in parsed) == expected_text
    assert parsed[-1] == {"response": "", "usage": result["usage"]}

    r = requests.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert r.json()["choices"][0]["text"] == expected_text

    # the engine's own limits and the server's agree: 61 tokens is over max_input_tokens=60
    r = requests.post(run_url(server.url), json={"prompt": "the " * 40, "raw": True}, timeout=30)
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 5021
    stats = requests.get(f"{server.url}/health", timeout=10).json()["scheduler"]
    assert stats["active_slots"] == 0 and stats["slots"] == 2


@pytest.mark.parametrize("edge", [
    {"seed": 9999999999, "temperature": 5, "top_p": 2, "top_k": 50, "repetition_penalty": 0,
     "frequency_penalty": 2, "presence_penalty": 2},
    {"seed": 1, "temperature": 0, "top_p": 0, "top_k": 1, "repetition_penalty": 2},
    {"max_tokens": 1},
])
def test_schema_edge_values_never_fail(stack, edge):
    server = stack[0]
    body = {"prompt": "the lazy dog", "max_tokens": 8, **edge}
    r = requests.post(run_url(server.url), json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["usage"]["completion_tokens"] <= body["max_tokens"]
    if "seed" in edge:  # seeded sampling is reproducible
        again = requests.post(run_url(server.url), json=body, timeout=60)
        assert again.json()["result"]["response"] == r.json()["result"]["response"]
