"""Checkpoint formats: our native orbax format, DeepMind/Kaggle Flax trees, parameter counts.

References: exact array equality for save/restore; for the Kaggle layout a tree built by hand to
gemma-llm 1.0's documented layout, and (strongest) DeepMind's own `gemma-llm` 1.0.0 Transformer:
its init + its forward against our loader + our forward.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemma_jax import config as C
from gemma_jax import params as P
from gemma_jax.model import forward
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import kaggle, native


def random_params(config, seed=0, dtype=jnp.float32):
    """Random weights straight from the declared shapes (numpy: no init compile, seconds faster)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), dtype), P.param_shapes(config))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _logits(params, config, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(jax.jit(forward, static_argnames="config")(params, tokens, positions, config=config)[0])


TOKENS = jnp.array([[2, 17, 300, 5, 99, 511, 42, 7], [2, 1, 8, 450, 3, 3, 250, 64]], jnp.int32)


# --- native format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_roundtrip_identical(tmp_path, dtype):
    config = C.tiny_gemma3()
    params = random_params(config, 1, dtype)
    out = tmp_path / "ckpt"
    native.save_checkpoint(out, config, params, b"\x0a\x03spm-bytes", "Gemma terms")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the temp dir was renamed, nothing left over
    assert sorted(os.listdir(out)) == ["NOTICE", "config.json", "params", "tokenizer.model"]
    assert (out / "NOTICE").read_text() == "Gemma terms"

    config2, restored, tok = native.load_checkpoint(out)
    assert config2 == config
    assert tok == b"\x0a\x03spm-bytes"
    _assert_trees_equal(params, restored)


def test_native_restore_into_mesh_and_dtype(tmp_path):
    config = C.tiny_mha()
    params = random_params(config, 2, jnp.bfloat16)
    native.save_checkpoint(tmp_path / "c", config, params)
    mesh = make_mesh(data=2, model=4)
    _, restored, tok = native.load_checkpoint(tmp_path / "c", mesh=mesh)
    assert tok is None
    _assert_trees_equal(params, restored)
    expected = P.param_shardings(config, mesh)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.sharding == want
    # heads / vocab / mlp really are split over the 4-way model axis
    assert restored["layer_0"]["attn"]["q_einsum"]["w"].sharding.spec[0] == "model"
    assert restored["layer_0"]["attn"]["q_einsum"]["w"].addressable_shards[0].data.shape == (1, 64, 16)

    # Another dtype on restore: bf16 on disk -> f32 in memory, values exactly the bf16 ones.
    mesh18 = make_mesh(data=1, model=8)
    _, as_f32, _ = native.load_checkpoint(tmp_path / "c", dtype=jnp.float32, mesh=mesh18)
    _assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.float32), params), as_f32)
    for got, want in zip(jax.tree.leaves(as_f32), jax.tree.leaves(P.param_shardings(config, mesh18))):
        assert got.sharding == want


def test_native_refuses_overwrite_and_mismatch(tmp_path):
    config = C.tiny_mqa()
    params = random_params(config, 3)
    native.save_checkpoint(tmp_path / "c", config, params)
    with pytest.raises(FileExistsError):
        native.save_checkpoint(tmp_path / "c", config, params)
    other = random_params(config, 4)
    native.save_checkpoint(tmp_path / "c", config, other, overwrite=True)
    _assert_trees_equal(other, native.load_checkpoint(tmp_path / "c")[1])
    assert sorted(os.listdir(tmp_path)) == ["c"]
    with pytest.raises(ValueError, match="does not match"):
        native.save_checkpoint(tmp_path / "d", C.tiny_mha(), params)
    # config.json edited to another shape -> a clear error, not a garbage restore
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    meta["config"]["hidden_dim"] = 256
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden_dim|shape"):
        native.load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("factory", [C.gemma_2b, C.gemma_7b, C.gemma3_270m, C.tiny_gemma3])
def test_config_json_roundtrip(factory):
    config = factory()
    data = json.loads(json.dumps(native.config_to_dict(config)))
    assert native.config_from_dict(data) == config
    with pytest.raises(ValueError, match="unknown"):
        native.config_from_dict({**data, "not_a_field": 1})
