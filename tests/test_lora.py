"""LoRA: PEFT adapters against peft's PeftModel, merge / un-merge, mixed-adapter batches, validation.

References: peft 0.21 (`PeftModel` logits of adapters with random non-zero A and B on all seven
projections, saved with `save_pretrained` and loaded by our loader), transformers for the base models
(random tiny Gemma 1 / Gemma 3, the real Gemma 3 270M from its GGUF), and runs of single rows alone.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import save_file

from gemma_jax import config as C
from gemma_jax import layers, lora, projections
from gemma_jax.lora import LoraError, bank_add, bank_remove, make_bank, merge_lora
from gemma_jax.model import forward, init_cache
from gemma_jax.params import param_shardings
from gemma_jax.sharding import make_mesh
from gemma_jax.weights.hf import params_from_hf_state
from gemma_jax.weights.peft import adapter_from_peft, load_adapter
from hf_reference import hf_logits, random_hf_gemma, random_hf_gemma3, random_lora_tensors, rel_err, state_numpy

ALL = list(lora.TARGETS)
_fwd = jax.jit(forward, static_argnames=("config", "kv_len"))


def bank_from_adapters(config, adapters, capacity=None, max_rank=lora.DEFAULT_MAX_RANK, dtype=jnp.float32, mesh=None,
                       rank_buckets=()):
    """A bank holding `adapters`, each in the smallest rank bucket that holds it: (bank, their ids)."""
    bank = make_bank(config, capacity or len(adapters) + 1, max_rank, dtype, mesh, rank_buckets=rank_buckets)
    free = [list(bank.bucket_ids(k)) for k in range(len(bank.ranks))]
    ids = []
    for adapter in adapters:
        ids.append(free[bank.bucket_for(adapter.rank)].pop(0))
        bank = bank_add(bank, ids[-1], adapter)
    return bank, ids


def _tokens(cfg, batch=2, length=13, seed=0):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)


def _positions(tokens):
    return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)


def _peft_adapter(hf, directory, *, r, alpha, seed, model_type="gemma", **options):
    """A PeftModel with random non-zero A and B on all seven projections, saved to `directory`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL, init_lora_weights=False, **options)
    model = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    model.save_pretrained(directory)
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["model_type"] = model_type  # Workers AI requires it; peft does not write it
    with open(path, "w") as f:
        json.dump(saved, f)
    return model


# --- against peft: tiny Gemma 1 / Gemma 3 -----------------------------------------------------------
TINY = {"mha": (C.tiny_mha(), random_hf_gemma, "gemma"), "gqa": (C.tiny_gqa(), random_hf_gemma, "gemma"),
        "gemma3": (C.tiny_gemma3(), random_hf_gemma3, "gemma3")}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    cfg, make, model_type = TINY[request.param]
    hf = make(cfg, seed=3)
    params = params_from_hf_state(state_numpy(hf), cfg)
    return cfg, hf, params, model_type


def _check_against_peft(cfg, hf, params, model_type, tmp_path, tol, tokens, **peft_options):
    ref_model = _peft_adapter(hf, tmp_path, model_type=model_type, **peft_options)
    adapter = load_adapter(tmp_path, cfg)
    ref = hf_logits(ref_model, tokens)
    assert rel_err(hf_logits(hf, tokens), ref) > 0.05  # the adapter really changes the model

    merged, _ = _fwd(merge_lora(params, adapter), tokens, _positions(tokens), config=cfg)
    bank, (index,) = bank_from_adapters(cfg, [adapter], capacity=3, max_rank=32, rank_buckets=(8, 16))
    ids = jnp.full((tokens.shape[0],), index, jnp.int32)
    unmerged, _ = _fwd(params, tokens, _positions(tokens), config=cfg, lora=(bank, ids))
    errs = rel_err(merged, ref), rel_err(unmerged, ref)
    print(f"rel-err vs peft: merged {errs[0]:.2e} unmerged {errs[1]:.2e}")
    assert errs[0] <= tol and errs[1] <= tol, errs
    return adapter


@pytest.mark.parametrize("r", [8, 32])
def test_tiny_adapter_matches_peft(tiny, tmp_path, r):
    cfg, hf, params, model_type = tiny
    adapter = _check_against_peft(cfg, hf, params, model_type, tmp_path, 1e-5, _tokens(cfg),
                                  r=r, alpha=2 * r, seed=r)
    assert adapter.rank == r and adapter.targets == tuple(ALL)
    assert len(adapter.layers) == cfg.num_layers


