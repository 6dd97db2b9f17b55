"""w8a8-embedding: the tied embedding as w8a8, the layers float (issue 18), and `--quantize auto`.

- the tree: only the embedding is a QArray (int8 rows, a scale per vocabulary row, int8 products);
  every layer weight is the float one bit for bit; shapes, axes, shardings, `place_params` on a mesh
  and a checkpoint carry the method;
- the model: the lookup returns the dequantized rows and the logits are the int8 unembedding of the
  float model's last hidden state (numpy by hand: rows rounded to int8, integer sums, both scales);
  (the paged engine against the naive loop on this tree: test_w8a8.py, parametrized by method);
- the compiled decode step (the 270M's shapes, 2 layers): one YNNPACK int8 dot, the unembedding,
  reading the table as stored; no weight-sized copy anywhere;
- `--quantize auto` (serve's and generate's default) resolves to it for the embedded model in
  float32 on a CPU where our kernel cannot be built (test_q8_0.py: to q8_0 where it can); the
  flags default to auto.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_reference import TEST_LIMITS
from gemma_jax import config as C
from gemma_jax import params as P
from gemma_jax import quantize as Q
from gemma_jax.model import Transformer, forward
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import native

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo  # noqa: E402
import hlo_text  # noqa: E402

METHOD = "w8a8-embedding"


def _tiny(name="tiny_gemma3"):
    config = getattr(C, name)().replace(limits=TEST_LIMITS)
    return config, P.init_params(config, jax.random.key(5, impl="unsafe_rbg"))


def _leaves(tree):
    return dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=Q.is_qarray)[0])


def test_only_the_embedding_is_quantized():
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method=METHOD)
    assert Q.quantization(qp) == METHOD and Q.is_quantized(qp)
    emb = qp["embedder"]["input_embedding"]
    assert Q.is_qarray(emb) and emb.act == "int8" and emb.w.dtype == jnp.int8
    assert emb.scale.shape == (config.vocab_size, 1)
    float_leaves, q_leaves = _leaves(params), _leaves(qp)
    assert float_leaves.keys() == q_leaves.keys()
    for path, leaf in q_leaves.items():
        if Q.is_qarray(leaf):
            continue
        assert leaf.dtype == float_leaves[path].dtype
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(float_leaves[path]), err_msg=str(path))
    assert sum(Q.is_qarray(v) for v in q_leaves.values()) == 1
    # the same embedding arrays as the all-weights w8a8 tree
    full = Q.quantize_params(params, config, method="w8a8")["embedder"]["input_embedding"]
    np.testing.assert_array_equal(np.asarray(emb.w), np.asarray(full.w))
    assert Q.quantization(Q.quantize_params(params, config, method="w8a8")) == "w8a8"


def test_logits_are_the_int8_unembedding_of_the_float_hidden_state():
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method=METHOD)
    emb = qp["embedder"]["input_embedding"]
    tokens = jnp.asarray([[2, 40, 7, 300, 11, 90], [2, 5, 6, 7, 8, 9]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6)[None], tokens.shape)
    # the float model on the dequantized table: same lookup, so the same last hidden state
    deq = dict(params, embedder={"input_embedding": Q.dequantize(emb, jnp.float32)})
    _, state = Transformer(config, jnp.float32).apply(
        {"params": deq}, tokens, positions, capture_intermediates=lambda m, _: m.name == "final_norm")
    hidden = state["intermediates"]["final_norm"]["__call__"][0]  # the unembedding's input [B, T, D]
    h = np.asarray(hidden, np.float64).reshape(-1, config.embed_dim)
    s = np.abs(h).max(1, keepdims=True) / 127
    hq = np.clip(np.round(h / s), -127, 127)
    w8, ws = np.asarray(emb.w, np.int64), np.asarray(emb.scale, np.float64)[:, 0]
    want = (hq.astype(np.int64) @ w8.T) * s * ws
    if config.final_logit_softcap:
        want = np.tanh(want / config.final_logit_softcap) * config.final_logit_softcap
    got = np.asarray(forward(qp, tokens, positions, config=config)[0], np.float64).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = h @ (w8 * ws[:, None]).T
    assert np.abs(want - exact).max() > 1e-5 * np.abs(exact).max()  # the activation rows were rounded


def test_tree_shardings_and_checkpoint_carry_the_method(tmp_path):
    config, params = _tiny()
    qp = Q.quantize_params(params, config, method=METHOD)
    shapes = P.param_shapes(config, quantized=METHOD)
    assert jax.tree.structure(shapes) == jax.tree.structure(qp)
    assert jax.tree.structure(P.param_shapes(config, quantized="w8a8")) != jax.tree.structure(qp)
    for path, s in _leaves(shapes).items():
        leaf = _leaves(qp)[path]
        assert (s.shape, s.dtype) == (leaf.shape, leaf.dtype) if not Q.is_qarray(s) else s.w.shape == leaf.w.shape
    mesh = make_mesh(2, 4)
    on_mesh = P.place_params(params, config, mesh, quantize=METHOD)
    assert Q.quantization(on_mesh) == METHOD
    want = P.param_shardings(config, mesh, quantized=METHOD)
    for path, leaf in _leaves(on_mesh).items():
        got_sharding = (leaf.w.sharding, leaf.scale.sharding) if Q.is_qarray(leaf) else leaf.sharding
        want_leaf = _leaves(want)[path]
        want_sharding = (want_leaf.w, want_leaf.scale) if Q.is_qarray(want_leaf) else want_leaf
        assert got_sharding == want_sharding, path
    for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    path = native.save_checkpoint(tmp_path / "q", config, qp)
    assert native.read_quantization(path) == METHOD
    _, loaded, _ = native.load_checkpoint(path, mesh=mesh)
    assert Q.quantization(loaded) == METHOD and jax.tree.structure(loaded) == jax.tree.structure(qp)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_step_reads_the_int8_table_as_stored():
    """The 270M's shapes at 2 layers, paged decode of 1 and 8 rows: the unembedding is the one
    int8 YNNPACK dot, no instruction makes a copy the size of the table, and the float layers'
    weights are read as they are (no weight-sized instruction at all); a mixed step's two (one row
    alone, or all) likewise."""
    full = C.gemma3_270m()
    config = full.replace(num_layers=2, attention_types=full.attention_types[4:6])
    weights = {int(np.prod(w.shape)) for w in jax.tree.leaves(P.param_shapes(config, quantized=METHOD),
                                                              is_leaf=Q.is_qarray) if len(w.shape) >= 2}
    for rows in (1, 8):
        setup = hlo.PagedSetup(config, jnp.dtype(jnp.float32), max_seqs=rows, page_size=16, max_len=512,
                               budget=16, steps=1, context=100)
        mod = hlo_text.parse(hlo.compile_paged(setup, rows, 1, quantize=METHOD).as_text())
        assert hlo_text.weight_copies(mod, weights) == []
        int8_dots = [i for i in mod.instructions() if '"__ynn_fusion"' in i.attrs and i.arrays[0][0] == "s32"]
        assert len(int8_dots) == 1, rows
    # a mixed step (16 tokens, 8 rows) unembeds the lone sampling row, or all 8, as stored too
    mod = hlo_text.parse(hlo.compile_paged(setup, 16, 1, quantize=METHOD, mixed_switch=True).as_text())
    assert hlo_text.weight_copies(mod, weights) == []
    int8_dots = [i for i in mod.instructions() if '"__ynn_fusion"' in i.attrs and i.arrays[0][0] == "s32"]
    assert sorted(i.arrays[0][1][0] for i in int8_dots) == [2, 8]  # one row padded to YNNPACK's two, all eight


def test_the_flags_default_to_auto(monkeypatch):
    import argparse

    from gemma_jax.cli import build_parser
    from serving.cli import add_serve_arguments

    monkeypatch.delenv("GEMMA_JAX_QUANTIZE", raising=False)
    assert add_serve_arguments(argparse.ArgumentParser()).parse_args([]).quantize == "auto"
    assert add_serve_arguments(argparse.ArgumentParser()).parse_args(["--quantize", "none"]).quantize == "none"
    monkeypatch.setenv("GEMMA_JAX_QUANTIZE", "w8a8")
    assert add_serve_arguments(argparse.ArgumentParser()).parse_args([]).quantize == "w8a8"
    assert build_parser().parse_args(["generate", "hi"]).quantize == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--quantize", "int4"])
