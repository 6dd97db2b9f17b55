"""The paged one-step engine core (gemma_jax/engine/paged.py) against independent references.

- greedy outputs equal a full recompute with no cache (`engine_reference.naive_greedy`) for prompts
  longer than the token budget (chunked prefill) beside decoding sequences, on a small page pool;
- automatic prefix caching: prompts sharing a 24-token head give the same tokens with the cache on
  and off, the later ones feed fewer prompt tokens, and the pool counts the hits;
- seeded sampling with penalties draws what the slot engine draws for the same requests;
- a decoding sequence gets a token at every step while a long prompt enters in chunks;
- the shapes never change: one compile per sampling mode used.
"""

from __future__ import annotations

import numpy as np

from engine_reference import ENGINE_KW, naive_greedy, prompts_for, run_to_completion, tiny_params
from gemma_jax.engine.engine import Engine
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.sampling import MODES, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
KW = dict(num_pages=48, page_size=4, token_budget=16, max_seqs=4)


def strip_stop(drawn, config):
    return drawn[:-1] if drawn and drawn[-1] in config.stop_ids else drawn


def test_greedy_equals_a_full_recompute_with_chunked_prefill():
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([5, 30, 17, 29], seed=6)
    engine = PagedEngine(config, params, **KW)
    ids = [engine.add(p, max_tokens=12, sampling=GREEDY) for p in prompts]
    got = engine.run()
    want = naive_greedy(config, params, prompts, 12)
    assert [got[i] for i in ids] == [strip_stop(w, config) for w in want]
    assert engine.compile_count() == 1  # greedy only: one shape, one mode
    assert engine.pool.available() == KW["num_pages"] - 1  # every page back (cached or free)


def test_prefix_cache_gives_the_same_tokens_and_skips_the_shared_head():
    config, params = tiny_params("tiny_gemma3")
    head = prompts_for([24], seed=2)[0]
    tails = prompts_for([3, 6, 5], seed=8)
    prompts = [head + [int(t) for t in tail] for tail in tails]
    results = {}
    for caching in (False, True):
        engine = PagedEngine(config, params, prefix_caching=caching, **KW)
        fed, out = [], []
        for p in prompts:  # one after another: each can reuse what the earlier ones wrote
            i = engine.add(p, max_tokens=8, sampling=GREEDY)
            fed.append(len(p) - engine._seqs[i].computed)
            out.append(engine.run()[i])
        results[caching] = (out, fed, engine.pool.stats)
    assert results[True][0] == results[False][0]
    assert results[False][1] == [len(p) for p in prompts]
    assert results[True][1] == [len(prompts[0])] + [len(p) - 24 for p in prompts[1:]]  # 6 full pages reused
    stats = results[True][2]
    assert stats.hits == 12 and stats.misses >= 2
    want = naive_greedy(config, params, prompts, 8)
    assert results[True][0] == [strip_stop(w, config) for w in want]


def test_seeded_sampling_draws_what_the_slot_engine_draws():
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([7, 19, 12], seed=4)
    sampling = [SamplingParams(temperature=0.9, top_k=20, seed=11, repetition_penalty=1.3),
                SamplingParams(temperature=1.2, top_p=0.8, seed=12, frequency_penalty=0.5, presence_penalty=0.3),
                SamplingParams(temperature=0.0, repetition_penalty=1.5)]
    slot = Engine(config, params, **ENGINE_KW)
    want = run_to_completion(slot, prompts, max_tokens=10, sampling=sampling)
    engine = PagedEngine(config, params, **KW)
    ids = [engine.add(p, max_tokens=10, sampling=s) for p, s in zip(prompts, sampling)]
    got = engine.run()
    assert [got[i] for i in ids] == [strip_stop(w, config) for w in want]
    assert engine.compile_count() <= len(MODES)  # one compile per sampling mode a step needed, at most


def test_decoding_continues_while_a_long_prompt_enters_in_chunks():
    config, params = tiny_params("tiny_gemma3")
    short, long = prompts_for([4, 32], seed=3)
    engine = PagedEngine(config, params, num_pages=48, page_size=4, token_budget=8, max_seqs=4)
    a = engine.add(short, max_tokens=20, sampling=GREEDY)
    engine.step()  # a's prompt and first token
    b = engine.add(long, max_tokens=4, sampling=GREEDY)
    steps = []
    while b in engine._seqs and engine._seqs[b].computed < len(long):
        steps.append(dict(engine.step()))
    assert len(steps) >= 4  # 32 prompt tokens at most 7 per step beside a's decode token
    assert all(a in s for s in steps[:-1]) or a not in engine._seqs  # a drew a token every step
    engine.run()
    assert engine.result(a)[0] == strip_stop(naive_greedy(config, params, [short], 20)[0], config)
    assert engine.result(b)[0] == strip_stop(naive_greedy(config, params, [long], 4)[0], config)