def test_rslora_matches_peft(tmp_path):
    cfg, make, _ = TINY["mha"]
    hf = make(cfg, seed=5)
    params = params_from_hf_state(state_numpy(hf), cfg)
    adapter = _check_against_peft(cfg, hf, params, "gemma", tmp_path, 1e-5, _tokens(cfg, seed=4),
                                  r=16, alpha=8, seed=1, use_rslora=True)
    np.testing.assert_allclose(adapter.layers["layer_0"]["q_proj"].scale, 8 / 4.0)  # alpha / sqrt(r)


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    cfg, make, _ = TINY["gqa"]
    hf = make(cfg, seed=6)
    params = params_from_hf_state(state_numpy(hf), cfg)
    adapter = _check_against_peft(
        cfg, hf, params, "gemma", tmp_path, 1e-5, _tokens(cfg, seed=5), r=8, alpha=16, seed=2,
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12}, alpha_pattern={"o_proj": 3, "up_proj": 40})
    layers = adapter.layers
    assert layers["layer_0"]["q_proj"].a.shape[-1] == 4 and layers["layer_1"]["down_proj"].a.shape[-1] == 12
    assert layers["layer_0"]["down_proj"].a.shape[-1] == 8
    np.testing.assert_allclose([layers["layer_2"]["o_proj"].scale, layers["layer_1"]["down_proj"].scale,
                                layers["layer_0"]["up_proj"].scale], [3 / 8, 16 / 12, 40 / 8])


# --- against peft: the real Gemma 3 270M -----------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3_270m(gguf_file):
    from transformers import AutoModelForCausalLM

    from gemma_jax.weights.gguf import load_gguf

    cfg, params = load_gguf(gguf_file, dtype=jnp.float32, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                              dtype=torch.float32).eval()
    return cfg, hf, params


def test_gemma3_270m_adapter_matches_peft(gemma3_270m, tmp_path):
    cfg, hf, params = gemma3_270m
    tokens = np.array([[2, 818, 5279, 529, 7001, 563, 9079, 236764, 532, 1041, 3577, 236761]], np.int32)
    _check_against_peft(cfg, hf, params, "gemma3_text", tmp_path, 1e-4, tokens, r=8, alpha=4, seed=0)


# --- mixed batches ---------------------------------------------------------------------------------
def _random_adapter(cfg, rank, seed, targets=ALL, alpha=None):
    """An Adapter with random A and B (torch layout in, like a PEFT file)."""
    tensors = random_lora_tensors(cfg, rank, seed, targets, std=0.1)
    return adapter_from_peft({"r": rank, "lora_alpha": alpha or rank, "target_modules": list(targets)}, tensors, cfg)


@pytest.fixture(scope="module")
def gqa():
    cfg = C.tiny_gqa()
    hf = random_hf_gemma(cfg, seed=11)
    return cfg, params_from_hf_state(state_numpy(hf), cfg)


def _greedy(params, cfg, tokens, steps, lora_arg=None):
    """Prefill then `steps` greedy decode steps through the cache: (prefill logits, tokens [B, steps])."""
    b, t = tokens.shape
    logits, cache = _fwd(params, tokens, _positions(tokens), init_cache(cfg, b, 32), config=cfg, lora=lora_arg)
    first = logits
    out = [jnp.argmax(logits[:, -1], -1)]
    for s in range(steps - 1):
        pos = jnp.full((b, 1), t + s, jnp.int32)
        logits, cache = _fwd(params, out[-1][:, None], pos, cache, config=cfg, kv_len=32, lora=lora_arg)
        out.append(jnp.argmax(logits[:, -1], -1))
    return np.asarray(first), np.stack([np.asarray(o) for o in out], 1)


