"""w8a8: int8 weights times int8 activations (`quantize_params(..., method="w8a8")`, issue 18).

- `quantize.int8_einsum` equals the same product computed by numpy by hand (rows quantized one by
  one, int32 sums, both scales), for every projection's equation and the tied unembedding, with one
  row (padded to two on a CPU) and several;
- a w8a8 model differs from the weight-only int8 model of the same int8 weights (the path is taken),
  and is batch-independent: the paged engine's greedy tokens for prompts served together equal each
  prompt's tokens from the naive full-forward loop on the same w8a8 tree (every row quantized alone);
- the tree: shapes, axes and shardings carry the method; a checkpoint records "w8a8" and restores it;
- the compiled decode step reads every int8 weight as stored: no float or int32 copy of a weight
  (XLA:CPU's YNNPACK int8 dot), where weight-only int8 converts each weight before its dot.
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
from gemma_jax import params as P
from gemma_jax import projections as proj
from gemma_jax import quantize as Q
from gemma_jax.engine.build import build_engine
from gemma_jax.model import forward
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import native

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo  # noqa: E402
import hlo_text  # noqa: E402


def _tiny(name="tiny_gemma3"):
    config = getattr(C, name)().replace(limits=TEST_LIMITS)
    return config, P.init_params(config, jax.random.key(3, impl="unsafe_rbg"))


def _numpy_int8_product(eqn: str, x: np.ndarray, w8: np.ndarray, wscale: np.ndarray) -> np.ndarray:
    """einsum(eqn, x, w) as w8a8 computes it, by hand: each row of x (its kept letters) scaled to
    int8 by max |row| / 127, integer sums, times the row's and the output channel's scales."""
    inputs, out = eqn.split("->")
    xl, wl = inputs.split(",")
    shared = [c for c in wl if c in xl]
    kept = [c for c in xl if c not in shared]
    rows = np.transpose(x, [xl.index(c) for c in kept + shared]).astype(np.float64)
    flat = rows.reshape(int(np.prod(rows.shape[:len(kept)])), -1)
    s = np.abs(flat).max(1, keepdims=True) / 127
    q = np.clip(np.round(flat / np.where(s > 0, s, 1)), -127, 127)
    xq = (q * s).reshape(rows.shape)
    eqn64 = f"{''.join(kept + shared)},{wl}->{out}"
    return np.einsum(eqn64, xq, w8.astype(np.float64) * wscale.astype(np.float64))


@pytest.mark.parametrize("rows", [(1, 1), (2, 3)], ids=["one row", "six rows"])
@pytest.mark.parametrize("eqn,shape,contracted", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_int8_einsum_equals_numpy(eqn, shape, contracted, rows):
    rng = np.random.default_rng(0)
    x = random_x(eqn, shape, rows, rng)
    x[..., 0] *= 20  # an outlier channel: the row's scale follows it
    q = Q.quantize_array(jnp.asarray(rng.standard_normal(shape), jnp.float32), contracted, jnp.float32, "w8a8")
    assert q.act == "int8" and Q.method_of(q) == "w8a8"
    got = np.asarray(Q.qeinsum(eqn, jnp.asarray(x), q))
    want = _numpy_int8_product(eqn, x, np.asarray(q.w), np.asarray(q.scale))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = np.einsum(eqn, x.astype(np.float64), np.asarray(q.w, np.float64) * np.asarray(q.scale, np.float64))
    assert np.abs(want - exact).max() > 1e-4 * np.abs(exact).max()  # the activations were quantized


def test_int8_einsum_refuses_what_is_not_a_weight_product():
    q = Q.quantize_array(jnp.ones((4, 6)), (0,), jnp.float32, "w8a8")
    with pytest.raises(ValueError, match="weight product"):
        Q.int8_einsum("BTD,DF->BTDF", jnp.ones((1, 1, 4)), q)


def test_w8a8_forward_is_not_the_weight_only_model():
    config, params = _tiny()
    w8a8, int8 = Q.quantize_params(params, config, method="w8a8"), Q.quantize_params(params, config)
    assert Q.quantization(w8a8) == "w8a8" and Q.quantization(int8) == "int8" and Q.quantization(params) is None
    for a, b in zip(jax.tree.leaves(w8a8), jax.tree.leaves(int8)):  # the same stored arrays
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray([[2, 40, 7, 300, 11, 90]], jnp.int32)
    logits = lambda p: np.asarray(forward(p, tokens, jnp.arange(6)[None], config=config)[0], np.float64)
    a, b = logits(w8a8), logits(int8)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99 and np.abs(a - b).max() > 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("method", ["w8a8", "w8a8-embedding"])
def test_paged_engine_on_w8a8_equals_the_naive_loop_row_by_row(method):
    """Each row is quantized alone, so a sequence's tokens do not depend on its batch neighbours
    (nor on the padding row a lone decode row gets on a CPU); also with the embedding alone int8."""
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method=method)
    probe = naive_greedy(config.replace(eos_id=-1, end_of_turn_id=-1), qp, prompts_for([5]), 8)[0]
    config = config.replace(end_of_turn_id=probe[5])
    prompts = prompts_for([5, 12, 20, 31], seed=3)
    engine = build_engine(config, qp, **{**PAGED_KW, "adapter_slots": 0})
    seqs = [engine.add(p, 14) for p in prompts]
    got = engine.run()
    assert [got[s] for s in seqs] == naive_greedy(config, qp, prompts, 14)


def test_tree_shardings_and_checkpoint_carry_the_method(tmp_path):
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method="w8a8")
    shapes = P.param_shapes(config, quantized="w8a8")
    assert jax.tree.structure(shapes) == jax.tree.structure(qp)
    assert jax.tree.structure(P.param_shapes(config, quantized=True)) != jax.tree.structure(qp)
    mesh = make_mesh(2, 4)
    placed = jax.device_put(qp, P.param_shardings(config, mesh, quantized="w8a8"))
    assert Q.quantization(placed) == "w8a8"
    on_mesh = P.place_params(params, config, mesh, quantize="w8a8")
    assert Q.quantization(on_mesh) == "w8a8"
    path = native.save_checkpoint(tmp_path / "q", config, qp)
    assert native.read_quantization(path) == "w8a8"
    _, loaded, _ = native.load_checkpoint(path, mesh=mesh)
    assert jax.tree.structure(loaded) == jax.tree.structure(qp)
    tokens = jnp.asarray([[2, 40, 7, 300, 11]], jnp.int32)
    logits = lambda p: np.asarray(forward(p, tokens, jnp.arange(5)[None], config=config)[0])
    np.testing.assert_allclose(logits(loaded), logits(qp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["w8a8", "int8"])
def test_decode_step_reads_int8_weights_as_stored(method):
    """The 270M's layer shapes and vocabulary at 2 layers, the paged decode step of 1 and 8 rows:
    with w8a8 no instruction makes a weight-sized copy (a convert to float or int32) and every
    weight's dot is a YNNPACK library fusion with int32 sums; weight-only int8 converts them."""
    full = C.gemma3_270m()
    config = full.replace(num_layers=2, attention_types=full.attention_types[4:6])  # a local and the global
    weights = {int(np.prod(q.shape)) for q in jax.tree.leaves(P.param_shapes(config, quantized=method),
                                                              is_leaf=Q.is_qarray) if Q.is_qarray(q)}
    for rows in (1, 8):
        setup = hlo.PagedSetup(config, jnp.dtype(jnp.float32), max_seqs=rows, page_size=16, max_len=512,
                               budget=16, steps=1, context=100)
        text = hlo.compile_paged(setup, rows, 1, quantize=method).as_text()
        mod = hlo_text.parse(text)
        copies = hlo_text.weight_copies(mod, weights)
        int8_dots = [i for i in mod.instructions() if '"__ynn_fusion"' in i.attrs and i.arrays[0][0] == "s32"]
        if method == "w8a8":
            assert copies == [], [c.name for c in copies]
            assert len(int8_dots) == 1 + len(proj.PROJECTIONS) * config.num_layers, rows  # + the unembedding
        else:
            assert len(copies) >= 1 + len(proj.PROJECTIONS) * config.num_layers and int8_dots == []
