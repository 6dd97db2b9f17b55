"""q8_0: int8 weights in blocks of 32 with a scale each, multiplied by our CPU kernel (issue 18).

- the kernel (`cpu_kernel.block_matmul`, an XLA FFI custom call built on first use) is what runs on
  this machine, and equals the product computed by numpy in float64 from the stored int8 weights
  and scales, for row counts around its tiles of 4 and output counts around its strips; so does its
  XLA fallback (`reference_block_matmul`); malformed operands are refused;
- `quantize_array(..., method="q8_0")` equals block quantization by hand (layout [O, I], one scale
  per 32 inputs, |w - dequantized| <= scale / 2), and `dequantize` gives back the float shape;
- `block_einsum` equals numpy's einsum on the dequantized weight for every projection's equation
  and the tied unembedding; a model's logits equal the float model's on the dequantized weights;
- the paged engine's greedy tokens on a q8_0 tree, prompts served together, equal the naive
  full-forward loop's on the same tree prompt by prompt;
- the tree: shapes, axes and shardings carry the layout; a checkpoint records "q8_0" and restores it;
- the compiled CPU decode step (the 270M's shapes at 2 layers, 1 and 8 rows) calls the kernel once
  per weight and makes no weight-sized copy (no float copy of a weight);
- `--quantize auto` resolves to q8_0 for the embedded model in float32 on a CPU, to w8a8-embedding
  there when the kernel cannot be built, to the weights as loaded otherwise.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_reference import PAGED_KW, TEST_LIMITS, naive_greedy, prompts_for
from quant_reference import EQUATIONS, random_x
from gemma_jax import config as C
from gemma_jax import cpu_kernel
from gemma_jax import params as P
from gemma_jax import projections as proj
from gemma_jax import quantize as Q
from gemma_jax.engine.build import build_engine
from gemma_jax.model import forward
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import native
from gemma_jax.weights.load import CPU_DEFAULT, CPU_FALLBACK, resolve_quantize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo  # noqa: E402
import hlo_text  # noqa: E402


def _tiny():
    config = C.tiny_gemma3().replace(limits=TEST_LIMITS)  # every input size a multiple of 32
    return config, P.init_params(config, jax.random.key(3, impl="unsafe_rbg"))


def _numpy_product(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    o, i = w.shape
    dense = (w.reshape(o, i // 32, 32).astype(np.float64) * scale.astype(np.float64)[..., None]).reshape(o, i)
    return x.astype(np.float64) @ dense.T


def test_the_kernel_is_built_and_registered_here():
    """This machine has a C++ compiler, so the custom call, not the XLA fallback, runs the product."""
    assert cpu_kernel.available()
    assert cpu_kernel.library_path().exists()
    text = jax.jit(cpu_kernel.block_matmul).lower(
        jnp.zeros((2, 64)), jnp.zeros((8, 64), jnp.int8), jnp.zeros((8, 2))).as_text()
    assert cpu_kernel.TARGET in text


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 13])
@pytest.mark.parametrize("o,i", [(1, 32), (17, 64), (1000, 96), (300, 640)])
def test_kernel_equals_numpy(m, o, i):
    rng = np.random.default_rng(m * 1000 + o)
    x = rng.standard_normal((m, i)).astype(np.float32)
    w = rng.integers(-127, 128, (o, i)).astype(np.int8)
    scale = (rng.random((o, i // 32)) * 0.01).astype(np.float32)
    want = _numpy_product(x, w, scale)
    tol = 1e-5 * np.abs(want).max()
    got = np.asarray(jax.jit(cpu_kernel.block_matmul)(x, w, scale))
    assert got.shape == (m, o) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(np.asarray(cpu_kernel.reference_block_matmul(x, w, scale)), want, rtol=1e-5, atol=tol)


def test_kernel_refuses_malformed_operands():
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernel.block_matmul(jnp.zeros((1, 48)), jnp.zeros((4, 48), jnp.int8), jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="expected"):
        cpu_kernel.block_matmul(jnp.zeros((1, 64)), jnp.zeros((4, 64), jnp.int8), jnp.zeros((4, 1)))


def test_block_quantization_by_hand():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 4, 32)).astype(np.float32)  # [D, N, H] like q_einsum: contracted D
    w[3, 1, 5] = 40.0  # an outlier: only its own block's scale follows it
    q = Q.quantize_array(jnp.asarray(w), (0,), jnp.float32, "q8_0")
    assert q.block == 32 and q.shape == (64, 4, 32) and q.w.shape == (128, 64) and q.scale.shape == (128, 2)
    assert Q.method_of(q) == "q8_0"
    rows = w.reshape(64, 128).T.reshape(128, 2, 32)  # [O = N*H, I / 32, 32]
    scale = np.abs(rows).max(-1) / 127
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.w).reshape(128, 2, 32),
                                  np.clip(np.round(rows / scale[..., None]), -127, 127).astype(np.int8))
    back = np.asarray(Q.dequantize(q))
    assert back.shape == w.shape
    bound = np.repeat(scale, 32, axis=-1).reshape(128, 64).T.reshape(w.shape) / 2
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-5))
    assert np.sum(np.asarray(q.scale) > scale.min() * 10) == 1  # a per-channel scale would move the whole row
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_array(jnp.ones((48, 8)), (0,), jnp.float32, "q8_0")


@pytest.mark.parametrize("rows", [(1, 1), (2, 3)], ids=["one row", "six rows"])
@pytest.mark.parametrize("eqn,shape,contracted", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_block_einsum_equals_numpy(eqn, shape, contracted, rows):
    rng = np.random.default_rng(0)
    x = random_x(eqn, shape, rows, rng)
    q = Q.quantize_array(jnp.asarray(rng.standard_normal(shape), jnp.float32), contracted, jnp.float32, "q8_0")
    got = np.asarray(jax.jit(lambda x, q: Q.qeinsum(eqn, x, q))(jnp.asarray(x), q))
    want = np.einsum(eqn, x.astype(np.float64), np.asarray(Q.dequantize(q), np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_q8_0_forward_equals_the_float_model_of_its_weights():
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method="q8_0")
    assert Q.quantization(qp) == "q8_0"
    dense = jax.tree.map(lambda x: Q.dequantize(x) if Q.is_qarray(x) else x, qp, is_leaf=Q.is_qarray)
    tokens = jnp.asarray([[2, 40, 7, 300, 11, 90], [5, 6, 7, 8, 9, 10]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits = lambda p: np.asarray(jax.jit(lambda p: forward(p, tokens, positions, config=config)[0])(p), np.float64)
    a, b, f = logits(qp), logits(dense), logits(params)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert np.abs(a - f).max() > 1e-5 * np.abs(f).max()  # the weights were rounded


def test_paged_engine_on_q8_0_equals_the_naive_loop():
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method="q8_0")
    probe = naive_greedy(config.replace(eos_id=-1, end_of_turn_id=-1), qp, prompts_for([5]), 8)[0]
    config = config.replace(end_of_turn_id=probe[5])
    prompts = prompts_for([5, 12, 20, 31], seed=3)
    engine = build_engine(config, qp, **{**PAGED_KW, "adapter_slots": 0})
    seqs = [engine.add(p, 14) for p in prompts]
    got = engine.run()
    assert [got[s] for s in seqs] == naive_greedy(config, qp, prompts, 14)


def test_paged_engine_on_a_mesh_runs_q8_0_replicated():
    """On a 2 x 4 mesh the q8_0 weights are replicated and each product runs whole on every device
    (the kernel is not partitioned): the tokens are the naive loop's on one device."""
    config, params = _tiny()
    config = config.replace(eos_id=-1, end_of_turn_id=-1)
    mesh = make_mesh(2, 4)
    on_mesh = P.place_params(params, config, mesh, quantize="q8_0")
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(on_mesh["embedder"]))
    prompts = prompts_for([5, 12, 20, 31], seed=3)
    engine = build_engine(config, on_mesh, mesh=mesh, **{**PAGED_KW, "adapter_slots": 0})
    seqs = [engine.add(p, 10) for p in prompts]
    got = engine.run()
    assert [got[s] for s in seqs] == naive_greedy(config, Q.quantize_params(params, config, method="q8_0"), prompts, 10)