@pytest.mark.parametrize("rank_buckets", [(), (4, 8)], ids=["one bucket (rank 32)", "buckets 4/8/32"])
def test_mixed_batch_rows_equal_rows_alone(gqa, rank_buckets):
    """A bank in one rank bucket or several gives each row of a mixed batch its own adapter's logits."""
    cfg, params = gqa
    adapters = [_random_adapter(cfg, 4, 1), _random_adapter(cfg, 8, 2, targets=["q_proj", "v_proj", "down_proj"]),
                _random_adapter(cfg, 32, 3, alpha=8)]
    bank, index = bank_from_adapters(cfg, adapters, capacity=4, max_rank=32, rank_buckets=rank_buckets)
    assert len(set(index)) == 3 and bank.ranks == (*rank_buckets, 32)
    tokens = _tokens(cfg, batch=4, length=9, seed=7)
    ids = jnp.array([0, *index], jnp.int32)
    logits, greedy = _greedy(params, cfg, tokens, 6, (bank, ids))
    for row in range(4):
        one = tokens[row:row + 1]
        alone_logits, alone_greedy = _greedy(params, cfg, one, 6, (bank, ids[row:row + 1]))
        np.testing.assert_allclose(logits[row], alone_logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(greedy[row], alone_greedy[0])
        # ... and what the row gets from a merged copy of its adapter (or the plain base model).
        merged = params if row == 0 else merge_lora(params, adapters[row - 1])
        merged_logits, _ = _fwd(merged, one, _positions(one), config=cfg)
        assert rel_err(logits[row], merged_logits[0]) <= 1e-5
        if row:
            base_logits, _ = _fwd(params, one, _positions(one), config=cfg)
            assert rel_err(logits[row], base_logits[0]) > 0.05  # adapters do change their rows


def test_lora_none_and_id_zero_are_the_base_model(gqa):
    cfg, params = gqa
    bank, _ = bank_from_adapters(cfg, [_random_adapter(cfg, 8, 4)], capacity=2, max_rank=8, rank_buckets=(4,))
    tokens = _tokens(cfg, batch=2, seed=8)
    base, _ = _fwd(params, tokens, _positions(tokens), config=cfg)
    zero, _ = _fwd(params, tokens, _positions(tokens), config=cfg, lora=(bank, jnp.zeros((2,), jnp.int32)))
    np.testing.assert_array_equal(zero, base)  # slot 0 adds exactly +0


@pytest.mark.parametrize("impl", ["ragged_dot", "dense (CPU)"])
def test_grouped_delta_equals_numpy_per_row(gqa, impl, monkeypatch):
    """`layers.lora_delta` against numpy row by row from the torch-layout tensors: random ids with
    repeats and id 0, five adapters of ranks 2..16 over three buckets, some on a few targets only;
    every target, every layer. Both per-bucket products: the rows grouped by adapter through
    `lax.ragged_dot` (what a GPU or TPU runs; forced here) and the dense form a CPU runs."""
    if impl == "ragged_dot":
        monkeypatch.setattr(layers, "_dense_delta", layers._ragged_delta)
    cfg, _ = gqa
    specs = [(2, ALL), (8, ["q_proj", "o_proj", "down_proj"]), (16, ALL), (4, ["k_proj", "up_proj"]), (12, ALL)]
    tensors = [random_lora_tensors(cfg, r, 20 + i, targets, std=0.3) for i, (r, targets) in enumerate(specs)]
    adapters = [adapter_from_peft({"r": r, "lora_alpha": 2 * r, "target_modules": targets}, t, cfg)
                for (r, targets), t in zip(specs, tensors)]
    bank, index = bank_from_adapters(cfg, adapters, capacity=3, max_rank=16, rank_buckets=(4, 8))
    assert bank.ranks == (4, 8, 16) and sorted(index) == [1, 2, 3, 5, 6]  # buckets 4: 1, 2; 8: 3; 16: 5, 6
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(adapters) + 1, 11)  # 0 = no adapter, else 1 + position in `adapters`
    rows[:2] = 0
    ids = jnp.asarray([0 if r == 0 else index[r - 1] for r in rows], jnp.int32)
    delta = jax.jit(lambda lora_arg, target, x: layers.lora_delta(lora_arg, target, x), static_argnums=1)  # traced here
    seen = 0
    for layer in range(cfg.num_layers):
        for name, target in projections.TARGETS.items():
            x = rng.normal(0, 1, (len(rows), 3, *target.in_shape(cfg))).astype(np.float32)
            got = np.asarray(delta((bank.layer(layer), ids), name, jnp.asarray(x)))
            stem = f"base_model.model.model.layers.{layer}.{'self_attn' if target.path[0] == 'attn' else 'mlp'}.{name}"
            for b, r in enumerate(rows):
                t = {} if r == 0 else tensors[r - 1]
                if f"{stem}.lora_A.weight" not in t:
                    np.testing.assert_array_equal(got[b], 0)  # no adapter here: exactly +0
                    continue
                a, bm = t[f"{stem}.lora_A.weight"].astype(np.float64), t[f"{stem}.lora_B.weight"].astype(np.float64)
                want = (x[b].reshape(3, -1) @ a.T @ bm.T * 2.0).reshape(3, *target.out_shape(cfg))
                np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
                seen += 1
    assert seen >= cfg.num_layers * 7 * 4  # most rows and targets carry a delta


