"""LoRA in the engine: adapters loaded and unloaded while requests run, against merged-weight references.

Reference for a request on adapter X: `naive_greedy` (full recompute, plain model, no cache) on the
params with X merged by `merge_lora`; the engine instead runs the unmerged bank with per-slot ids.
"""

import json
import re

import jax
import numpy as np
from jax import export
import pytest
from safetensors.numpy import save_file

from engine_reference import naive_greedy, prompts_for, tiny_params
from gemma_jax import lora, projections
from gemma_jax.engine.api import SamplingParams, UnknownAdapter
from gemma_jax.engine.engine import Engine, generate_steps
from gemma_jax.engine.state import init_decode_state
from gemma_jax.lora import LoraError, merge_lora
from gemma_jax.weights.peft import adapter_from_peft
from hf_reference import random_lora_tensors

GREEDY = SamplingParams(temperature=0.0)
# One bucket of each kind (prompts <= 32 tokens, one prompt per prefill, 64 cache positions): few compiles.
ENGINE_KW = dict(slots=4, prefill_buckets=(32,), prefill_batches=(1,), steps_per_call=4)
ALL = list(lora.TARGETS)


def _adapter(cfg, rank, seed, targets=ALL, directory=None):
    """A random adapter (an Adapter, or written as PEFT files into `directory`, which is returned)."""
    tensors = random_lora_tensors(cfg, rank, seed, targets, std=0.2)
    adapter_config = {"r": rank, "lora_alpha": rank, "target_modules": list(targets), "model_type": "gemma"}
    if directory is None:
        return adapter_from_peft(adapter_config, tensors, cfg)
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


class _Driver:
    """Admits requests into slots and collects their greedy tokens, dispatch by dispatch."""

    def __init__(self, engine):
        self.engine, self.state = engine, engine.init_state()
        self.owner, self.got, self.limit = {}, {}, {}

    def admit(self, key, slot, prompt, max_tokens, adapter=None):
        ids = [0 if adapter is None else self.engine.adapter_id(adapter)]
        prefix = self.engine.prefill_prompts([prompt], [GREEDY], [max_tokens], ids)
        self.state = self.engine.insert(prefix, self.state, self.engine.pad_slots([slot], prefix))
        self.owner[slot], self.got[key], self.limit[key] = key, [int(np.asarray(prefix.tokens)[0])], max_tokens

    def done(self, key):
        g = self.got[key]
        return len(g) >= self.limit[key] or g[-1] in self.engine.config.stop_ids

    def dispatch(self):
        self.state, tokens = self.engine.generate(self.state)
        for k_tokens in np.asarray(tokens):
            for slot, key in self.owner.items():
                if k_tokens[slot] >= 0 and not self.done(key):
                    self.got[key].append(int(k_tokens[slot]))
        self.owner = {s: k for s, k in self.owner.items() if not self.done(k)}


