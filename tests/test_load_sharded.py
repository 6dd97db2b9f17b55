"""Weights load straight onto the engine's mesh (fake 8-device CPU mesh, tests/conftest.py).

For a tiny native checkpoint, a tiny GGUF and random weights, float and `--quantize int8`: the
params that `load_parts` / `serving.factory.load_model` return with a mesh have, leaf for leaf,
exactly the sharding `Engine` runs on (`param_shardings`); their values equal the unsharded load
bit for bit (the int8 ones equal `quantize.quantize_params` of the unsharded float load, the path
that existed before); an Engine built on them keeps the very same arrays (no second copy), and its
greedy tokens equal those of an engine on the unsharded load. Then the serve path: `build_engine`
on parsed `serve` flags reads the config first and restores the native checkpoint with its mesh.
"""

from __future__ import annotations

import argparse

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_reference import ENGINE_KW, TEST_LIMITS, prompts_for, run_to_completion
from gemma_jax import config as C
from gemma_jax import params as P
from gemma_jax import quantize as Q
from gemma_jax.engine.engine import Engine
from gemma_jax.sharding import make_mesh
from gemma_jax.weights import native
from gemma_jax.weights.load import load_parts, read_config
from hf_reference import random_hf_gemma3
from test_checkpoints import _tiny_spm, random_params
from test_gguf import write_gguf

MESH_SHAPE = (2, 4)
PROMPTS = prompts_for([5, 9])
MAX_TOKENS = 6


def _config():
    # heads (4) and kv heads (2) split over "model" where it divides them: q heads really split
    return C.tiny_gemma3().replace(limits=TEST_LIMITS)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh(*MESH_SHAPE, devices=jax.devices()[:8])


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    config = _config()
    path = tmp_path_factory.mktemp("native") / "ckpt"
    native.save_checkpoint(path, config, random_params(config, seed=3), _tiny_spm())
    return str(path)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """test_gguf's tiny GGUF, with a tokenizer `Tokenizer.from_gguf` reads: scores, token types, and
    the 256 byte pieces sentencepiece's byte fallback needs (ids 256-511)."""
    config = _config()
    add_token_list = gguf.GGUFWriter.add_token_list

    def with_tokenizer(writer, tokens):
        tokens = [*tokens[:256], *(f"<0x{b:02X}>" for b in range(256))]
        special = {0, 1, 2, 3, config.start_of_turn_id, config.end_of_turn_id}
        add_token_list(writer, tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types([3 if i in special else 6 if i >= 256 else 1 for i in range(len(tokens))])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_token_list", with_tokenizer)
        path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "gemma3", config, random_hf_gemma3(config))
    return str(path)


def _engine(config, params, mesh=None):
    return Engine(config, params, mesh=mesh, max_len=TEST_LIMITS.max_total_tokens, **ENGINE_KW)


def assert_loaded_onto_mesh(config, sharded, plain, mesh, quantize, generate=True):
    """`sharded` sits on exactly the engine's shardings, equals `plain` (quantized the old way when
    `quantize`) bit for bit, is kept as is by an Engine, and (`generate`) generates greedily what
    an engine on `plain` generates."""
    want_shardings = P.param_shardings(config, mesh, quantized=quantize is not None)
    want_values = Q.quantize_params(plain, config, plain["final_norm"]["scale"].dtype) if quantize else plain
    leaves = jax.tree_util.tree_leaves_with_path(sharded)
    assert jax.tree.structure(sharded) == jax.tree.structure(want_shardings) == jax.tree.structure(want_values)
    for (path, got), sharding, want in zip(leaves, jax.tree.leaves(want_shardings), jax.tree.leaves(want_values)):
        name = jax.tree_util.keystr(path)
        assert got.sharding == sharding, name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    # the vocabulary and the MLP are really split over the 4 "model" devices
    embedding = sharded["embedder"]["input_embedding"]
    assert (embedding.w if quantize else embedding).addressable_shards[0].data.shape[0] == config.vocab_size // 4

    engine = _engine(config, sharded, mesh)
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(sharded))), \
        "the engine copied the params it was given"
    if not generate:
        return
    got_tokens = run_to_completion(engine, PROMPTS, max_tokens=MAX_TOKENS)
    want_tokens = run_to_completion(_engine(config, want_values), PROMPTS, max_tokens=MAX_TOKENS)
    assert got_tokens == want_tokens
    assert all(len(t) >= 1 for t in got_tokens)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_checkpoint_loads_onto_the_mesh(native_dir, mesh, quantize):
    config, plain, _ = load_parts(native_dir, "float32")  # first device, unquantized: the reference
    assert read_config(native_dir) == config
    loaded_config, sharded, tokenizer = load_parts(native_dir, "float32", quantize, mesh=mesh)
    assert loaded_config == config and tokenizer.vocab_size == 32
    assert_loaded_onto_mesh(config, sharded, plain, mesh, quantize)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gguf_loads_onto_the_mesh(gguf_path, mesh, quantize):
    config, plain, _ = load_parts(gguf_path, "float32")
    assert read_config(gguf_path) == config
    config = config.replace(limits=TEST_LIMITS)  # a GGUF has no limits: the engine's buckets stay small
    _, sharded, _ = load_parts(gguf_path, "float32", quantize, mesh=mesh)
    assert_loaded_onto_mesh(config, sharded, plain, mesh, quantize)