def test_bank_add_remove_do_not_recompile(gqa, monkeypatch):
    cfg, params = gqa
    traces, slot_traces = [], []
    slot_impl = lora._slot_impl
    monkeypatch.setattr(lora, "_slot_impl", lambda *a: slot_traces.append(1) or slot_impl(*a))
    lora._slot_jit.cache_clear()

    @jax.jit
    def logits_of(params, bank, tokens, ids):
        traces.append(1)
        return forward(params, tokens, _positions(tokens), config=cfg, lora=(bank, ids))[0]

    tokens = _tokens(cfg, batch=3, seed=9)
    bank = make_bank(cfg, capacity=4, max_rank=16, rank_buckets=(4,))  # ids 1..3 rank 4, 4..6 rank 16
    assert bank.ranks == (4, 16) and [list(bank.bucket_ids(k)) for k in (0, 1)] == [[1, 2, 3], [4, 5, 6]]
    ids = jnp.array([4, 5, 3], jnp.int32)
    base = np.asarray(logits_of(params, bank, tokens, jnp.zeros((3,), jnp.int32)))
    np.testing.assert_array_equal(logits_of(params, bank, tokens, ids), base)  # empty slots: base model
    a, b = _random_adapter(cfg, 16, 5), _random_adapter(cfg, 4, 6, targets=["o_proj", "up_proj"])
    bank = bank_add(bank, 4, a)
    bank = bank_add(bank, 3, b)  # another bucket, other targets
    with_ab = np.asarray(logits_of(params, bank, tokens, ids))
    for row, adapter in ((0, a), (2, b)):
        alone, _ = _fwd(merge_lora(params, adapter), tokens[row:row + 1], _positions(tokens[:1]), config=cfg)
        assert rel_err(with_ab[row], alone[0]) <= 1e-5
    np.testing.assert_array_equal(with_ab[1], base[1])  # id 5 still empty
    bank = bank_remove(bank, 4)
    removed = np.asarray(logits_of(params, bank, tokens, ids))
    np.testing.assert_array_equal(removed[0], base[0])
    np.testing.assert_array_equal(removed[2], with_ab[2])  # id 3 (the other bucket) unaffected
    bank = bank_add(bank, 5, a)  # a again, in another slot
    alone, _ = _fwd(merge_lora(params, a), tokens[1:2], _positions(tokens[:1]), config=cfg)
    assert rel_err(np.asarray(logits_of(params, bank, tokens, ids))[1], alone[0]) <= 1e-5
    assert len(traces) == 1
    assert len(slot_traces) == 2  # one slot writer per bucket for every add and remove, whatever the rank
    lora._slot_jit.cache_clear()
    assert lora.bank_nbytes(cfg, 4, 16, rank_buckets=(4,)) == sum(x.nbytes for x in jax.tree.leaves(bank))


# --- merge: un-merge, dtypes, shardings -------------------------------------------------------------
def test_merge_then_unmerge_restores_params(gqa):
    cfg, params = gqa
    adapter = _random_adapter(cfg, 8, 7)
    merged = merge_lora(params, adapter)
    restored = merge_lora(merged, adapter, scale=-1.0)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    changed = 0
    for (path, p), m, r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(merged),
                               jax.tree.leaves(restored)):
        assert m.dtype == p.dtype and r.dtype == p.dtype
        np.testing.assert_allclose(r, p, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        changed += not np.array_equal(m, p)
    assert changed == 5 * cfg.num_layers  # q_einsum, kv_einsum, attn_vec_einsum, gating_einsum, linear
    assert merged["embedder"]["input_embedding"] is params["embedder"]["input_embedding"]
    # bfloat16 weights stay bfloat16 (delta added in float32, then rounded once).
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    merged16 = merge_lora(half, adapter)
    w16 = merged16["layer_0"]["attn"]["q_einsum"]["w"]
    assert w16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(w16, np.float32), np.asarray(merged["layer_0"]["attn"]["q_einsum"]["w"]),
                               rtol=2 ** -8, atol=1e-3)


