"""Engine device functions against an independent reference: the plain model, recomputed in full."""

import jax
import numpy as np
import pytest

from engine_reference import ENGINE_KW, naive_greedy, prompts_for, tiny_engine
from gemma_jax.engine.api import InputTooLong, SamplingParams, check_limits
from gemma_jax.engine.engine import Engine, run_to_completion
from gemma_jax.sharding import make_mesh

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=42, repetition_penalty=1.3,
                         frequency_penalty=0.4, presence_penalty=0.2)


@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gemma3"])
def test_greedy_batch_of_mixed_lengths_matches_full_recompute(name):
    config, params, engine = tiny_engine(name, warm=name == "tiny_gemma3")
    prompts = prompts_for([3, 9, 17, 30], seed=1)
    prompts[1] = prompts_for([5])[0]  # the prompt whose 6th greedy token is the stop id
    got = run_to_completion(engine, prompts, max_tokens=20)
    assert got == naive_greedy(config, params, prompts, 20)
    assert got[1][-1] in config.stop_ids and len(got[1]) <= 6  # stopped on <end_of_turn>
    assert all(len(g) == 20 or g[-1] in config.stop_ids for g in got)  # max_tokens honoured


def test_requests_joining_and_leaving_mid_flight_get_their_solo_tokens():
    config, params, engine = tiny_engine("tiny_gemma3", warm=True)
    prompts = prompts_for([6, 20, 11, 3, 25], seed=2)
    max_tokens = [14, 5, 9, 20, 12]
    want = [naive_greedy(config, params, [p], m)[0] for p, m in zip(prompts, max_tokens)]

    # A alone in slot 1; B and C join after two dispatches; D and E take the slots of whoever leaves.
    state = engine.init_state()
    owner, got, pending = {}, {i: [] for i in range(5)}, [1, 2, 3, 4]

    def admit(slot):
        nonlocal state
        i = pending.pop(0) if owner or got[0] else 0
        prefix = engine.prefill_prompts([prompts[i]], [GREEDY], [max_tokens[i]])
        state = engine.insert(prefix, state, engine.pad_slots([slot], prefix))
        got[i].append(int(np.asarray(prefix.tokens)[0]))
        owner[slot] = i

    def done(i):
        return got[i][-1] in config.stop_ids or len(got[i]) >= max_tokens[i]

    admit(1)
    for dispatch in range(100):
        for slot, i in list(owner.items()):
            if done(i):
                del owner[slot]
        if dispatch == 2:
            admit(3)
            admit(0)
        elif dispatch > 2:
            for slot in set(range(engine.slots)) - set(owner):
                if pending:
                    admit(slot)
        if not owner and not pending:
            break
        longest = max([len(prompts[i]) + len(got[i]) - 1 for i in owner.values()] or [0])
        state, tokens = engine.generate(state, longest)
        for row in np.asarray(tokens):
            for slot, i in owner.items():
                if row[slot] >= 0:
                    assert not done(i)  # the device stops a slot exactly where the host does
                    got[i].append(int(row[slot]))
    assert [got[i] for i in range(5)] == want


def test_seeded_sampling_is_the_same_alone_and_in_any_batch():
    config, params, engine = tiny_engine("tiny_gemma3", warm=True)
    p, q, r = prompts_for([7, 12, 25], seed=3)
    alone = run_to_completion(engine, [p], sampling=SAMPLED, max_tokens=16)[0]
    batched = run_to_completion(engine, [q, r, p], max_tokens=16,
                                sampling=[GREEDY, SamplingParams(temperature=1.0, seed=7), SAMPLED])
    assert batched[2] == alone
    assert run_to_completion(engine, [p], sampling=SAMPLED.__class__(**{**SAMPLED.__dict__, "seed": 43}),
                             max_tokens=16)[0] != alone
    assert batched[0] == naive_greedy(config, params, [q], 16)[0]  # greedy neighbour unaffected


def test_sharded_engine_on_8_devices_matches_one_device():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    config, params, engine = tiny_engine("tiny_gemma3", warm=True)
    sharded = Engine(config, params, mesh=make_mesh(data=2, model=4), **ENGINE_KW)
    leaf = sharded.params["layer_0"]["attn"]["q_einsum"]["w"]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.spec[1] == "model"  # [D, N, H]: heads split
    prompts = prompts_for([4, 13, 30, 9], seed=4)
    sampling = [GREEDY, SAMPLED, GREEDY, SamplingParams(temperature=1.2, top_k=5, seed=5)]
    want = run_to_completion(engine, prompts, sampling=sampling, max_tokens=12)
    assert run_to_completion(sharded, prompts, sampling=sampling, max_tokens=12) == want
    state = sharded.init_state()
    assert state.cache["layer_0"].k.sharding.spec[0] == "data"  # slots split; 2 kv heads replicated on 4


def test_compile_count_constant_across_50_requests_after_warmup():
    config, params, engine = tiny_engine("tiny_gemma3", warm=True)
    before, shapes = engine.compile_counts(), engine.compiled_shapes()
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, config.limits.max_input_tokens + 1, size=50).tolist()
    prompts = prompts_for(lengths, seed=5)
    for start in range(0, 50, 4):
        batch = prompts[start:start + 4]
        max_tokens = [int(rng.integers(1, 64 - len(p) + 1)) for p in batch]
        out = run_to_completion(engine, batch, max_tokens=max_tokens, sampling=SAMPLED)
        assert all(len(o) == m or o[-1] in config.stop_ids for o, m in zip(out, max_tokens))
    assert engine.compile_counts() == before
    assert engine.compiled_shapes() == shapes
    assert before["prefill"] == 3 and before["generate"] == len(engine.kv_buckets)


def test_limits_refuse_over_long_requests():
    _, _, engine = tiny_engine("tiny_gemma3", warm=True)
    assert engine.check(32, 32) == 32
    with pytest.raises(InputTooLong):
        engine.check(33, 1)  # over max input tokens
    with pytest.raises(InputTooLong):
        engine.check(30, 35)  # input + max_tokens over max total tokens
    assert engine.check(30, 35, clip=True) == 34  # cut to the room the prompt leaves: 64 - 30
    with pytest.raises(InputTooLong):
        engine.check(33, 5, clip=True)  # clipping never admits an over-long prompt
    assert check_limits(10, 5, 10, 15) == 5  # exactly at both limits
    with pytest.raises(InputTooLong):
        check_limits(10, 6, 10, 15)
    with pytest.raises(ValueError):
        check_limits(0, 5, 32, 64)  # no BOS
    with pytest.raises(ValueError):
        check_limits(3, 0, 32, 64, clip=True)  # max_tokens < 1 is an error, not clipped up
    assert engine.plan_prefill([5, 6, 20, 3], free_slots=4) == 2  # 4 x 32 would pass the budget of 64
    assert engine.plan_prefill([5, 6, 7, 3], free_slots=3) == 3  # padded to a batch of 4 x 16
    tokens, lengths = engine.pack([[2, 7], [2, 8, 9]])
    assert tokens.shape == (4, 16) and lengths.tolist() == [2, 3, 1, 1]
