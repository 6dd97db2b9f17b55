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
    assert restored["layer_0"]["attn"]["q_einsum"]["w"].sharding.spec[1] == "model"  # [D, N, H]
    assert restored["layer_0"]["attn"]["q_einsum"]["w"].addressable_shards[0].data.shape == (64, 1, 16)

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


# --- DeepMind / Kaggle Flax layout -----------------------------------------------------------------
def deepmind_tree(params, config, padded_vocab=None, seed=0):
    """Our params -> gemma-llm 1.0's *module* tree, written out by hand from its documented layout:
    MHA fuses q, k, v into qkv_einsum [3, N, D, H]; the MLP weights are bare arrays (no `w`); the
    embedding may carry extra (padding) rows, filled with large values that would dominate if used."""
    np_params = jax.tree.map(np.asarray, params)
    emb = np_params["embedder"]["input_embedding"]
    if padded_vocab:
        extra = np.random.default_rng(seed).normal(0, 5.0, (padded_vocab - emb.shape[0], emb.shape[1]))
        emb = np.concatenate([emb, extra.astype(emb.dtype)])
    tree = {"embedder": {"input_embedding": emb}, "final_norm": np_params["final_norm"]}
    for i in range(config.num_layers):
        ours = np_params[f"layer_{i}"]
        # DeepMind's layout: q [N, D, H], kv [2, K, D, H], gating [2, D, F] (ours put D first).
        q = ours["attn"]["q_einsum"]["w"].transpose(1, 0, 2)
        kv = ours["attn"]["kv_einsum"]["w"].transpose(1, 2, 0, 3)
        if config.num_kv_heads == config.num_heads:
            attn = {"qkv_einsum": {"w": np.stack([q, kv[0], kv[1]])}}
        else:
            attn = {"q_einsum": {"w": q}, "kv_einsum": {"w": kv}}
        attn["attn_vec_einsum"] = ours["attn"]["attn_vec_einsum"]
        tree[f"layer_{i}"] = {
            "pre_attention_norm": ours["pre_attention_norm"], "attn": attn, "pre_ffw_norm": ours["pre_ffw_norm"],
            "mlp": {"gating_einsum": ours["mlp"]["gating_einsum"]["w"].transpose(1, 0, 2),
                    "linear": ours["mlp"]["linear"]["w"]},
        }
    return tree


def kaggle_on_disk(module_tree):
    """gemma-llm module tree -> the flat dict the Kaggle checkpoints store (inverse of gemma-llm's
    `param_remapper` + `nest_params`): 'transformer/<module path>' -> {param: array}, MLP as {'w': ..}."""
    flat = {}

    def walk(node, path):
        if all(isinstance(v, np.ndarray) or hasattr(v, "shape") for v in node.values()):
            if path.endswith("/mlp"):
                for name, array in node.items():
                    flat[f"{path}/{name}"] = {"w": array}
            else:
                flat[path] = dict(node)
            return
        for key, child in node.items():
            walk(child, f"{path}/{key}")
    walk(module_tree, "transformer")
    return flat


def _save_pytree(path, tree):
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.fspath(path), tree)


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("factory,padded", [(C.tiny_mha, None), (C.tiny_mqa, None), (C.tiny_mha, 640), (C.tiny_mqa, 640)])
def test_kaggle_tree_by_hand(tmp_path, factory, padded, layout):
    config = factory()
    params = random_params(config, 5)
    module_tree = deepmind_tree(params, config, padded)
    on_disk = kaggle_on_disk(module_tree) if layout == "flat" else {"transformer": module_tree}
    _save_pytree(tmp_path / "ckpt", on_disk)

    loaded_config, loaded = kaggle.load_kaggle(tmp_path / "ckpt", config, dtype=jnp.float32)
    assert loaded_config == config
    _assert_trees_equal(params, loaded)  # padding rows sliced off, qkv split exactly
    np.testing.assert_array_equal(_logits(loaded, config, TOKENS), _logits(params, config, TOKENS))

    # Keeping the padded rows is possible by asking for that vocabulary explicitly.
    if padded:
        _, wide = kaggle.load_kaggle(tmp_path / "ckpt", config.replace(vocab_size=padded), dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(wide["embedder"]["input_embedding"]),
                                      module_tree["embedder"]["input_embedding"])


def test_kaggle_into_mesh_bf16(tmp_path):
    config = C.tiny_mha()
    params = random_params(config, 6)
    _save_pytree(tmp_path / "ckpt", kaggle_on_disk(deepmind_tree(params, config, 640)))
    mesh = make_mesh(data=2, model=4)
    _, loaded = kaggle.load_kaggle(tmp_path / "ckpt", config, dtype=jnp.bfloat16, mesh=mesh)
    _assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), loaded)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(P.param_shardings(config, mesh))):
        assert got.sharding == want


def test_kaggle_errors(tmp_path):
    config = C.tiny_mha()
    params = random_params(config, 7)
    _save_pytree(tmp_path / "ckpt", kaggle_on_disk(deepmind_tree(params, config)))
    with pytest.raises(ValueError, match="never guessed"):
        kaggle.load_kaggle(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="fused qkv"):  # an MHA checkpoint is not an MQA model
        kaggle.load_kaggle(tmp_path / "ckpt", C.tiny_mqa())
    with pytest.raises(ValueError, match="missing layer_2"):
        kaggle.load_kaggle(tmp_path / "ckpt", config.replace(num_layers=3))
    with pytest.raises(ValueError, match="more rows"):
        kaggle.load_kaggle(tmp_path / "ckpt", config.replace(vocab_size=1024))
    assert kaggle.config_for_variant("7b") == C.gemma_7b()
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert kaggle.find_tokenizer(tmp_path / "ckpt") == os.fspath(tmp_path / "tokenizer.model")