def test_tree_shardings_and_checkpoint_carry_the_layout(tmp_path):
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method="q8_0")
    assert jax.tree.structure(P.param_shapes(config, quantized="q8_0")) == jax.tree.structure(qp)
    assert jax.tree.map(lambda s: s.shape, P.param_shapes(config, quantized="q8_0")) == jax.tree.map(
        lambda x: x.shape, qp)
    mesh = make_mesh(2, 4)
    on_mesh = P.place_params(params, config, mesh, quantize="q8_0")
    assert Q.quantization(on_mesh) == "q8_0"
    for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    path = native.save_checkpoint(tmp_path / "q", config, qp)
    assert native.read_quantization(path) == "q8_0"
    _, loaded, _ = native.load_checkpoint(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(qp)
    tokens = jnp.asarray([[2, 40, 7, 300, 11]], jnp.int32)
    logits = lambda p: np.asarray(forward(p, tokens, jnp.arange(5)[None], config=config)[0])
    np.testing.assert_array_equal(logits(loaded), logits(qp))


def test_decode_step_calls_the_kernel_on_weights_as_stored():
    """The 270M's layer shapes and vocabulary at 2 layers, the paged decode step of 1 and 8 rows:
    one kernel call per weight (the projections and the unembedding), no weight-sized copy."""
    full = C.gemma3_270m()
    config = full.replace(num_layers=2, attention_types=full.attention_types[4:6])  # a local and the global
    weights = {int(np.prod(q.shape)) for q in jax.tree.leaves(P.param_shapes(config, quantized="q8_0"),
                                                              is_leaf=Q.is_qarray) if Q.is_qarray(q)}
    for rows in (1, 8):
        setup = hlo.PagedSetup(config, jnp.dtype(jnp.float32), max_seqs=rows, page_size=16, max_len=512,
                               budget=16, steps=1, context=100)
        mod = hlo_text.parse(hlo.compile_paged(setup, rows, 1, quantize="q8_0").as_text())
        assert hlo_text.weight_copies(mod, weights) == []
        calls = [i for i in mod.instructions() if i.opcode == "custom-call" and cpu_kernel.TARGET in i.attrs]
        assert len(calls) == 1 + len(proj.PROJECTIONS) * config.num_layers, rows


def test_auto_is_q8_0_for_the_embedded_model_in_float32_on_a_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_quantize("auto", embedded=True, dtype="float32") == CPU_DEFAULT == "q8_0"
    assert resolve_quantize("auto", embedded=True, dtype=jnp.bfloat16) is None
    assert resolve_quantize("auto", embedded=False, dtype="float32") is None  # a checkpoint, random weights
    for flag in (None, "none"):
        assert resolve_quantize(flag, embedded=True, dtype="float32") is None
    for method in Q.METHODS:
        assert resolve_quantize(method, embedded=False, dtype="float32") == method
    with pytest.raises(ValueError, match="--quantize"):
        resolve_quantize("int4", embedded=True, dtype="float32")
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # no compiler: the XLA-only CPU format
    assert resolve_quantize("auto", embedded=True, dtype="float32") == CPU_FALLBACK == "w8a8-embedding"
