"""Engine device functions against an independent reference: the plain model, recomputed in full."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_reference import ENGINE_KW, naive_greedy, prompts_for, run_to_completion, tiny_engine
from gemma_jax import lora
from gemma_jax.engine.api import InputTooLong, SamplingParams, check_limits
from gemma_jax.engine.engine import Engine, generate_steps, insert_step, prefill_step, release_step
from gemma_jax.engine.state import init_decode_state
from gemma_jax.model import forward, init_cache
from gemma_jax.sampling import MODES, mode_for, rows_from_params
from gemma_jax.sharding import make_mesh
from gemma_jax.weights.peft import adapter_from_peft
from hf_reference import random_lora_tensors

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
        state, tokens = engine.generate(state)
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
    # r alone compiles the "sampled" variant; in the batch, its top-p neighbour makes it "top_p".
    assert run_to_completion(engine, [r], sampling=SamplingParams(temperature=1.0, seed=7), max_tokens=16)[0] == batched[1]


def test_device_functions_work_without_the_engine_class():
    """prefill_step / insert_step / generate_steps / release_step, jitted by hand, on a state made
    by init_decode_state: the greedy tokens of a full recompute, in whichever slots they were put."""
    config, params, _ = tiny_engine("tiny_gemma3")
    prompts = prompts_for([5, 12], seed=6)
    tokens = np.zeros((2, 16), np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    prefill = jax.jit(prefill_step, static_argnames=("config", "cache_dtype", "use_lora", "mode"))
    prefix = prefill(params, None, tokens, lengths, rows_from_params([GREEDY] * 2), np.asarray([10, 10], np.int32),
                     np.zeros((2,), np.int32), config=config, cache_dtype=jnp.float32, use_lora=False, mode="greedy")
    state = jax.jit(insert_step)(prefix, init_decode_state(config, 3, 64), np.asarray([2, 0], np.int32))
    generate = jax.jit(generate_steps, static_argnames=("config", "steps", "use_lora", "mode"))
    got = {2: [int(prefix.tokens[0])], 0: [int(prefix.tokens[1])]}
    for _ in range(3):
        state, out = generate(params, None, state, config=config, steps=4, use_lora=False, mode="greedy")
        for row in np.asarray(out):  # [steps, B]
            assert row[1] == -1  # slot 1 was never filled
            for slot in got:
                if row[slot] >= 0:
                    got[slot].append(int(row[slot]))
    assert [got[2], got[0]] == naive_greedy(config, params, prompts, 10)
    assert np.asarray(state.live).tolist() == [False, False, False]  # both done: limit or stop token
    state = jax.jit(release_step)(state, np.asarray([True, False, False]))
    assert np.asarray(state.active).tolist() == [False, False, True]


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


@pytest.mark.parametrize("bank", [False, True], ids=["no-bank", "lora-bank"])
def test_compile_count_constant_across_50_mixed_requests_after_warmup(bank):
    """Greedy, sampled (top-k) and top-p requests, on an adapter or the base model, in every mix:
    after warmup nothing compiles, whichever variant a dispatch needs."""
    config, params, engine = tiny_engine("tiny_gemma3", warm=True)
    if bank:  # one bucket of each kind: twice the variants, so fewer shapes
        engine = Engine(config, params, **{**ENGINE_KW, "prefill_buckets": (32,), "prefill_batches": (1,)},
                        adapter_slots=2, adapter_rank=8)
        tensors = random_lora_tensors(config, 8, 0, list(lora.TARGETS), std=0.2)
        adapter = adapter_from_peft({"r": 8, "lora_alpha": 8, "target_modules": list(lora.TARGETS)}, tensors, config)
        engine.warmup()  # before the load: a load changes no shape
        engine.load_adapter("a", adapter)
    before, shapes = engine.compile_counts(), engine.compiled_shapes()
    choices = [GREEDY, SamplingParams(temperature=0.8, top_k=20, seed=1), SAMPLED]
    assert [mode_for([c]) for c in choices] == list(MODES)
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, config.limits.max_input_tokens + 1, size=50).tolist()
    prompts = prompts_for(lengths, seed=5)
    used = set()
    for start in range(0, 50, 4):
        batch = prompts[start:start + 4]
        max_tokens = [int(rng.integers(1, 64 - len(p) + 1)) for p in batch]
        # The first three batches are all of one mode (and on the base model), then any mix.
        picks = [start // 4] * len(batch) if start < 12 else rng.integers(0, 3, size=len(batch)).tolist()
        sampling = [choices[i] for i in picks]
        adapters = (rng.integers(0, 2, size=len(batch)).tolist() if start >= 12 else [0] * len(batch)) if bank else None
        used.add((mode_for(sampling), bank and any(adapters)))
        out = run_to_completion(engine, batch, max_tokens=max_tokens, sampling=sampling, adapter_ids=adapters)
        assert all(len(o) == m or o[-1] in config.stop_ids for o, m in zip(out, max_tokens))
    assert {m for m, _ in used} == set(MODES) and {a for _, a in used} == {False, bank}  # every variant ran
    assert engine.compile_counts() == before
    assert engine.compiled_shapes() == shapes
    buckets = [(1, 32)] if bank else [(1, 16), (4, 16), (1, 32)]  # (P, T) within the prefill budget
    variants = len(MODES) * (2 if bank else 1)  # sampling modes x LoRA off/on
    # prefill always samples in the widest mode: one compile per bucket and LoRA off/on
    assert before["prefill"] == len(buckets) * (2 if bank else 1) and before["insert"] == len(buckets)
    assert before["generate"] == variants  # no kv bucket: one compile per variant


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


def test_pallas_decode_kernel_in_the_engine_matches_full_recompute():
    """The engine with attention_impl="pallas_interpret" (JAX's Triton decode kernel, run by Pallas's
    interpreter on this CPU) over mixed lengths on the sliding-window Gemma 3 shape."""
    config, params, _ = tiny_engine("tiny_gemma3")
    engine = Engine(config, params, **{**ENGINE_KW, "prefill_batches": (1,)}, attention_impl="pallas_interpret")
    prompts = prompts_for([3, 21, 12], seed=8)
    assert run_to_completion(engine, prompts, max_tokens=10) == naive_greedy(config, params, prompts, 10)


def test_cpu_reduce_form_in_the_engine_matches_full_recompute(monkeypatch):
    """The XLA decode loop's "reduce" form (what this CPU runs for a large MHA batch: the 7B from 5
    rows), forced at tiny_mha's size: the engine compiles generate with its options and its greedy
    tokens equal the full recompute's, on one device and on a 2 x 4 mesh."""
    from gemma_jax import attention
    from gemma_jax.engine.engine import decode_compiler_options

    config, params, _ = tiny_engine("tiny_mha")
    assert decode_compiler_options(config, ENGINE_KW["slots"]) == {}  # "dot" at this size
    monkeypatch.setattr(attention, "REDUCE_MIN_BLOCK", 0)
    assert decode_compiler_options(config, ENGINE_KW["slots"]) == attention.compiler_options("reduce")
    assert attention.compiler_options("reduce")
    engine = Engine(config, params, **ENGINE_KW)
    prompts = prompts_for([3, 9, 17, 30], seed=12)
    want = naive_greedy(config, params, prompts, 20)
    assert run_to_completion(engine, prompts, max_tokens=20) == want
    sharded = Engine(config, params, mesh=make_mesh(data=2, model=4), **ENGINE_KW)  # slots and kv heads split
    assert run_to_completion(sharded, prompts, max_tokens=20) == want
    # Tokens of random tiny weights hardly move with attention: the logits of a cached decode, token
    # by token in this form, against the no-cache forward's at every position.
    tokens = jnp.asarray(prompts_for([24] * 3, seed=13))
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config))
    cache, got = init_cache(config, 3, 32), []
    for t in range(tokens.shape[1]):
        logits, cache = step(params, tokens[:, t:t + 1], jnp.full((3, 1), t), cache)
        got.append(logits[:, 0])
    want = forward(params, tokens, jnp.broadcast_to(jnp.arange(24), (3, 24)), None, config=config)[0]
    np.testing.assert_allclose(np.stack(got, 1), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_attention_impl_choice_and_prompt_buckets():
    config, params, _ = tiny_engine("tiny_gemma3")
    assert Engine(config, params, **ENGINE_KW).attention_impl == "xla"  # the automatic choice on a CPU
    sharded = Engine(config, params, mesh=make_mesh(data=2, model=4), **ENGINE_KW, attention_impl="xla")
    assert sharded.attention_impl == "xla"
    with pytest.raises(ValueError):
        Engine(config, params, **ENGINE_KW, attention_impl="triton")
    with pytest.raises(ValueError):  # 100 positions do not split into power-of-two blocks
        Engine(config, params, **{**ENGINE_KW, "max_len": 100}, attention_impl="pallas_gpu")
    # Default prompt buckets for the 1512-token input limit: quarter steps near the top, not 1024 -> 1536.
    wide = config.replace(limits=config.limits.__class__(max_input_tokens=1512, max_total_tokens=2048,
                                                         max_batch_prefill_tokens=4096))
    engine = Engine(wide, params, slots=2)
    assert engine.prefill_buckets == (32, 64, 128, 256, 512, 768, 1024, 1280, 1536)
    assert engine.max_input == 1512 and engine.prompt_bucket(1100) == 1280 and engine.prompt_bucket(1300) == 1536


def test_decode_step_benchmark_runs_both_forms_to_the_same_tokens(capsys):
    """benchmarks/decode_step.py (the 7B-shape CPU timing of BENCHMARKS.md) on tiny_mha: both forms
    compile, run from the same live state and draw the same greedy tokens."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "decode_step.py"
    spec = importlib.util.spec_from_file_location("decode_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--config", "tiny_mha", "--batch", "4", "--context", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "dot   :" in out and "reduce:" in out
    assert "same greedy tokens in the first dispatch: 32 of 32" in out