# --- DeepMind's own gemma-llm 1.0.0 as the reference -------------------------------------------------
@pytest.mark.parametrize("num_kv_heads", [4, 1])  # MHA (qkv_einsum, like 7B) and MQA (like 2B)
def test_kaggle_matches_gemma_llm(tmp_path, num_kv_heads):
    """Params from gemma-llm's own `Transformer.init`, written the way the Kaggle checkpoints store
    them, read back by gemma-llm's own loader (proves the on-disk layout) and by ours; our forward
    must give gemma-llm's logits (their first 512 columns: the padded rows are sliced off)."""
    from gemma import params as gm_params
    from gemma import transformer as gm

    padded, vocab = 640, 512
    gm_config = gm.TransformerConfig(num_layers=2, num_embed=padded, embed_dim=64, hidden_dim=128,
                                     num_heads=4, head_dim=16, num_kv_heads=num_kv_heads)
    model = gm.Transformer(gm_config)
    tokens = TOKENS
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = gm.make_causal_attn_mask(jnp.ones(tokens.shape, bool))
    init = model.init(jax.random.key(0), tokens, positions, None, mask)["params"]
    # gemma-llm inits norms and MLP weights to zero: randomise every leaf so all paths are exercised.
    leaves, treedef = jax.tree.flatten(init)
    rng = np.random.default_rng(8)
    gm_tree = jax.tree.unflatten(treedef, [rng.normal(0, 0.1 if x.ndim == 1 else 0.05, x.shape).astype(np.float32)
                                           for x in leaves])
    _save_pytree(tmp_path / "ckpt", kaggle_on_disk(gm_tree))

    reread = gm_params.load_and_format_params(os.fspath(tmp_path / "ckpt"))
    _assert_trees_equal(gm_tree, reread["transformer"])
    want, _ = model.apply({"params": reread["transformer"]}, tokens, positions, None, mask)

    config = C.GemmaConfig(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
                           hidden_dim=128, vocab_size=vocab)
    _, ours = kaggle.load_kaggle(tmp_path / "ckpt", config, dtype=jnp.float32)
    got = _logits(ours, config, tokens)
    want = np.asarray(want)[..., :vocab]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


# --- parameter counts (jax.eval_shape: nothing allocated) --------------------------------------------
def _count_by_hand(c, vocab):
    """The Gemma 1 layout counted by hand: embedding + per layer (q, k, v, o, gate, up, down, 2 norms)."""
    attn = c.num_heads * c.embed_dim * c.head_dim * 2 + 2 * c.num_kv_heads * c.embed_dim * c.head_dim
    mlp = 3 * c.embed_dim * c.hidden_dim
    return vocab * c.embed_dim + c.num_layers * (attn + mlp + 2 * c.embed_dim) + c.embed_dim


@pytest.mark.parametrize("factory,hf_count,padded_count", [
    (C.gemma_7b, 8_537_680_896, 8_538_074_112),
    (C.gemma_2b, 2_506_172_416, 2_506_434_560),
])
def test_param_counts(factory, hf_count, padded_count):
    def count(config):
        shapes = jax.eval_shape(lambda: P.init_params(config, jax.random.key(0)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    assert count(factory()) == P.count_params(factory()) == hf_count == _count_by_hand(factory(), 256_000)
    assert count(factory(vocab_size=256_128)) == padded_count == _count_by_hand(factory(), 256_128)


# --- gemma-jax convert, end to end -----------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "gemma_jax.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _tiny_spm(vocab_size=32) -> bytes:
    import io

    import sentencepiece as spm

    text = ["the quick brown fox jumps over the lazy dog", "gemma speaks jax and flax", "hello world"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
                                   minloglevel=2)
    return model.getvalue()


def test_convert_cli_hf(tmp_path):
    from hf_reference import hf_logits, random_hf_gemma, rel_err

    from gemma_jax.tokenizer import Tokenizer

    config = C.tiny_gqa()
    model = random_hf_gemma(config, seed=3)
    src = tmp_path / "hf"
    model.save_pretrained(src)  # config.json + model.safetensors
    spm_bytes = _tiny_spm()
    (src / "tokenizer.model").write_bytes(spm_bytes)

    done = _cli("convert", "--from", "hf", src, tmp_path / "out", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    loaded_config, params, tok = native.load_checkpoint(tmp_path / "out")
    assert loaded_config == C.from_hf_config(src)
    assert tok == spm_bytes
    tokenizer = Tokenizer.from_model_proto(tok)
    assert tokenizer.decode(tokenizer.encode("hello world", add_bos=False)) == "hello world"
    assert "Gemma Terms of Use" in (tmp_path / "out" / "NOTICE").read_text()
    tokens = np.array([[2, 40, 7, 300, 11, 5, 99, 250]])
    assert rel_err(_logits(params, loaded_config, jnp.asarray(tokens)), hf_logits(model, tokens)) <= 1e-5

    # Default dtype is bfloat16: the same values, rounded.
    done = _cli("convert", "--from", "hf", src, tmp_path / "out_bf16")
    assert done.returncode == 0, done.stderr
    _, bf16, _ = native.load_checkpoint(tmp_path / "out_bf16")
    _assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), bf16)

    # An existing output is refused with a message (nothing loaded, nothing touched).
    done = _cli("convert", "--from", "hf", src, tmp_path / "out")
    assert done.returncode != 0 and "exists" in done.stderr and "Traceback" not in done.stderr
    done = _cli("convert", "--from", "hf", src, tmp_path / "x", "--variant", "7b")
    assert done.returncode != 0 and "--variant only applies" in done.stderr
    done = _cli("convert", "--from", "kaggle", src, tmp_path / "x")
    assert done.returncode != 0 and "needs --variant" in done.stderr
