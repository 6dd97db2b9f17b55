"""The real embedded Gemma 3 270M behind HTTP (werkzeug in a thread, the backend `gemma-jax serve`
builds): a greedy raw prompt through `/ai/run` returns exactly the notebook API's text
(`gemma_jax.notebook.generate` on the same model and ids), with the usage of the prompt ids and of an
independent greedy loop over the full forward (`test_embedded._reference_greedy`, no cache); the
same request streamed concatenates to the same text.

The embedded checkpoint converts once into the cache dir (GEMMA_JAX_CACHE, next to the GGUF); later
loads restore it in seconds. The engine is small (one slot, one 32-token prompt bucket, 64 positions,
no LoRA bank) so that it compiles fast on a CPU.
"""

from __future__ import annotations

import json

import pytest
import requests

from gemma_jax.embedded import load_embedded
from gemma_jax.engine.build import build_engine
from gemma_jax.notebook import Model, generate
from real_backend import serve
from serving_fakes import run_url
from test_embedded import _reference_greedy

PROMPT = "The capital of France is"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def stack(gguf_file, tmp_path_factory):
    config, params, tok = load_embedded(cache=gguf_file.parent)
    engine = build_engine(config, params, max_seqs=1, page_size=16, num_pages=9, token_budget=32, decode_steps=4,
                          adapter_slots=0)
    with serve(engine, tok, tmp_path_factory.mktemp("data")) as (server, _):
        yield server, config, params, tok, engine


def test_greedy_raw_prompt_matches_the_notebook_api(stack):
    server, config, params, tok, engine = stack
    ids = tok.encode(PROMPT)
    model = Model(config, params, tok, engine=engine)  # the compiled engine, its own scheduler
    try:
        want = generate(model, ids, max_tokens=MAX_TOKENS, temperature=0.0)[0]
    finally:
        model.close()
    drawn = _reference_greedy(config, params, ids, MAX_TOKENS)  # stops before a stop id
    assert tok.decode(drawn) == want and len(want.split()) >= 3  # (" the capital of the country of France.")
    completion = len(drawn) + (len(drawn) < MAX_TOKENS)  # a stop token counts as generated

    body = {"prompt": PROMPT, "raw": True, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = requests.post(run_url(server.url), json=body, timeout=300)
    assert r.status_code == 200, r.text
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
    assert r.json() == {"result": {"response": want, "usage": usage}, "success": True, "errors": [],
                        "messages": []}

    r = requests.post(run_url(server.url), json={**body, "stream": True}, timeout=300)
    events = [b[len("data: "):] for b in r.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(e["response"] for e in parsed) == want
    assert parsed[-1] == {"response": "", "usage": usage}