def test_merge_keeps_shardings_on_a_mesh(gqa):
    cfg, params = gqa
    mesh = make_mesh(2, 4)
    shardings = param_shardings(cfg, mesh)
    placed = jax.device_put(params, shardings)
    adapter = _random_adapter(cfg, 8, 8)
    merged = merge_lora(placed, adapter)
    for m, s in zip(jax.tree.leaves(merged), jax.tree.leaves(shardings)):
        assert m.sharding == s, (m.sharding, s)
    q = merged["layer_0"]["attn"]["q_einsum"]["w"]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec[1] == "model"  # [D, N, H]: split over heads
    for m, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(merge_lora(params, adapter))):
        np.testing.assert_allclose(m, ref, rtol=1e-6, atol=1e-7)
    # A bank on the mesh is sharded like the weights it modifies, and forward runs with it.
    bank, (index,) = bank_from_adapters(cfg, [adapter], capacity=2, max_rank=8, mesh=mesh, rank_buckets=(4,))
    for bucket in bank.layers["layer_0"]["q_proj"]:
        assert bucket.b.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
    tokens = _tokens(cfg, seed=10)
    ours, _ = _fwd(placed, tokens, _positions(tokens), config=cfg, lora=(bank, jnp.full((2,), index, jnp.int32)))
    ref, _ = _fwd(merge_lora(params, adapter), tokens, _positions(tokens), config=cfg)
    assert rel_err(ours, ref) <= 1e-5


# --- validation: every refusal, with its exact message ----------------------------------------------
MHA = C.tiny_mha()
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _write(directory, config_changes=None, tensors=None, drop=(), weights_name="adapter_model.safetensors"):
    """A valid r=8 adapter on q_proj and down_proj of tiny_mha, then modified."""
    rng = np.random.default_rng(0)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
           "bias": "none", "use_dora": False, "modules_to_save": None, "model_type": "gemma"}
    cfg.update(config_changes or {})
    ts = {Q_A: rng.normal(size=(8, 64)), Q_B: rng.normal(size=(64, 8)),
          "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": rng.normal(size=(8, 128)),
          "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": rng.normal(size=(64, 8))}
    ts.update(tensors or {})
    ts = {k: np.asarray(v, np.float32) for k, v in ts.items() if k not in drop}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    if weights_name.endswith(".safetensors"):
        save_file(ts, os.path.join(directory, weights_name))
    else:
        with open(os.path.join(directory, weights_name), "wb") as f:
            f.write(b"\x80\x04not really a pickle")
    return directory


def _error(source, config=MHA, **kwargs) -> str:
    with pytest.raises(LoraError) as e:
        load_adapter(source, config, **kwargs)
    return str(e.value)


def test_valid_adapter_loads_from_directory_or_files(tmp_path):
    d = _write(tmp_path)
    adapter = load_adapter(d, MHA)
    files = load_adapter((d / "adapter_model.safetensors", d / "adapter_config.json"), MHA)
    assert adapter.targets == ("q_proj", "down_proj") == files.targets
    assert set(adapter.layers) == {"layer_0", "layer_1"} and adapter.rank == 8
    assert adapter.layers["layer_0"]["q_proj"].a.shape == (64, 8)
    assert adapter.layers["layer_0"]["q_proj"].b.shape == (8, 4, 16)
    assert adapter.layers["layer_1"]["down_proj"].a.shape == (128, 8)
    assert float(adapter.layers["layer_0"]["q_proj"].scale) == 2.0


def test_refuses_pickle_files(tmp_path):
    d = _write(tmp_path, weights_name="adapter_model.bin")
    msg = "adapter weights must be a .safetensors file, refusing 'adapter_model.bin' (pickle-based files are never loaded)"
    assert _error(d) == msg
    assert _error((d / "adapter_config.json", d / "adapter_model.bin")) == msg


