"""The paged one-step engine (gemma_jax/engine/paged.py) against independent references.

- greedy outputs equal a full recompute with no cache (`engine_reference.naive_greedy`) for prompts
  longer than the token budget (chunked prefill) beside decoding sequences, on a small page pool;
- multi-step decode dispatches give the same tokens as one step per dispatch;
- a pool too small for every sequence at once: sequences are preempted and restarted, and every
  output is still the full recompute's;
- automatic prefix caching: prompts sharing a 24-token head give the same tokens with the cache on
  and off, the later ones feed fewer prompt tokens, and the pool counts the hits;
- seeded sampling with penalties draws what the slot engine draws for the same requests;
- a decoding sequence gets a token at every step while a long prompt enters in chunks;
- the device says why a sequence finished (stop token, length);
- int8 pages: close to the float pool's logits, same greedy tokens on these prompts;
- the shapes never change: `warmup` compiles every executable, and serving compiles nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_reference import ENGINE_KW, naive_greedy, prompts_for, run_to_completion, tiny_engine, tiny_params
from gemma_jax.engine.api import InputTooLong
from gemma_jax.engine.engine import Engine
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.sampling import MODES, SamplingParams, mode_for

GREEDY = SamplingParams(temperature=0.0)
KW = dict(num_pages=48, page_size=4, token_budget=16, max_seqs=4, decode_steps=1)


def run_all(engine, prompts, max_tokens, sampling=GREEDY):
    ids = [engine.add(p, max_tokens=max_tokens, sampling=sampling) for p in prompts]
    got = engine.run()
    return [got[i] for i in ids]


def test_greedy_equals_a_full_recompute_with_chunked_prefill():
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([5, 30, 17, 29], seed=6)
    engine = PagedEngine(config, params, **KW)
    assert run_all(engine, prompts, 12) == naive_greedy(config, params, prompts, 12)
    assert engine.compile_counts()["step"] <= 1 + len(engine.decode_buckets)  # greedy: mixed, each decode bucket
    assert engine.pool.available() == KW["num_pages"] - 1  # every page back (cached or free)


def test_multi_step_decode_equals_one_step_per_dispatch():
    config, params, _ = tiny_engine("tiny_gemma3")  # an end_of_turn id greedy decoding draws
    prompts = prompts_for([5, 9, 3], seed=1)
    single = run_all(PagedEngine(config, params, **KW), prompts, 20)
    engine = PagedEngine(config, params, **{**KW, "decode_steps": 6})
    multi = run_all(engine, prompts, 20)
    assert multi == single == naive_greedy(config, params, prompts, 20)
    assert any(d[-1] in config.stop_ids for d in multi)  # a stop inside a multi-step dispatch
    assert engine.stats()["steps"] < sum(map(len, multi)) // 2


def test_preemption_when_the_pool_runs_out_keeps_every_output():
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([20, 24, 18, 22], seed=9)
    engine = PagedEngine(config, params, num_pages=25, page_size=4, token_budget=16, max_seqs=4, decode_steps=1)
    assert run_all(engine, prompts, 24) == naive_greedy(config, params, prompts, 24)
    assert engine.stats()["preemptions"] > 0


def test_prefix_cache_gives_the_same_tokens_and_skips_the_shared_head():
    config, params = tiny_params("tiny_gemma3")
    head = prompts_for([24], seed=2)[0]
    tails = prompts_for([3, 6, 5], seed=8)
    prompts = [head + [int(t) for t in tail] for tail in tails]
    results = {}
    for caching in (False, True):
        engine = PagedEngine(config, params, prefix_caching=caching, **KW)
        out, fed = [], []
        for p in prompts:  # one after another: each can reuse what the earlier ones wrote
            before = engine.stats()["tokens_fed"]
            out += run_all(engine, [p], 8)
            fed.append(engine.stats()["tokens_fed"] - before - (len(out[-1]) - 1))  # minus decode tokens
        results[caching] = (out, fed, engine.stats())
    assert results[True][0] == results[False][0] == naive_greedy(config, params, prompts, 8)
    assert results[False][1] == [len(p) for p in prompts]
    assert results[True][1] == [len(prompts[0])] + [len(p) - 24 for p in prompts[1:]]  # 6 full pages reused
    stats = results[True][2]
    assert stats["prefix_hits"] == 12 and stats["prefix_misses"] >= 2


@pytest.mark.parametrize("alone", [False, True], ids=["together", "alone"])
def test_seeded_sampling_draws_what_the_slot_engine_draws(alone):
    """Together the rows decode in the max_seqs bucket (an executable per mode); each alone, in the
    one-row bucket, whose executable picks the mode at run time (`lax.switch`)."""
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([7, 19, 12], seed=4)
    sampling = [SamplingParams(temperature=0.9, top_k=20, seed=11, repetition_penalty=1.3),
                SamplingParams(temperature=1.2, top_p=0.8, seed=12, frequency_penalty=0.5, presence_penalty=0.3),
                SamplingParams(temperature=0.0, repetition_penalty=1.5)]
    assert sorted(mode_for([s]) for s in sampling) == sorted(MODES)
    want = run_to_completion(Engine(config, params, **ENGINE_KW), prompts, max_tokens=10, sampling=sampling)
    for steps in (1, 4):  # one step per dispatch, and several
        engine = PagedEngine(config, params, **{**KW, "decode_steps": steps})
        groups = [[i] for i in range(3)] if alone else [[0, 1, 2]]
        got = []
        for group in groups:
            ids = [engine.add(prompts[i], max_tokens=10, sampling=sampling[i]) for i in group]
            out = engine.run()
            got += [out[i] for i in ids]
        assert got == want
        assert engine.compile_counts()["step"] <= (2 + 1 if alone else 2 * len(MODES))  # mixed: 2 modes


def test_decoding_continues_while_a_long_prompt_enters_in_chunks():
    config, params = tiny_params("tiny_gemma3")
    short, long = prompts_for([4, 32], seed=3)
    engine = PagedEngine(config, params, num_pages=48, page_size=4, token_budget=8, max_seqs=4, decode_steps=1)
    a = engine.add(short, max_tokens=20, sampling=GREEDY)
    first = engine.step()  # a's prompt and first token
    b = engine.add(long, max_tokens=4, sampling=GREEDY)
    drawn = {a: list(first[0].tokens), b: []}
    steps = 0
    while not drawn[b]:
        events = {e.seq: e.tokens for e in engine.step()}
        steps += 1
        assert a in events  # a drew a token in every step while b's prompt entered
        for seq, tokens in events.items():
            drawn[seq] += tokens
    assert steps >= 5  # 32 prompt tokens, at most 7 per step beside a's decode token
    for seq, tokens in engine.run().items():
        drawn[seq] += tokens
    assert [drawn[a], drawn[b]] == naive_greedy(config, params, [short, long], 20)[:1] + naive_greedy(
        config, params, [long], 4)


def test_the_device_says_why_each_sequence_finished():
    config, params, _ = tiny_engine("tiny_gemma3")
    prompts = prompts_for([5, 8], seed=0)
    want = naive_greedy(config, params, prompts, 12)
    engine = PagedEngine(config, params, **KW)
    ids = [engine.add(p, max_tokens=12, sampling=GREEDY) for p in prompts]
    reasons = {}
    while engine.busy():
        for e in engine.step():
            if e.finish:
                reasons[e.seq] = e.finish
    expected = ["stop" if w[-1] in config.stop_ids else "length" for w in want]
    assert [reasons[i] for i in ids] == expected and "stop" in expected


def test_int8_pages_stay_close_to_float():
    config, params = tiny_params("tiny_gemma3")
    prompts = prompts_for([6, 21], seed=5)
    want = naive_greedy(config, params, prompts, 8)
    engine = PagedEngine(config, params, cache_dtype=np.int8, **KW)
    got = run_all(engine, prompts, 8)
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert agree >= 0.9 * sum(map(len, want)) and all(g[0] == w[0] for g, w in zip(got, want))
    assert next(iter(engine.cache.values())).k.dtype == np.int8


@pytest.mark.parametrize("shape,steps", [
    # a CPU's default: decode buckets 1 (the sampling mode chosen at run time) and 4: (1 + 3 + 2 mixed) x 2 LoRA
    (dict(), 12),
    # an accelerator's: one bucket, one executable per mode: (3 + 2 mixed) x 2 LoRA
    (dict(decode_buckets=(4,), sampling_switch=False), 10)], ids=["cpu", "accelerator"])
def test_warmup_compiles_everything_serving_uses(shape, steps):
    config, params = tiny_params("tiny_gemma3")
    engine = PagedEngine(config, params, adapter_slots=2, adapter_rank=4, **{**KW, "decode_steps": 4}, **shape)
    seen = []
    engine.warmup(progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (1, steps + 1) and seen[-1] == (steps + 1, steps + 1)
    assert engine.compile_counts()["step"] == steps
    assert sum(engine.compile_counts().values()) == steps + 1  # and the pools' initialization
    prompts = prompts_for([5, 30, 9], seed=7)
    for sampling in (GREEDY, SamplingParams(temperature=0.8, seed=1), SamplingParams(top_p=0.5, seed=2)):
        run_all(engine, prompts, 6, sampling)  # 3 sequences, then fewer as they finish: every bucket
        run_all(engine, prompts[:1], 6, sampling)  # one alone
    assert engine.compile_counts()["step"] == steps


def test_a_lone_sequence_decodes_in_the_one_row_bucket():
    config, params, _ = tiny_engine("tiny_gemma3")
    prompts = prompts_for([5, 13, 9], seed=2)
    engine = PagedEngine(config, params, **KW)
    assert engine.decode_buckets == (1, 4)  # a CPU's default
    rows = []
    dispatch = engine._dispatch
    engine._dispatch = lambda inputs, **static: (rows.append((inputs.tokens.shape[0], int(inputs.live.sum()))),
                                                 dispatch(inputs, **static))[1]
    ids = [engine.add(p, max_tokens=m, sampling=GREEDY) for p, m in zip(prompts, (3, 14, 8))]
    got = engine.run()
    want = [naive_greedy(config, params, [p], m)[0] for p, m in zip(prompts, (3, 14, 8))]
    assert [got[i] for i in ids] == want
    decode = [(t, live) for t, live in rows if t != KW["token_budget"]]
    assert all(t == (1 if live == 1 else 4) for t, live in decode)  # the smallest bucket that holds them
    assert (1, 1) in decode and any(live > 1 for _, live in decode)
    with pytest.raises(ValueError, match="decode_buckets"):
        PagedEngine(config, params, **KW, decode_buckets=(0,))


@pytest.mark.parametrize("bad", [dict(prompt=[], max_tokens=4), dict(prompt=[2, 999999], max_tokens=4),
                                 dict(prompt=[2] * 60, max_tokens=10), dict(prompt=[2, 3], max_tokens=0)])
def test_add_refuses_what_cannot_run(bad):
    config, params = tiny_params("tiny_gemma3")
    engine = PagedEngine(config, params, **KW)
    with pytest.raises((ValueError, InputTooLong)):
        engine.add(bad["prompt"], max_tokens=bad["max_tokens"])
    assert not engine.busy()


def test_sharded_over_a_mesh_equals_one_device():
    import jax

    from gemma_jax.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    config, params = tiny_params("tiny_mha")  # 4 kv heads: split over model=4
    prompts = prompts_for([5, 19, 11], seed=12)
    engine = PagedEngine(config, params, mesh=make_mesh(data=2, model=4), **{**KW, "decode_steps": 3})
    assert run_all(engine, prompts, 10) == naive_greedy(config, params, prompts, 10)
    assert len(next(iter(engine.cache.values())).k.sharding.device_set) == 8


def test_per_token_lora_and_the_prefix_cache_keep_adapters_apart():
    """Two adapters and the base model on the same prompt in one batch: each equals its merged
    weights; no page is shared across adapters, and an id reloaded with another adapter never
    matches its predecessor's pages."""
    from gemma_jax.lora import merge_lora
    from test_lora_engine import _adapter

    config, params = tiny_params("tiny_mha")  # a Gemma 1 layout: the helper's adapters say model_type "gemma"
    prompt = prompts_for([18], seed=14)[0]
    a, b = _adapter(config, 4, 1), _adapter(config, 4, 2)
    engine = PagedEngine(config, params, adapter_slots=2, adapter_rank=4, **KW)
    ids = {"a": engine.load_adapter("a", a), "b": engine.load_adapter("b", b)}
    seqs = [engine.add(prompt, 6, GREEDY, adapter) for adapter in (0, ids["a"], ids["b"])]
    got = engine.run()
    want = [naive_greedy(config, p, [prompt], 6)[0] for p in (params, merge_lora(params, a), merge_lora(params, b))]
    assert [got[s] for s in seqs] == want and want[1] != want[0]
    assert engine.stats()["prefix_hits"] == 0  # same tokens, three adapters: three prefixes
    engine.unload_adapter("a")
    c = _adapter(config, 4, 3)
    assert engine.load_adapter("c", c) == ids["a"]  # the freed id, reused
    seq = engine.add(prompt, 6, GREEDY, ids["a"])
    assert engine.run()[seq] == naive_greedy(config, merge_lora(params, c), [prompt], 6)[0]
    assert engine.stats()["prefix_hits"] == 0  # nothing of "a" was matched under "c"


def test_serve_flag_decode_buckets_reaches_the_engine(monkeypatch):
    import argparse

    from serving import cli, factory

    parse = lambda argv: cli.add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)
    assert factory.engine_options(parse(["--decode-buckets", "1,2,8"]))["decode_buckets"] == (1, 2, 8)
    assert "decode_buckets" not in factory.engine_options(parse([]))  # the engine's default
    monkeypatch.setenv("GEMMA_JAX_DECODE_BUCKETS", "2")
    assert factory.engine_options(parse([]))["decode_buckets"] == (2,)
    with pytest.raises(SystemExit):
        parse(["--decode-buckets", "one"])
