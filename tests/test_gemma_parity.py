"""Gemma 1 (MHA / MQA / GQA) parity with transformers' GemmaForCausalLM on random float32 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import config as C
from gemma_jax.model import forward, init_cache
from gemma_jax.params import get_path
from gemma_jax.projections import STACK_AXIS
from gemma_jax.weights.hf import hf_names, load_hf, params_from_hf_state
from hf_reference import hf_logits, random_hf_gemma, rel_err, state_numpy

CONFIGS = {"mha": C.tiny_mha(), "mqa": C.tiny_mqa(), "gqa": C.tiny_gqa()}


def hf_state_from_params(params, config) -> dict[str, np.ndarray]:
    """Our tree -> HF tensor names (with the `model.` prefix), through the loader's own name table."""
    out = {}
    for short, slot in hf_names(config).items():
        array = np.asarray(get_path(params, slot.path))
        if slot.index is not None:
            array = np.take(array, slot.index, axis=STACK_AXIS)
        if slot.target is not None:
            array = slot.target.to_torch(array, config)
        out[f"model.{short}"] = np.ascontiguousarray(array)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    hf = random_hf_gemma(cfg, seed=len(request.param))
    return cfg, hf, params_from_hf_state(state_numpy(hf), cfg)


def _tokens(cfg, batch=2, length=21, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


def _positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def test_gqa_config_has_head_dim_not_d_over_heads():
    cfg = CONFIGS["gqa"]
    assert cfg.head_dim != cfg.embed_dim // cfg.num_heads and 1 < cfg.num_kv_heads < cfg.num_heads


def test_full_prefill_logits_match_transformers(pair):
    cfg, hf, params = pair
    tokens = _tokens(cfg)
    ours, _ = jax.jit(forward, static_argnames="config")(params, tokens, _positions(tokens), config=cfg)
    assert rel_err(ours, hf_logits(hf, tokens)) <= 1e-5


def test_prefill_then_decode_equals_full_forward(pair):
    cfg, _, params = pair
    tokens = _tokens(cfg, length=16, seed=1)
    full, _ = forward(params, tokens, _positions(tokens), config=cfg)
    step = jax.jit(forward, static_argnames=("config", "kv_len"))
    cache = init_cache(cfg, batch=2, max_len=32)
    prompt = 9
    logits, cache = step(params, tokens[:, :prompt], _positions(tokens[:, :prompt]), cache, config=cfg)
    pieces = [logits]
    for t in range(prompt, tokens.shape[1]):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = step(params, tokens[:, t:t + 1], pos, cache, config=cfg, kv_len=16)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_padding_positions_are_dropped_from_the_cache(pair):
    """A row padded with position S writes nothing: its cache equals the unpadded row's."""
    cfg, _, params = pair
    tokens = _tokens(cfg, batch=1, length=6, seed=2)
    padded = np.concatenate([tokens, np.zeros((1, 4), np.int32)], axis=1)
    pos = np.concatenate([np.arange(6), np.full(4, 32)])[None]
    _, c1 = forward(params, tokens, _positions(tokens), init_cache(cfg, 1, 32), config=cfg)
    _, c2 = forward(params, padded, pos, init_cache(cfg, 1, 32), config=cfg)
    for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # different T: matmul order differs
        assert not np.any(np.asarray(b)[:, :, 6:])  # [B, K, S, H]: nothing written past the real tokens


def test_save_pretrained_roundtrip(tmp_path, pair):
    cfg, hf, params = pair
    hf.save_pretrained(tmp_path)
    loaded_cfg, loaded = load_hf(tmp_path, dtype=jnp.float32)
    assert loaded_cfg.replace(eos_id=cfg.eos_id) == cfg
    tokens = _tokens(cfg, seed=3)
    ours, _ = forward(loaded, tokens, _positions(tokens), config=loaded_cfg)
    assert rel_err(ours, hf_logits(hf, tokens)) <= 1e-5


def test_hf_state_roundtrip(pair):
    cfg, hf, params = pair
    ref = state_numpy(hf)
    mine = hf_state_from_params(params, cfg)
    for name, array in mine.items():
        np.testing.assert_array_equal(array, ref[name], err_msg=name)


def test_bfloat16_forward_close_to_float32(pair):
    cfg, _, params = pair
    tokens = _tokens(cfg, seed=4)
    f32, _ = forward(params, tokens, _positions(tokens), config=cfg)
    bf16, _ = forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens, _positions(tokens), config=cfg)
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, f32) < 0.05