def test_adapters_hot_loaded_and_unloaded_while_requests_run(tmp_path):
    cfg, params = tiny_params("tiny_mha")
    engine = Engine(cfg, params, **ENGINE_KW, adapter_slots=2, adapter_rank=16, adapter_rank_buckets=(8,))
    assert engine.bank.ranks == (8, 16)  # ids 1, 2: rank 8; ids 3, 4: rank 16
    engine.warmup()
    compiled = engine.compile_counts()
    a, b, c, d = _adapter(cfg, 16, 1), _adapter(cfg, 4, 2, ["q_proj", "down_proj"]), _adapter(cfg, 12, 3), _adapter(cfg, 9, 4)
    prompts = prompts_for([7, 12, 5, 9, 20], seed=3)
    budget = [12, 14, 10, 8, 6]

    drive = _Driver(engine)
    assert engine.load_adapter("a", a) == 3
    drive.admit("base", 0, prompts[0], budget[0])
    drive.admit("on_a", 1, prompts[1], budget[1], "a")
    drive.dispatch()
    assert engine.load_adapter("b", b) == 1  # hot add while two requests run; rank 4: the rank-8 bucket
    drive.admit("on_b", 2, prompts[2], budget[2], "b")
    drive.dispatch()
    engine.unload_adapter("a")  # "on_a" is still running: its slot keeps A until reused
    with pytest.raises(UnknownAdapter) as e:
        engine.adapter_id("a")
    assert str(e.value) == "no LoRA adapter named 'a' is loaded"
    assert engine.load_adapter("c", c) == 4  # never-used slot of the rank-16 bucket first
    drive.admit("on_c", 3, prompts[3], budget[3], "c")
    with pytest.raises(LoraError) as e:
        engine.load_adapter("d", d)  # the rank-8 bucket has a free slot, but 2 adapters are loaded
    assert str(e.value) == "the adapter bank is full (2 adapters loaded)"
    while "on_a" in drive.owner.values():
        drive.dispatch()
    engine.unload_adapter("b")  # "on_b" still running
    assert engine.load_adapter("d", d) == 3  # A's slot, reused once free
    free = next(s for s in range(engine.slots) if s not in drive.owner)
    drive.admit("on_d", free, prompts[4], budget[4], "d")
    while drive.owner:
        drive.dispatch()

    assert engine.compile_counts() == compiled  # no recompilation for any of it
    assert engine.adapters() == {"c": 4, "d": 3}
    want = {
        "base": naive_greedy(cfg, params, [prompts[0]], budget[0])[0],
        "on_a": naive_greedy(cfg, merge_lora(params, a), [prompts[1]], budget[1])[0],
        "on_b": naive_greedy(cfg, merge_lora(params, b), [prompts[2]], budget[2])[0],
        "on_c": naive_greedy(cfg, merge_lora(params, c), [prompts[3]], budget[3])[0],
        "on_d": naive_greedy(cfg, merge_lora(params, d), [prompts[4]], budget[4])[0],
    }
    assert drive.got == want
    plain = naive_greedy(cfg, params, prompts[1:4], 10)
    assert sum(w[:10] != p for w, p in zip([want["on_a"], want["on_b"], want["on_c"]], plain)) >= 2  # adapters matter


def test_engine_adapter_errors(tmp_path):
    cfg, params = tiny_params("tiny_mha")
    engine = Engine(cfg, params, **ENGINE_KW, adapter_slots=1, adapter_rank=8)
    with pytest.raises(LoraError) as e:
        engine.load_adapter("big", _adapter(cfg, 16, 1))
    assert str(e.value) == "adapter rank 16 exceeds the bank's maximum rank 8"
    assert engine.adapters() == {}  # a refused adapter takes no slot
    assert engine.load_adapter("x", _adapter(cfg, 8, 1, directory=tmp_path / "x")) == 1  # from PEFT files
    np.testing.assert_array_equal(engine.bank.layer(0)["q_proj"][0].a[1], _adapter(cfg, 8, 1).layers["layer_0"]["q_proj"].a)
    with pytest.raises(LoraError) as e:
        engine.load_adapter("x", _adapter(cfg, 8, 2))
    assert str(e.value) == "an adapter named 'x' is already loaded"
    with pytest.raises(LoraError) as e:
        engine.load_adapter("y", _adapter(cfg, 8, 2))
    assert str(e.value) == "the adapter bank is full (1 adapters loaded)"
    with pytest.raises(UnknownAdapter) as e:
        engine.unload_adapter("y")
    assert str(e.value) == "no LoRA adapter named 'y' is loaded"
    with pytest.raises(LoraError) as e:
        Engine(cfg, params, **ENGINE_KW).load_adapter("x", _adapter(cfg, 8, 1))
    assert str(e.value) == "this engine has no adapter bank (adapter_slots=0)"
    assert Engine(cfg, params, **ENGINE_KW, adapter_slots=1, adapter_rank=32).bank.ranks == (32,)  # CPU default
    assert lora.default_rank_buckets("gpu") == lora.default_rank_buckets("tpu") == (8, 16)
    bucketed = Engine(cfg, params, **ENGINE_KW, adapter_slots=1, adapter_rank=16, adapter_rank_buckets=(8, 32))
    assert bucketed.bank.ranks == (8, 16) and bucketed.load_adapter("r16", _adapter(cfg, 16, 3)) == 2
    with pytest.raises(LoraError) as e:
        bucketed.load_adapter("r32", _adapter(cfg, 32, 3))
    assert str(e.value) == "the adapter bank is full (1 adapters loaded)"
    bucketed.unload_adapter("r16")
    with pytest.raises(LoraError) as e:
        bucketed.load_adapter("r32", _adapter(cfg, 32, 3))
    assert str(e.value) == "adapter rank 32 exceeds the bank's maximum rank 16"
    assert bucketed.load_adapter("r2", _adapter(cfg, 2, 3)) == 1 and bucketed.adapters() == {"r2": 1}


