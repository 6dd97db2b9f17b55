"""Frozen model configurations.

A config says everything the model needs to know about an architecture; nothing in the model ever
branches on a model *name*. Configs are built by named factories (`gemma_2b`, `gemma_7b`,
`gemma3_270m`, the `tiny_*` test shapes) or read from a Hugging Face `config.json`
(`from_hf_config`). They are hashable, so they can be static arguments of `jax.jit`.

Serving limits (max input / total tokens, batch prefill budget) live in `Limits`, a separate frozen
dataclass, because they are a property of a deployment of a model, not of its weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

AttentionType = Literal["global", "local"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Token limits of one served model (Workers AI publishes these for gemma-7b-it)."""

    max_input_tokens: int = 1512
    max_total_tokens: int = 2048
    max_batch_prefill_tokens: int = 2048


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of one Gemma model: D embed_dim, N num_heads, K num_kv_heads, H head_dim,
    F hidden_dim, V vocab_size, L num_layers (the shape-letter legend is in `projections.py`)."""

    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0  # global layers
    local_rope_base: float = 10_000.0  # sliding-window layers
    rope_scaling_factor: float = 1.0  # linear position scaling on global layers (Gemma 3 >= 4B)
    query_pre_attn_scalar: float | None = None  # None: scale queries by head_dim ** -0.5
    use_qk_norm: bool = False
    use_post_attn_norm: bool = False
    use_post_ffw_norm: bool = False
    attention_types: tuple[AttentionType, ...] = ()  # one per layer; () means all global
    sliding_window: int | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    # Special token ids.
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    start_of_turn_id: int = 106
    end_of_turn_id: int = 107
    limits: Limits = Limits()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_types and len(self.attention_types) != self.num_layers:
            raise ValueError(f"attention_types has {len(self.attention_types)} entries for {self.num_layers} layers")
        if "local" in self.attention_types and not self.sliding_window:
            raise ValueError("local attention layers need a sliding_window")

    # Derived facts (properties, never stored: nothing can disagree with them).
    @property
    def layer_types(self) -> tuple[AttentionType, ...]:
        return self.attention_types or ("global",) * self.num_layers

    @property
    def query_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generation: `<eos>` and `<end_of_turn>`."""
        return (self.eos_id, self.end_of_turn_id)

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)


def gemma_7b(vocab_size: int = 256_000) -> GemmaConfig:
    """Gemma-1 7B (and 7B-it). The Kaggle Flax checkpoint pads the vocabulary to 256128."""
    return GemmaConfig(
        num_layers=28, embed_dim=3072, num_heads=16, num_kv_heads=16, head_dim=256,
        hidden_dim=24_576, vocab_size=vocab_size,
    )


def gemma_2b(vocab_size: int = 256_000) -> GemmaConfig:
    """Gemma-1 2B: multi-query attention (one kv head)."""
    return GemmaConfig(
        num_layers=18, embed_dim=2048, num_heads=8, num_kv_heads=1, head_dim=256,
        hidden_dim=16_384, vocab_size=vocab_size,
    )


def gemma3_pattern(num_layers: int, period: int = 6) -> tuple[AttentionType, ...]:
    """Gemma 3's 5:1 pattern: every `period`-th layer is global, the others sliding-window."""
    return tuple("global" if (i + 1) % period == 0 else "local" for i in range(num_layers))


def gemma3_270m() -> GemmaConfig:
    """Gemma 3 270M, the embedded default model."""
    return GemmaConfig(
        num_layers=18, embed_dim=640, num_heads=4, num_kv_heads=1, head_dim=256, hidden_dim=2048,
        vocab_size=262_144, rope_base=1_000_000.0, local_rope_base=10_000.0,
        query_pre_attn_scalar=256, use_qk_norm=True, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=gemma3_pattern(18), sliding_window=512,
        start_of_turn_id=105, end_of_turn_id=106,
        limits=Limits(max_input_tokens=1512, max_total_tokens=2048, max_batch_prefill_tokens=2048),
    )


