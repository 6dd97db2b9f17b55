"""int8 weight-only quantization (`gemma_jax/quantize.py`) against numpy by hand.

The references are independent of `quantize.py`: scales and int8 values recomputed with numpy from
the float weights and the projections' declared input axes; a quantized model is compared with the
plain float model run on weights dequantized by numpy (w_int8 * scale), which is what quantization
promises to compute, up to float rounding.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_reference import ENGINE_KW, TEST_LIMITS, naive_greedy, prompts_for, run_to_completion
from gemma_jax import config as C
from gemma_jax import lora as lora_lib
from gemma_jax import params as P
from gemma_jax import projections as proj
from gemma_jax import quantize as Q
from gemma_jax.engine.engine import Engine
from gemma_jax.model import forward, init_cache
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import native
from test_checkpoints import _tiny_spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy_quantize(w: np.ndarray, contracted: tuple[int, ...]):
    """Symmetric int8 by hand: scale = max |w| over the contracted axes / 127 (keepdims)."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=contracted, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.clip(np.round(w / np.where(scale > 0, scale, 1)), -127, 127).astype(np.int8)
    return q, scale


def _numpy_quantize_with(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values of w for given (keepdims) scales: clip(round(w / scale), -127, 127)."""
    return np.clip(np.round(np.asarray(w, np.float32) / np.where(scale > 0, scale, 1)), -127, 127).astype(np.int8)


def _numpy_dequantized(qparams):
    """The float tree a quantized tree stands for, dequantized by numpy (w_int8 * scale, float32)."""
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x.w, np.float32) * np.asarray(x.scale, np.float32)) if Q.is_qarray(x)
        else x, qparams, is_leaf=Q.is_qarray)


def _tiny(name):
    config = getattr(C, name)().replace(limits=TEST_LIMITS)
    return config, P.init_params(config, jax.random.key(1, impl="unsafe_rbg"))


# --- one array -----------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", proj.PROJECTIONS, ids=lambda p: p.name)
def test_quantize_array_equals_numpy_per_output_channel(projection):
    config = C.tiny_gqa()
    shape = projection.shape(config)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3, size=shape[len(projection.ins):])
    w[(slice(None),) * len(projection.ins) + (0,) * (len(shape) - len(projection.ins))] = 0  # an all-zero channel
    contracted = tuple(range(len(projection.ins)))  # the declared input axes come first
    q = Q.quantize_array(jnp.asarray(w), contracted)
    want_q, want_scale = _numpy_quantize(w, contracted)
    assert q.w.dtype == jnp.int8 and q.scale.dtype == jnp.float32
    assert q.scale.shape == tuple(1 if i in contracted else n for i, n in enumerate(shape))
    # XLA divides by 127 as a multiply by 1/127: the scale may be one float32 ulp off numpy's
    np.testing.assert_allclose(np.asarray(q.scale), want_scale, rtol=2.5e-7, atol=0)
    scale = np.asarray(q.scale)
    np.testing.assert_array_equal(np.asarray(q.w), _numpy_quantize_with(w, scale))
    assert (np.asarray(q.w) != want_q).mean() < 0.01  # with numpy's own scale: the same but for rare ties
    err = np.abs(w - np.asarray(q.w, np.float32) * scale)
    assert (err <= scale / 2 * (1 + 1e-6)).all(), err.max()
    assert np.abs(np.asarray(q.w)).max() == 127  # each non-zero channel's largest weight maps to +-127
    assert (np.asarray(q.w)[(slice(None),) * len(contracted) + (0,) * (len(shape) - len(contracted))] == 0).all()
    np.testing.assert_allclose(np.asarray(Q.dequantize(q)), np.asarray(q.w, np.float32) * scale, rtol=0, atol=0)


def test_bfloat16_scales_round_with_the_stored_scale():
    """With bf16 scales the rounding uses the scale as stored: the error stays within about half of it."""
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    q = Q.quantize_array(jnp.asarray(w), (0,), jnp.bfloat16)
    assert q.scale.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
    scale = np.asarray(q.scale, np.float32)
    err = np.abs(w - np.asarray(q.w, np.float32) * scale)
    assert (err <= scale * 0.5 * (1 + 2 ** -6)).all()


def test_quantize_params_tree_layout():
    """Every projection and the embedding become QArrays in place, norms stay float, scales are per
    output channel (embedding: per vocabulary row), and the bytes shrink as they should."""
    config, params = _tiny("tiny_gemma3")
    qp = Q.quantize_params(params, config)
    flat, qflat = P.flatten(params), P.flatten(Q.as_dicts(qp))
    quantized = {("embedder", "input_embedding"): (1,)}
    for i in range(config.num_layers):
        for p in proj.PROJECTIONS:
            quantized[(f"layer_{i}", *p.path)] = tuple(range(len(p.ins)))
    for path, w in flat.items():
        if path in quantized:
            _, want_scale = _numpy_quantize(np.asarray(w), quantized[path])
            scale = np.asarray(qflat[(*path, "scale")])
            np.testing.assert_allclose(scale, want_scale, rtol=2.5e-7, atol=0, err_msg=str(path))
            np.testing.assert_array_equal(np.asarray(qflat[(*path, "w")]), _numpy_quantize_with(np.asarray(w), scale),
                                          err_msg=str(path))
        else:
            assert path[-1] == "scale" and "norm" in path[-2], path
            np.testing.assert_array_equal(np.asarray(qflat[path]), np.asarray(w))
    assert set(qflat) == {(*p, "w") for p in quantized} | {(*p, "scale") for p in quantized} | (set(flat) - set(quantized))
    assert P.is_quantized(qp) and not P.is_quantized(params)
    # shapes and axes declared for the quantized tree are what quantize_params makes
    assert jax.tree.map(lambda x: (x.shape, x.dtype), P.param_shapes(config, quantized=True)) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), qp)
    assert P.param_axes(config, quantized=True)["embedder"]["input_embedding"] == Q.QArray(("vocab", "embed"), ("vocab", None))
    # bytes: float32 -> 1 byte per quantized weight, plus float32 scales and the float norms
    norms = sum(np.asarray(w).nbytes for p, w in flat.items() if p not in quantized)
    scales = sum(4 * np.asarray(qflat[(*p, "scale")]).size for p in quantized)
    weights = sum(np.asarray(flat[p]).size for p in quantized)
    assert Q.tree_bytes(qp) == weights + scales + norms
    # without a config, the layers are the tree's own
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(Q.quantize_params(params)), jax.tree.leaves(qp)))
    # idempotent: an already quantized tree stays as it is
    again = Q.quantize_params(qp, config)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(qp)))


# --- the model on quantized weights ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_mha", "tiny_mqa", "tiny_gemma3"])
def test_quantized_forward_equals_float_forward_on_dequantized_weights(name):
    config, params = _tiny(name)
    qp = Q.quantize_params(params, config)
    deq = _numpy_dequantized(qp)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    run = jax.jit(lambda p, t, pos: forward(p, t, pos, None, config=config)[0])
    got, want = np.asarray(run(qp, tokens, positions)), np.asarray(run(deq, tokens, positions))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and it is a different model from the float one it came from (the test would catch a no-op)
    orig = np.asarray(run(params, tokens, positions))
    assert np.abs(orig - want).max() > 1e-4 * np.abs(want).max()

    # with a KV cache: prefill then one decode step, as the engine runs it
    cache = init_cache(config, 2, 16)
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config))
    lq, cq = step(qp, tokens[:, :10], positions[:, :10], cache)
    ld, cd = step(deq, tokens[:, :10], positions[:, :10], cache)
    lq, _ = step(qp, tokens[:, 10:], positions[:, 10:], cq)
    ld, _ = step(deq, tokens[:, 10:], positions[:, 10:], cd)
    np.testing.assert_allclose(np.asarray(lq), np.asarray(ld), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(ld)).max())


def test_bfloat16_quantized_forward_computes_in_bfloat16():
    config, params = _tiny("tiny_gemma3")
    qp = Q.quantize_params(params, config, jnp.bfloat16)
    assert qp["embedder"]["input_embedding"].dtype == jnp.bfloat16  # what forward computes in
    assert qp["final_norm"]["scale"].dtype == jnp.bfloat16
    deq = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _numpy_dequantized(qp))
    tokens = jnp.asarray([[2, 17, 300, 45, 9, 101, 7]], jnp.int32)
    positions = jnp.arange(7)[None]
    got = np.asarray(forward(qp, tokens, positions, config=config)[0])
    want = np.asarray(forward(deq, tokens, positions, config=config)[0])
    ref32 = np.asarray(forward(_numpy_dequantized(qp), tokens, positions, config=config)[0])
    # bf16 compute: both are bf16 roundings of the same float32 model, equally close to it
    assert np.abs(got - ref32).max() <= 2 * np.abs(want - ref32).max() + 1e-6


# --- the engine --------------------------------------------------------------------------------------
def _greedy_config(config, params):
    """A stop id that greedy decoding draws, so stops are exercised (as engine_reference does)."""
    probe = naive_greedy(config.replace(eos_id=-1, end_of_turn_id=-1), params, prompts_for([5]), 8)[0]
    return config.replace(end_of_turn_id=probe[5])


@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gemma3"])
def test_engine_serves_a_quantized_model_like_the_dequantized_float_model(name):
    config, params = _tiny(name)
    qp = Q.quantize_params(params, config)
    deq = _numpy_dequantized(qp)
    config = _greedy_config(config, deq)
    prompts = prompts_for([5, 12, 20, 31], seed=3)
    engine = Engine(config, qp, **ENGINE_KW)
    assert engine.cache_dtype == jnp.float32
    got = run_to_completion(engine, prompts, max_tokens=20)
    assert got == naive_greedy(config, deq, prompts, 20)


def test_lora_on_a_quantized_model_equals_merged_lora_on_the_dequantized_model():
    config, params = _tiny("tiny_gemma3")
    qp = Q.quantize_params(params, config)
    deq = _numpy_dequantized(qp)
    rng = np.random.default_rng(5)
    weights = {}
    for layer in range(config.num_layers):
        for name, t in proj.TARGETS.items():
            a = rng.standard_normal((4, t.in_features(config))).astype(np.float32) * 0.3
            b = rng.standard_normal((t.out_features(config), 4)).astype(np.float32) * 0.3
            weights[(layer, name)] = (a, b, 2.0)
    adapter = lora_lib.adapter_from_torch(config, weights)
    merged = lora_lib.merge_lora(deq, adapter)
    config = _greedy_config(config, merged)
    adapter = adapter.replace(config=config)  # the engine's config (its stop id) is the adapter's base
    prompts = prompts_for([6, 17], seed=9)
    engine = Engine(config, qp, adapter_slots=2, adapter_rank=8, **ENGINE_KW)
    aid = engine.load_adapter("a", adapter)
    got = run_to_completion(engine, prompts, max_tokens=16, adapter_ids=[aid, 0])
    assert got[0] == naive_greedy(config, merged, prompts[:1], 16)[0]
    assert got[1] == naive_greedy(config, deq, prompts[1:], 16)[0]
    assert got[0] != got[1] or prompts[0] == prompts[1]


def test_sharded_quantized_engine_on_8_devices():
    assert len(jax.devices()) == 8
    config, params = _tiny("tiny_mha")  # 4 heads, 4 kv heads: shards over "model"
    qp = Q.quantize_params(params, config)
    deq = _numpy_dequantized(qp)
    config = _greedy_config(config, deq)
    mesh = make_mesh(2, 4)
    engine = Engine(config, qp, mesh=mesh, **ENGINE_KW)
    want = P.param_shardings(config, mesh, quantized=True)
    q_w = engine.params["layer_0"]["attn"]["q_einsum"]["w"]
    assert q_w.w.sharding.spec == want["layer_0"]["attn"]["q_einsum"]["w"].w.spec
    assert q_w.scale.sharding.spec == want["layer_0"]["attn"]["q_einsum"]["w"].scale.spec
    assert "model" in tuple(q_w.w.sharding.spec) and "model" in tuple(q_w.scale.sharding.spec)
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
               zip(jax.tree.leaves(engine.params), jax.tree.leaves(want)))
    prompts = prompts_for([7, 25, 13, 30], seed=4)
    got = run_to_completion(engine, prompts, max_tokens=16)
    assert got == naive_greedy(config, deq, prompts, 16)


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_checkpoint_roundtrip(tmp_path, dtype):
    config, params = _tiny("tiny_gemma3")
    qp = Q.quantize_params(params, config, jnp.dtype(dtype))
    path = native.save_checkpoint(tmp_path / "q", config, qp)
    assert native.read_quantization(path) == "int8"
    loaded_config, loaded, _ = native.load_checkpoint(path)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(qp)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qp)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    # into a mesh, the scales (compute dtype) cast on restore; the int8 weights are never cast
    mesh = make_mesh(2, 4)
    _, on_mesh, _ = native.load_checkpoint(path, dtype="float32", mesh=mesh)
    emb = on_mesh["embedder"]["input_embedding"]
    assert emb.w.dtype == jnp.int8 and emb.scale.dtype == jnp.float32 and emb.dtype == jnp.float32
    assert emb.w.sharding.spec == P.param_shardings(config, mesh, quantized=True)["embedder"]["input_embedding"].w.spec
    tokens = jnp.asarray([[2, 40, 7, 300, 11]], jnp.int32)
    logits = lambda p: np.asarray(forward(p, tokens, jnp.arange(5)[None], config=config)[0])
    np.testing.assert_allclose(logits(on_mesh), logits(_numpy_dequantized(qp)), rtol=1e-5, atol=1e-5)
    # a float checkpoint is not a quantized one
    float_path = native.save_checkpoint(tmp_path / "f", config, params)
    assert native.read_quantization(float_path) is None
    assert not P.is_quantized(native.load_checkpoint(float_path)[1])


def test_convert_cli_quantize_int8(tmp_path):
    from hf_reference import random_hf_gemma

    from gemma_jax.weights.hf import load_hf
    from gemma_jax.weights.load import load_parts

    config = C.tiny_gqa()
    model = random_hf_gemma(config, seed=3)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(_tiny_spm())
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "gemma_jax.cli", "convert", "--from", "hf", str(src),
                           str(tmp_path / "out"), "--dtype", "float32", "--quantize", "int8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config_json = (tmp_path / "out" / "config.json").read_text()
    assert '"quantization": "int8"' in config_json
    assert "int8" in (tmp_path / "out" / "NOTICE").read_text()
    loaded_config, loaded, _ = native.load_checkpoint(tmp_path / "out")
    hf_config, hf_params = load_hf(src, jnp.float32)
    want = Q.as_dicts(Q.quantize_params(hf_params, hf_config))
    got = Q.as_dicts(loaded)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # load_parts: a quantized checkpoint loads quantized; quantize= on a float source quantizes it
    assert P.is_quantized(load_parts(str(tmp_path / "out"))[1])
    done = subprocess.run([sys.executable, "-m", "gemma_jax.cli", "convert", "--from", "hf", str(src),
                           str(tmp_path / "plain"), "--dtype", "float32"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, plain, _ = load_parts(str(tmp_path / "plain"))
    _, quantized, _ = load_parts(str(tmp_path / "plain"), quantize="int8")
    assert not P.is_quantized(plain) and P.is_quantized(quantized)
    for a, b in zip(jax.tree.leaves(Q.as_dicts(quantized)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_serve_quantize_flag_quantizes_at_load(monkeypatch):
    """`gemma-jax serve --quantize int8` (and GEMMA_JAX_QUANTIZE): the factory's model is int8."""
    import argparse

    from serving import cli as serve_cli
    from serving import factory

    parser = serve_cli.add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--random-weights", "tiny_gemma3", "--quantize", "int8"])
    config, params, _ = factory.load_model(args)
    assert P.is_quantized(params) and params["embedder"]["input_embedding"].w.dtype == jnp.int8
    assert parser.parse_args([]).quantize == "auto"  # random weights: the weights as loaded (test_w8a8_embedding)
    assert not P.is_quantized(factory.load_model(parser.parse_args(["--random-weights", "tiny_gemma3"]))[1])
    monkeypatch.setenv("GEMMA_JAX_QUANTIZE", "int8")
    assert serve_cli.add_serve_arguments(argparse.ArgumentParser()).parse_args([]).quantize == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int4"])
