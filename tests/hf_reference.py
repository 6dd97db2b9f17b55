"""Build transformers reference models that match our configs (test helper, not a test)."""

import numpy as np
import torch
import transformers

from gemma_jax.config import GemmaConfig


def hf_gemma_config(cfg: GemmaConfig) -> transformers.GemmaConfig:
    """A transformers GemmaConfig (Gemma 1) with the same architecture as `cfg`."""
    return transformers.GemmaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096,
        pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
        attn_implementation="eager",
    )


def random_hf_gemma(cfg: GemmaConfig, seed: int = 0) -> transformers.GemmaForCausalLM:
    """GemmaForCausalLM in float32 with every parameter random (norms too, so (1 + w) matters)."""
    torch.manual_seed(seed)
    return _randomized(transformers.GemmaForCausalLM(hf_gemma_config(cfg)).eval().float())


def _randomized(model):
    """Every parameter random, norms too (std 0.1), projections std 0.05."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if "norm" in name else 0.05)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def hf_gemma3_config(cfg: GemmaConfig) -> transformers.Gemma3TextConfig:
    """A transformers Gemma3TextConfig with the same architecture as `cfg`."""
    layer_types = ["sliding_attention" if t == "local" else "full_attention" for t in cfg.layer_types]
    return transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        layer_types=layer_types, max_position_embeddings=4096,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_base}},
        final_logit_softcapping=None, attn_logit_softcapping=None,
        pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
        attn_implementation="eager",
    )


def random_hf_gemma3(cfg: GemmaConfig, seed: int = 0):
    torch.manual_seed(seed)
    return _randomized(transformers.Gemma3ForCausalLM(hf_gemma3_config(cfg)).eval().float())


def random_lora_tensors(cfg: GemmaConfig, rank: int, seed: int, targets, std: float) -> dict[str, np.ndarray]:
    """PEFT-named lora_A [r, in] / lora_B [out, r] tensors with random values, for every layer."""
    from gemma_jax.projections import TARGETS

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for t in targets:
            target = TARGETS[t]
            parent = "self_attn" if target.path[0] == "attn" else "mlp"
            stem = f"base_model.model.model.layers.{i}.{parent}.{t}"
            tensors[f"{stem}.lora_A.weight"] = rng.normal(0, std, (rank, target.in_features(cfg))).astype(np.float32)
            tensors[f"{stem}.lora_B.weight"] = rng.normal(0, std, (target.out_features(cfg), rank)).astype(np.float32)
    return tensors