def _per_row_weight_shapes(cfg, batch, ranks, sep=","):
    """Shapes "B,in...,R" / "B,R,out..." of a per-row copy of some bank weight (HLO text: sep ",")."""
    shapes = set()
    for target in projections.TARGETS.values():
        for r in ranks:
            shapes.add(sep.join(map(str, (batch, *target.in_shape(cfg), r))))
            shapes.add(sep.join(map(str, (batch, r, *target.out_shape(cfg)))))
    return shapes


def test_compiled_decode_with_a_bank_has_no_per_row_weight_copy_and_no_conditional():
    """The decode dispatch with LoRA on, compiled for this CPU: no `conditional`, and no array shaped
    like a per-row copy of a bank weight ([B, *in, R] or [B, R, *out]), with more bank slots than rows
    (where the old per-row path gathered one)."""
    cfg, params = tiny_params("tiny_mha")
    batch = 2
    bank = lora.make_bank(cfg, 4, 16, rank_buckets=(8,))
    state = init_decode_state(cfg, batch, 64)
    generate = jax.jit(generate_steps, static_argnames=("config", "steps", "use_lora", "mode"))
    hlo = generate.lower(params, bank, state, config=cfg, steps=2, use_lora=True,
                         mode="greedy").compile().as_text()
    assert not re.search(r"\bconditional\(", hlo)
    shapes = set(re.findall(r"\[([\d,]+)\]", hlo))
    assert ",".join(map(str, (4, cfg.embed_dim, 8))) in shapes  # the bank is there: the reader sees shapes
    assert shapes & _per_row_weight_shapes(cfg, batch, bank.ranks) == set()


def test_decode_lowered_for_a_gpu_groups_rows_with_ragged_dot():
    """The same decode dispatch lowered for CUDA on this CPU (`jax.export`, nothing compiled): every
    LoRA product is a `chlo.ragged_dot` (2 per target, bucket and layer: shrink and expand), the only
    sort is of the B adapter ids, and no per-row copy of a bank weight exists."""
    cfg, params = tiny_params("tiny_mha")
    batch = 2
    bank = lora.make_bank(cfg, 4, 16, rank_buckets=(8,))
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    state = jax.eval_shape(lambda: init_decode_state(cfg, batch, 64))
    generate = jax.jit(lambda p, b, s: generate_steps(p, b, s, config=cfg, steps=2, use_lora=True, mode="greedy"))
    text = export.export(generate, platforms=("cuda",))(abstract(params), abstract(bank), state).mlir_module()
    assert text.count('"chlo.ragged_dot"') == 2 * 7 * len(bank.ranks) * cfg.num_layers
    sorted_shapes = re.findall(r'"stablehlo\.sort"\(.*?\}\) : \(tensor<([\dx]+)x', text, re.DOTALL)  # operand shapes
    assert sorted_shapes and set(sorted_shapes) == {str(batch)}
    shapes = set(re.findall(r"tensor<([\dx]+)x(?:f32|bf16|i32)>", text))
    assert f"4x{cfg.embed_dim}x8" in shapes  # the bank is there: the reader sees shapes
    assert shapes & _per_row_weight_shapes(cfg, batch, bank.ranks, sep="x") == set()