# Tiny shapes for tests: small enough to compile in seconds on two CPU cores, varied enough to cover
# every attention layout (MHA, MQA, GQA with head_dim != embed_dim / num_heads).
def tiny_mha(vocab_size: int = 512) -> GemmaConfig:
    return GemmaConfig(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                       hidden_dim=128, vocab_size=vocab_size)


def tiny_mqa(vocab_size: int = 512) -> GemmaConfig:
    return GemmaConfig(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=1, head_dim=16,
                       hidden_dim=128, vocab_size=vocab_size)


def tiny_gqa(vocab_size: int = 512) -> GemmaConfig:
    return GemmaConfig(num_layers=3, embed_dim=48, num_heads=8, num_kv_heads=2, head_dim=32,
                       hidden_dim=96, vocab_size=vocab_size)


def tiny_gemma3(vocab_size: int = 512) -> GemmaConfig:
    return GemmaConfig(
        num_layers=6, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=32, hidden_dim=128,
        vocab_size=vocab_size, rope_base=1_000_000.0, local_rope_base=10_000.0,
        query_pre_attn_scalar=24, use_qk_norm=True, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=gemma3_pattern(6, period=3), sliding_window=4,
        start_of_turn_id=105, end_of_turn_id=106,
    )


def from_hf_config(source: str | os.PathLike | dict) -> GemmaConfig:
    """Build a config from a Hugging Face `config.json` (a path, a directory or the parsed dict).

    Supports `model_type` "gemma" (Gemma 1) and "gemma3_text" / "gemma3" (Gemma 3, text part).
    """
    if isinstance(source, dict):
        cfg = dict(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            cfg = json.load(f)
    model_type = cfg.get("model_type")
    if model_type == "gemma3":  # multimodal wrapper: the language model is under text_config
        cfg = dict(cfg.get("text_config") or {})
        model_type = "gemma3_text"
    if model_type not in ("gemma", "gemma3_text"):
        raise ValueError(f"unsupported model_type {model_type!r}: expected 'gemma' or 'gemma3_text'")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
        raise ValueError(f"unsupported activation {act!r}")
    common = dict(
        num_layers=cfg["num_hidden_layers"],
        embed_dim=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        hidden_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        pad_id=cfg.get("pad_token_id", 0) if cfg.get("pad_token_id") is not None else 0,
        eos_id=_first(cfg.get("eos_token_id", 1)),
        bos_id=cfg.get("bos_token_id", 2) if cfg.get("bos_token_id") is not None else 2,
    )
    if model_type == "gemma":
        return GemmaConfig(rope_base=float(cfg.get("rope_theta", 10_000.0)), **common)
    # Gemma 3 text.
    layer_types = cfg.get("layer_types")
    if layer_types:
        types = tuple("local" if t == "sliding_attention" else "global" for t in layer_types)
    else:
        types = gemma3_pattern(common["num_layers"], cfg.get("sliding_window_pattern", 6))
    rope_theta, local_theta, factor = _gemma3_rope(cfg)
    return GemmaConfig(
        rope_base=rope_theta, local_rope_base=local_theta, rope_scaling_factor=factor,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"), use_qk_norm=True,
        use_post_attn_norm=True, use_post_ffw_norm=True, attention_types=types,
        sliding_window=cfg.get("sliding_window", 512),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        start_of_turn_id=105, end_of_turn_id=106, **common,
    )


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def _gemma3_rope(cfg: dict) -> tuple[float, float, float]:
    """(global base, local base, global linear factor) from either config.json generation."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers >= 5
        full, local = params["full_attention"], params.get("sliding_attention", {})
        factor = full.get("factor", 1.0) if full.get("rope_type", "default") == "linear" else 1.0
        return float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4)), float(factor)
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    return (float(cfg.get("rope_theta", 1e6)), float(cfg.get("rope_local_base_freq", 1e4)), float(factor))