def test_bfloat16_gguf_quantized_on_the_mesh(gguf_path, mesh):
    """The compute dtype reaches the scales and norms on the mesh, as in `quantize_params`."""
    config, plain, _ = load_parts(gguf_path, "bfloat16")
    _, sharded, _ = load_parts(gguf_path, "bfloat16", "int8", mesh=mesh)
    want = Q.as_dicts(Q.quantize_params(plain, config, jnp.bfloat16))
    got = Q.as_dicts(sharded)
    shardings = Q.as_dicts(P.param_shardings(config, mesh, quantized=True))
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(shardings)):
        assert a.sharding == s and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _serve_args(*flags):
    from serving.cli import add_serve_arguments

    return add_serve_arguments(argparse.ArgumentParser()).parse_args(list(flags))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_random_weights_are_born_on_the_mesh(gguf_file, mesh, quantize, monkeypatch):
    from serving import factory

    monkeypatch.setenv("GEMMA_JAX_CACHE", str(gguf_file.parent))
    monkeypatch.setitem(factory.RANDOM_CONFIGS, "tiny_test", _config)
    flags = ["--random-weights", "tiny_test", "--dtype", "float32"]
    config, plain, _ = factory.load_model(_serve_args(*flags))
    assert factory.model_config(_serve_args(*flags)) == config
    _, sharded, _ = factory.load_model(_serve_args(*flags, *(["--quantize", quantize] if quantize else [])), mesh)
    # no generate: an engine over the tokenizer's 262k-token vocabulary compiles for half a minute
    assert_loaded_onto_mesh(config, sharded, plain, mesh, quantize, generate=False)


@pytest.mark.parametrize("mesh_flag", [["--mesh", "data=2,model=4"], []])
def test_serve_build_engine_restores_the_native_checkpoint_onto_its_mesh(native_dir, mesh_flag, monkeypatch):
    """`gemma-jax serve --checkpoint DIR` on one host: `build_engine` (what the gunicorn worker runs)
    hands its mesh to `native.load_checkpoint`, and the engine keeps the restored arrays as they are.
    Without --mesh, a CPU host's default mesh is the first device alone (mesh_flag.py)."""
    from serving import factory

    calls = []
    real = native.load_checkpoint

    def spy(directory, dtype=None, mesh=None):
        calls.append((str(directory), mesh))
        out = real(directory, dtype=dtype, mesh=mesh)
        calls.append(out[1])
        return out

    monkeypatch.setattr(native, "load_checkpoint", spy)
    args = _serve_args("--checkpoint", native_dir, "--dtype", "float32", "--max-batch", "2", "--lora-slots", "0",
                       *mesh_flag)
    engine, tokenizer = factory.build_engine(args)
    assert len(calls) == 2, "restored more than once"
    (directory, mesh), restored = calls
    assert directory == native_dir and mesh is engine.mesh
    assert dict(mesh.shape) == ({"data": 2, "model": 4} if mesh_flag else {"data": 1, "model": 1})
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(restored)))
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(engine.params),
                                                jax.tree.leaves(P.param_shardings(engine.config, mesh))))
    assert tokenizer.vocab_size == 32


def test_generate_command_loads_onto_its_mesh(native_dir):
    """`gemma-jax generate --mesh data=2,model=4 --checkpoint DIR`: the CLI builds the mesh from the
    config first and every array arrives on its placement there (no first-chip load)."""
    from gemma_jax import cli
    from gemma_jax.mesh_flag import parse_mesh

    config, params, tokenizer, mesh = cli.load_model(native_dir, jnp.float32, mesh_shape=parse_mesh("data=2,model=4"))
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(P.param_shardings(config, mesh))))
    plain = native.load_checkpoint(native_dir, dtype=jnp.float32)[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
