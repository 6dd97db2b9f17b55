"""End to end: the real Scheduler + Engine (tiny random-weight Gemma) + a small trained sentencepiece
tokenizer behind the HTTP server. The reference is an independent greedy loop over `model.forward`
(full recompute each step, no cache, numpy argmax), decoded with the same tokenizer.

Random init makes a tiny Gemma copy its input token (the tied embedding dominates the residual), so
the layer weights are scaled up 8x: the greedy continuation then varies token by token."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
import sentencepiece as spm

from gemma_jax.config import Limits, tiny_mqa
from gemma_jax.engine.engine import Engine
from gemma_jax.engine.scheduler import Scheduler
from gemma_jax.model import forward
from gemma_jax.params import init_params
from gemma_jax.tokenizer import Tokenizer
from serving.app import create_app
from serving.backend import Backend
from serving_fakes import LiveServer, run_url

MODEL = "@hf/google/gemma-7b-it"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog",
                                 "hello world, a tiny tokenizer for the serving test"] * 50), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(directory / "tok"), model_type="bpe", vocab_size=300,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, minloglevel=2)
    tok = Tokenizer.from_file(directory / "tok.model")
    config = tiny_mqa(tok.vocab_size).replace(
        start_of_turn_id=tok.start_of_turn_id, end_of_turn_id=tok.end_of_turn_id,
        limits=Limits(max_input_tokens=60, max_total_tokens=128, max_batch_prefill_tokens=128))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "embedder" in jax.tree_util.keystr(path) or x.ndim < 2 else x * 8.0,
        init_params(config, jax.random.key(7), jnp.float32))
    engine = Engine(config, params, slots=2, max_len=128, prefill_buckets=(32, 64), prefill_batches=(1,),
                    steps_per_call=4)
    scheduler = Scheduler(engine, tok)
    backend = Backend(scheduler, tok, model_name=MODEL, limits=config.limits)
    backend.start()
    server = LiveServer(create_app(backend, data_dir=tmp_path_factory.mktemp("data"), stream_padding=False))
    yield server, tok, config, params
    server.close()
    backend.stop()


def greedy_reference(config, params, prompt_ids, max_tokens, width=64):
    """Greedy decoding by full forwards over a fixed-width row (causal: the padding after the last
    real token cannot change its logits), one compile."""
    logits_of = jax.jit(lambda p, tokens: forward(p, tokens, jnp.arange(width, dtype=jnp.int32)[None], None,
                                                  config=config)[0])
    ids, drawn = list(prompt_ids), []
    for _ in range(max_tokens):
        row = np.zeros((1, width), np.int32)
        row[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(logits_of(params, jnp.asarray(row))[0, len(ids) - 1])))
        drawn.append(nxt)
        if nxt in config.stop_ids:
            break
        ids.append(nxt)
    return drawn


def test_real_engine_behind_http(stack):
    server, tok, config, params = stack
    prompt = "hello world"
    body = {"prompt": prompt, "raw": True, "temperature": 0, "max_tokens": MAX_TOKENS}
    prompt_ids = tok.encode(prompt)
    drawn = greedy_reference(config, params, prompt_ids, MAX_TOKENS)
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
