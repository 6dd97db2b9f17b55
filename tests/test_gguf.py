"""GGUF loader on tiny files written here with `gguf.GGUFWriter`, the way llama.cpp's converter
writes Gemma: HF tensor names mapped to llama.cpp's, every norm weight stored as 1 + w, matrices as
torch's [out, in]. Some tensors are Q8_0-quantized (the reference model then gets the dequantized
values). Reference: transformers `GemmaForCausalLM` / `Gemma3ForCausalLM` with the same weights.
(The real 270M file is tested against transformers' own GGUF loader in test_gemma3_parity.py.)
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_jax import params as P
from gemma_jax.config import gemma3_pattern, tiny_gemma3, tiny_mqa
from gemma_jax.model import forward
from gemma_jax.sharding import make_mesh
from gemma_jax.weights.gguf import load_gguf
from hf_reference import hf_logits, random_hf_gemma, random_hf_gemma3, rel_err

# llama.cpp's names for transformers' (per layer); Gemma 1's post_attention_layernorm is the
# pre-MLP norm, Gemma 3's is a real post-attention norm.
_COMMON = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GEMMA1 = {**_COMMON, "post_attention_layernorm": "ffn_norm"}
_GEMMA3 = {**_COMMON, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm"}
_QUANTIZE = ("attn_q", "attn_output", "ffn_down", "token_embd")  # stored as Q8_0


def _gguf_name(hf_name: str, table) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{table[rest.removesuffix('.weight')]}.weight"


def write_gguf(path, arch, cfg, hf_model, *, pattern=None, drop=(), extra=()):
    """Write `hf_model` as a llama.cpp-style GGUF; quantized tensors are put back into hf_model
    dequantized, so that it stays the exact reference."""
    table = _GEMMA1 if arch == "gemma" else _GEMMA3
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(cfg.embed_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_base)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if pattern is not None:
            writer.add_sliding_window_pattern(pattern)
    tokens = [f"<t{i}>" for i in range(cfg.vocab_size)]
    tokens[cfg.start_of_turn_id], tokens[cfg.end_of_turn_id] = "<start_of_turn>", "<end_of_turn>"
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_bos_token_id(cfg.bos_id)
    writer.add_eos_token_id(cfg.eos_id)
    writer.add_pad_token_id(cfg.pad_id)
    with torch.no_grad():
        for hf_name, param in hf_model.named_parameters():
            if hf_name == "lm_head.weight":
                continue
            name = _gguf_name(hf_name, table)
            if name in drop:
                continue
            w = param.detach().numpy().astype(np.float32)
            if name.endswith("norm.weight"):
                writer.add_tensor(name, w + np.float32(1.0))
            elif name.split(".")[-2] in _QUANTIZE:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            else:
                writer.add_tensor(name, w)
        for name, w in extra:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(config, params, tokens):
    positions = jnp.arange(tokens.shape[1])[None].repeat(tokens.shape[0], 0)
    return np.asarray(forward(params, jnp.asarray(tokens), positions, config=config)[0])


TOKENS = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)


def test_gemma1_gguf_matches_transformers(tmp_path):
    cfg = tiny_mqa()
    hf = random_hf_gemma(cfg)
    path = write_gguf(tmp_path / "g1.gguf", "gemma", cfg, hf)
    config, params = load_gguf(path, progress=False)
    assert config == cfg.replace(norm_eps=config.norm_eps)
    assert config.norm_eps == pytest.approx(cfg.norm_eps)
    err = rel_err(_logits(config, params, TOKENS), hf_logits(hf, TOKENS))
    assert err <= 1e-5, err


@pytest.mark.parametrize("pattern", [None, 3, [True, False, True, True, False, True]])
def test_gemma3_gguf_matches_transformers(tmp_path, pattern):
    if pattern is None:
        types = gemma3_pattern(6)  # the default: every 6th layer global
    elif isinstance(pattern, int):
        types = gemma3_pattern(6, pattern)
    else:
        types = tuple("local" if f else "global" for f in pattern)
    # What a GGUF can express: query_pre_attn_scalar = head_dim, local RoPE base 10000.
    cfg = tiny_gemma3().replace(query_pre_attn_scalar=32, attention_types=types, sliding_window=4)
    hf = random_hf_gemma3(cfg)
    path = write_gguf(tmp_path / "g3.gguf", "gemma3", cfg, hf, pattern=pattern)
    config, params = load_gguf(path, progress=False)
    assert config.layer_types == types
    assert config == cfg.replace(norm_eps=config.norm_eps)
    err = rel_err(_logits(config, params, TOKENS), hf_logits(hf, TOKENS))
    assert err <= 1e-5, err


def test_sharded_load_equals_unsharded(tmp_path):
    cfg = tiny_gemma3().replace(query_pre_attn_scalar=32, attention_types=gemma3_pattern(6), sliding_window=4)
    path = write_gguf(tmp_path / "g3.gguf", "gemma3", cfg, random_hf_gemma3(cfg))
    config, plain = load_gguf(path, progress=False)
    mesh = make_mesh(2, 4, devices=jax.devices()[:8])
    _, sharded = load_gguf(path, dtype=jnp.bfloat16, mesh=mesh, progress=False)
    want = P.param_shardings(config, mesh)
    for (key, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(plain), jax.tree.leaves(want)):
        assert a.sharding == s, jax.tree_util.keystr(key)
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    assert sharded["layer_0"]["mlp"]["gating_einsum"]["w"].sharding.spec == P.param_shardings(config, mesh)[
        "layer_0"]["mlp"]["gating_einsum"]["w"].spec


def test_bad_files_raise_clear_errors(tmp_path):
    cfg = tiny_mqa()
    hf = random_hf_gemma(cfg)
    missing = write_gguf(tmp_path / "missing.gguf", "gemma", cfg, hf, drop=("blk.1.attn_v.weight",))
    with pytest.raises(ValueError, match="layer_1/attn/kv_einsum/w"):
        load_gguf(missing, progress=False)
    unexpected = write_gguf(tmp_path / "extra.gguf", "gemma", cfg, hf,
                            extra=[("rope_freqs.weight", np.ones(8, np.float32))])
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(unexpected, progress=False)
    wrong = write_gguf(tmp_path / "wrong.gguf", "gemma", cfg.replace(hidden_dim=96), random_hf_gemma(cfg))
    with pytest.raises(ValueError, match="gating_einsum.*shape"):
        load_gguf(wrong, progress=False)
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        load_gguf(tmp_path / "not.gguf", progress=False)