def test_embedding_scale_cast_to_activation_dtype():
    """Gemma-7B in bf16 multiplies embeddings by 55.5 (sqrt(3072) rounded to bf16), not 55.4256."""
    from gemma_jax.model import Embedder

    cfg = C.tiny_mha().replace(embed_dim=3072, vocab_size=4)
    table = jnp.ones((4, 3072), jnp.bfloat16)
    out = Embedder(cfg, jnp.bfloat16).apply({"params": {"input_embedding": table}}, jnp.zeros((1, 1), jnp.int32),
                                            method=Embedder.encode)
    assert out.dtype == jnp.bfloat16 and float(out[0, 0, 0]) == 55.5


def test_checkpoint_with_missing_tensor_is_refused(pair):
    cfg, hf, _ = pair
    state = state_numpy(hf)
    state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        params_from_hf_state(state, cfg)


# --- Gemma 3 architecture on a tiny shape: QK-norm, four norms, sliding window 4 (5:1 -> 2:1 here),
# local/global RoPE bases, query_pre_attn_scalar != head_dim. Sequences are longer than the window.
@pytest.fixture(scope="module")
def gemma3_pair():
    from hf_reference import random_hf_gemma3

    cfg = C.tiny_gemma3()
    hf = random_hf_gemma3(cfg, seed=7)
    return cfg, hf, params_from_hf_state(state_numpy(hf), cfg)


def test_gemma3_tiny_logits_match_transformers(gemma3_pair):
    cfg, hf, params = gemma3_pair
    tokens = _tokens(cfg, length=19, seed=5)
    ours, _ = forward(params, tokens, _positions(tokens), config=cfg)
    assert cfg.sliding_window < tokens.shape[1]
    assert rel_err(ours, hf_logits(hf, tokens)) <= 1e-5


def test_gemma3_tiny_decode_with_cache_equals_full_forward(gemma3_pair):
    cfg, _, params = gemma3_pair
    tokens = _tokens(cfg, length=14, seed=6)
    full, _ = forward(params, tokens, _positions(tokens), config=cfg)
    cache = init_cache(cfg, batch=2, max_len=16)
    logits, cache = forward(params, tokens[:, :3], _positions(tokens[:, :3]), cache, config=cfg)
    pieces = [logits]
    for t in range(3, 14):
        logits, cache = forward(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache, config=cfg)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_gemma3_config_json_roundtrip(tmp_path, gemma3_pair):
    cfg, hf, _ = gemma3_pair
    hf.save_pretrained(tmp_path)
    loaded_cfg, loaded = load_hf(tmp_path, dtype=jnp.float32)
    assert loaded_cfg == cfg
    tokens = _tokens(cfg, seed=8)
    ours, _ = forward(loaded, tokens, _positions(tokens), config=loaded_cfg)
    assert rel_err(ours, hf_logits(hf, tokens)) <= 1e-5


def test_logits_at_equals_the_full_forward_at_those_positions(pair):
    cfg, _, params = pair
    tokens = _tokens(cfg, batch=2, length=12, seed=9)
    full, _ = forward(params, tokens, _positions(tokens), config=cfg)
    at = jnp.array([11, 4])
    picked, _ = forward(params, tokens, _positions(tokens), config=cfg, logits_at=at)
    assert picked.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(picked[:, 0], np.asarray(full)[[0, 1], [11, 4]], rtol=1e-6, atol=1e-6)