def test_refuses_missing_files(tmp_path):
    d = _write(tmp_path)
    os.remove(d / "adapter_config.json")
    assert _error(d) == f"missing adapter_config.json in {d}"
    e = tmp_path / "empty"
    e.mkdir()
    assert _error(e) == f"missing adapter_model.safetensors in {e}"
    assert _error(tmp_path / "nope") == f"adapter directory {tmp_path / 'nope'} does not exist"
    bad = _write(tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    try:
        json.loads("{not json")
    except json.JSONDecodeError as je:
        assert _error(bad) == f"adapter_config.json is not valid JSON: {je}"


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "unsupported peft_type 'IA3': only LoRA adapters ('LORA') are supported"),
    ({"use_dora": True}, "DoRA adapters (use_dora: true) are not supported"),
    ({"bias": "lora_only"}, "bias 'lora_only' is not supported: only adapters with bias 'none'"),
    ({"modules_to_save": ["lm_head"]},
     "modules_to_save is not supported (got ['lm_head']): an adapter may only carry LoRA deltas"),
    ({"fan_in_fan_out": True}, "unsupported adapter option fan_in_fan_out=True"),
    ({"layer_replication": [[0, 2]]}, "unsupported adapter option layer_replication=[[0, 2]]"),
    ({"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
     "unknown target module(s) ['embed_tokens', 'lm_head']: supported are "
     "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ({"r": 64}, "adapter rank r=64 exceeds the maximum rank 32"),
    ({"rank_pattern": {"q_proj": 40}}, "adapter rank rank_pattern['q_proj']=40 exceeds the maximum rank 32"),
    ({"r": 0}, "adapter rank r must be a positive integer, got 0"),
    ({"lora_alpha": "16"}, "adapter lora_alpha must be a number, got '16'"),
    ({"rank_pattern": {"q_proj(": 4}}, "invalid rank_pattern / alpha_pattern key 'q_proj(': "
                                      "missing ), unterminated subpattern at position 7"),
    ({"model_type": "gemma3"}, "adapter model_type 'gemma3' does not match the base model (expected 'gemma')"),
    ({"model_type": "llama"}, "adapter model_type 'llama' does not match the base model (expected 'gemma')"),
])
def test_refuses_config(tmp_path, changes, message):
    assert _error(_write(tmp_path, changes)) == message


def test_model_type_checks(tmp_path):
    g3 = _write(tmp_path / "a", {"model_type": "gemma"})
    assert _error(g3, C.tiny_gemma3()) == \
        "adapter model_type 'gemma' does not match the base model (expected 'gemma3' or 'gemma3_text')"
    d = _write(tmp_path / "b", {"model_type": None})
    assert load_adapter(d, MHA).rank == 8  # absent: accepted unless required
    assert _error(d, require_model_type=True) == "adapter_config.json must give model_type ('gemma')"


def test_rank_limit_is_configurable(tmp_path):
    d = _write(tmp_path)
    assert _error(d, max_rank=4) == "adapter rank r=8 exceeds the maximum rank 4"
    assert load_adapter(d, MHA, max_rank=8).rank == 8


@pytest.mark.parametrize("tensors, drop, message", [
    ({Q_A: np.zeros((8, 32))}, (), "layer 0 q_proj: lora_A has shape (8, 32), the base model needs (8, 64)"),
    ({Q_B: np.zeros((48, 8))}, (), "layer 0 q_proj: lora_B has shape (48, 8), the base model needs (64, 8)"),
    ({Q_A: np.zeros((4, 64)), Q_B: np.zeros((64, 4))}, (),
     "layer 0 q_proj: lora_A (4, 64) / lora_B (64, 4) do not have the adapter's rank 8"),
    ({}, (Q_B,), "base_model.model.model.layers.0.self_attn.q_proj: lora_B.weight is missing"),
    ({"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.zeros((8, 64))}, (),
     "tensor 'base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight' is for layer 5 "
     "but the base model has 2 layers"),
    ({"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": np.zeros((8, 64))}, (),
     "unknown target module 'qkv_proj' in tensor 'base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight': "
     "supported are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 512))}, (),
     "unexpected tensor 'base_model.model.model.embed_tokens.lora_embedding_A' in the adapter"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.zeros((64,))}, (),
     "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector' in the adapter"),
    ({}, (Q_A, Q_B, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
          "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"), "the adapter has no LoRA tensors"),
])
def test_refuses_tensors(tmp_path, tensors, drop, message):
    assert _error(_write(tmp_path, tensors=tensors, drop=drop)) == message


def test_gemma3_keys_and_shape_mismatch(tmp_path):
    """An adapter trained on Gemma3ForConditionalGeneration (language_model prefix) loads; a Gemma-1
    adapter's shapes do not fit a Gemma 3 base model."""
    g3 = C.tiny_gemma3()
    rng = np.random.default_rng(1)
    prefix = "base_model.model.model.language_model.layers.2.self_attn.k_proj"
    d = _write(tmp_path / "a", {"model_type": "gemma3"}, drop=(Q_A, Q_B, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
                                                           "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
               tensors={f"{prefix}.lora_A.weight": rng.normal(size=(8, 64)),
                        f"{prefix}.lora_B.weight": rng.normal(size=(64, 8))})
    adapter = load_adapter(d, g3)
    assert adapter.targets == ("k_proj",) and list(adapter.layers) == ["layer_2"]
    assert adapter.layers["layer_2"]["k_proj"].b.shape == (8, 2, 32)
    d = _write(tmp_path / "b", {"model_type": "gemma3"})
    assert _error(d, g3) == "layer 0 q_proj: lora_B has shape (64, 8), the base model needs (128, 8)"


def test_bank_and_merge_errors(gqa):
    cfg, params = gqa
    bank = make_bank(cfg, capacity=4, max_rank=8, targets=["q_proj", "v_proj"])
    small = _random_adapter(cfg, 4, 1, targets=["q_proj"])
    with pytest.raises(LoraError) as e:
        bank_add(bank, 0, small)
    assert str(e.value) == "adapter slot 0 is out of range: slots 1..3 hold adapters (slot 0 means no adapter)"
    with pytest.raises(LoraError) as e:
        bank_remove(bank, 4)
    assert str(e.value) == "adapter slot 4 is out of range: slots 1..3 hold adapters (slot 0 means no adapter)"
    with pytest.raises(LoraError) as e:
        bank_add(bank, 1, _random_adapter(cfg, 16, 1, targets=["q_proj"]))
    assert str(e.value) == "adapter rank 16 exceeds the bank's maximum rank 8"
    bucketed = make_bank(cfg, capacity=2, max_rank=8, targets=["q_proj"], rank_buckets=(4, 8, 64))
    assert bucketed.ranks == (4, 8) and bucketed.num_ids == 2
    with pytest.raises(LoraError) as e:
        bank_add(bucketed, 1, _random_adapter(cfg, 8, 1, targets=["q_proj"]))
    assert str(e.value) == "adapter rank 8 exceeds the rank 4 of the bucket of adapter id 1"
    with pytest.raises(LoraError) as e:
        make_bank(cfg, capacity=2, max_rank=8, rank_buckets=(0, 4))
    assert str(e.value) == "LoRA ranks must be >= 1, got max_rank 8 and rank buckets [0, 4]"
    with pytest.raises(LoraError) as e:
        bank_add(bank, 1, _random_adapter(cfg, 4, 1, targets=["q_proj", "down_proj"]))
    assert str(e.value) == "the bank has no room for target module(s) ['down_proj'] (bank targets: q_proj, v_proj)"
    with pytest.raises(LoraError) as e:
        bank_add(bank, 1, _random_adapter(MHA, 4, 1, targets=["q_proj"]))
    assert str(e.value) == "the adapter was built for a different base model than the bank's"
    with pytest.raises(LoraError) as e:
        make_bank(cfg, capacity=2, targets=["q_proj", "lm_head"])
    assert str(e.value) == ("unknown target module(s) ['lm_head']: supported are "
                            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    mha_params = params_from_hf_state(state_numpy(random_hf_gemma(MHA)), MHA)
    with pytest.raises(LoraError) as e:
        merge_lora(mha_params, small)
    assert str(e.value) == "layer_0/attn/q_einsum/w has shape (64, 4, 16), the adapter's base model needs (48, 8, 32)"
    assert isinstance(e.value, ValueError)
