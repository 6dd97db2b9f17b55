"""The Gemma transformer (Gemma 1 and Gemma 3 text) as Flax linen modules, and `forward`.

    forward(params, tokens, positions, cache) -> (logits, new_cache)

The KV cache is an argument and a result, never a mutable Flax collection, so `forward` is a pure
function that jit can donate the cache through. Layers are unrolled (a Python loop), not a
`lax.scan` over stacked weights: on GPU the scan made XLA allocate a temporary the size of the
weights (see BASELINES.md).

Shape letters (see `GemmaConfig`): B batch, T query length, S cache length, D embed, N query heads,
K kv heads, G = N // K, H head_dim, F mlp hidden, V vocab, C a stacked pair (k/v or gate/up).

LoRA without merging: `forward(..., lora=(bank, adapter_ids))` adds each row's adapter delta to
the seven projections (`layers.lora_delta`; the bank is `lora.AdapterBank`, ids [B] int32, 0 = none).
With lora=None nothing is added and the computation is the plain model's.

Cache semantics: row b's token at position p writes its key/value at cache index p; a query at
position q attends the cache indices j <= q (and j > q - window on sliding-window layers). Writes at
positions >= S are dropped, so padding tokens can be given position S and cost nothing. The cache is
laid out [B, K, S, H] so that both attention einsums are plain batched matmuls over (B, K): with the
sequence axis outside the heads, XLA would transpose the whole cache on every decode step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma_jax.config import GemmaConfig
from gemma_jax.layers import Einsum, RMSNorm, apply_rope, gelu_tanh, lora_delta

_NEG_INF = float(jnp.finfo(jnp.float32).min)


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [B, K, S, H]
    v: jax.Array  # [B, K, S, H]


Cache = dict[str, LayerCache]  # "layer_0" ... "layer_{L-1}"

CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An all-zeros cache for `batch` rows of `max_len` positions (see `sharding` to place it)."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    return {f"layer_{i}": LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for i in range(config.num_layers)}


def _attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] boolean: causal over positions, limited to `window` on sliding-window layers."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return mask


class Attention(nn.Module):
    config: GemmaConfig
    local: bool
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache: LayerCache | None, kv_len: int | None, lora=None):
        cfg = self.config
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        dt = self.param_dtype
        # Weights are [in, out...] so each projection is one plain matmul with no weight transpose.
        q = Einsum((d, n, h), ("embed", "heads", "head_dim"), dt, name="q_einsum")("BTD,DNH->BTNH", x)
        kv = Einsum((d, 2, k, h), ("embed", "stack", "kv_heads", "head_dim"), dt, name="kv_einsum")(
            "BTD,DCKH->BTCKH", x)
        key, value = kv[:, :, 0], kv[:, :, 1]
        if lora is not None:
            q = _plus(q, lora_delta(lora, "q_proj", x, "BTD,BDR->BTR", "BTR,BRNH->BTNH"))
            key = _plus(key, lora_delta(lora, "k_proj", x, "BTD,BDR->BTR", "BTR,BRKH->BTKH"))
            value = _plus(value, lora_delta(lora, "v_proj", x, "BTD,BDR->BTR", "BTR,BRKH->BTKH"))
        if cfg.use_qk_norm:
            q = RMSNorm("head_dim", cfg.norm_eps, dt, name="query_norm")(q)
            key = RMSNorm("head_dim", cfg.norm_eps, dt, name="key_norm")(key)
        if self.local:
            base, factor = cfg.local_rope_base, 1.0
        else:
            base, factor = cfg.rope_base, cfg.rope_scaling_factor
        q = apply_rope(q, positions, base, factor)
        key = apply_rope(key, positions, base, factor)

        if cache is None:  # attend only the tokens given
            keys, values = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, K, T, H]
            k_pos, new_cache = positions, None
        else:  # write this step's keys/values at their positions, attend the cache
            rows = jnp.arange(x.shape[0])[:, None]  # [B, 1] with positions [B, T]: indexes [B, T, K, H]
            new_cache = LayerCache(
                k=cache.k.at[rows, :, positions].set(key.astype(cache.k.dtype), mode="drop"),
                v=cache.v.at[rows, :, positions].set(value.astype(cache.v.dtype), mode="drop"),
            )
            span = kv_len or cache.k.shape[2]
            keys, values = new_cache.k[:, :, :span], new_cache.v[:, :, :span]
            k_pos = jnp.broadcast_to(jnp.arange(span), (x.shape[0], span))

        b, t = q.shape[:2]
        q = (q * jnp.asarray(cfg.query_scale, q.dtype)).reshape(b, t, k, n // k, h)
        logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        if cfg.attn_logit_softcap:
            logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        mask = _attention_mask(positions, k_pos, cfg.sliding_window if self.local else None)
        logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        encoded = jnp.einsum("BKGTS,BKSH->BTKGH", probs, values).reshape(b, t, n, h).astype(x.dtype)
        out = Einsum((n, h, d), ("heads", "head_dim", "embed"), dt, name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)
        if lora is not None:
            out = _plus(out, lora_delta(lora, "o_proj", encoded, "BTNH,BNHR->BTR", "BTR,BRD->BTD"))
        return out, new_cache


class FeedForward(nn.Module):
    """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_down. gating_einsum[:, 0] is the gate."""

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lora=None):
        d, f, dt = self.config.embed_dim, self.config.hidden_dim, self.param_dtype
        gate_up = Einsum((d, 2, f), ("embed", "stack", "mlp"), dt, name="gating_einsum")("BTD,DCF->BTCF", x)
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        if lora is not None:
            gate = _plus(gate, lora_delta(lora, "gate_proj", x, "BTD,BDR->BTR", "BTR,BRF->BTF"))
            up = _plus(up, lora_delta(lora, "up_proj", x, "BTD,BDR->BTR", "BTR,BRF->BTF"))
        hidden = gelu_tanh(gate) * up
        out = Einsum((f, d), ("mlp", "embed"), dt, name="linear")("BTF,FD->BTD", hidden)
        if lora is not None:
            out = _plus(out, lora_delta(lora, "down_proj", hidden, "BTF,BFR->BTR", "BTR,BRD->BTD"))
        return out


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta.astype(y.dtype)


class Block(nn.Module):
    config: GemmaConfig
    local: bool
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache, kv_len, lora=None):
        cfg, dt = self.config, self.param_dtype
        with jax.named_scope("attention"):
            h = RMSNorm("embed", cfg.norm_eps, dt, name="pre_attention_norm")(x)
            h, new_cache = Attention(cfg, self.local, dt, name="attn")(h, positions, cache, kv_len, lora)
            if cfg.use_post_attn_norm:
                h = RMSNorm("embed", cfg.norm_eps, dt, name="post_attention_norm")(h)
            x = x + h
        with jax.named_scope("mlp"):
            h = RMSNorm("embed", cfg.norm_eps, dt, name="pre_ffw_norm")(x)
            h = FeedForward(cfg, dt, name="mlp")(h, lora)
            if cfg.use_post_ffw_norm:
                h = RMSNorm("embed", cfg.norm_eps, dt, name="post_ffw_norm")(h)
            x = x + h
        return x, new_cache


class Embedder(nn.Module):
    """Token embedding [V, D], scaled by sqrt(D) on the way in, tied as the output projection."""

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        shape = (self.config.vocab_size, self.config.embed_dim)
        self.input_embedding = self.param("input_embedding", init, shape, self.param_dtype)

    def encode(self, tokens):  # [B, T] -> [B, T, D]
        # The sqrt(D) normaliser is cast to the activation dtype first (bf16: 55.5, not 55.4256).
        scale = jnp.asarray(math.sqrt(self.config.embed_dim), self.param_dtype)
        return jnp.take(self.input_embedding, tokens, axis=0) * scale

    def decode(self, x):  # [B, T, D] -> [B, T, V] float32
        return jnp.einsum("BTD,VD->BTV", x, self.input_embedding.astype(x.dtype),
                          preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """tokens [B, T], positions [B, T], cache | None -> (logits [B, T, V] float32, cache | None).

    lora: None or (bank, adapter_ids [B]) with bank an `lora.AdapterBank` (per-row adapters).
    """

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, cache: Cache | None = None, kv_len: int | None = None, lora=None,
                 logits_at: jax.Array | None = None):
        cfg, dt = self.config, self.param_dtype
        embedder = Embedder(cfg, dt, name="embedder")
        x = embedder.encode(tokens)
        new_cache: Cache | None = None if cache is None else {}
        for i, kind in enumerate(cfg.layer_types):
            name = f"layer_{i}"
            layer_lora = None if lora is None else (lora[0].layers[name], lora[1])
            x, layer_cache = Block(cfg, kind == "local", dt, name=name)(
                x, positions, None if cache is None else cache[name], kv_len, layer_lora)
            if cache is not None:
                new_cache[name] = layer_cache
        if logits_at is not None:  # only one position per row needs logits (e.g. a prompt's last)
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        x = RMSNorm("embed", cfg.norm_eps, dt, name="final_norm")(x)
        logits = embedder.decode(x)
        if cfg.final_logit_softcap:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits, new_cache


def forward(params, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *,
            config: GemmaConfig, kv_len: int | None = None, lora=None, logits_at: jax.Array | None = None):
    """Pure forward pass. params: the tree `params.init_params` returns (no "params" wrapper).

    tokens, positions: [B, T] int32. cache: from `init_cache` or a previous call, or None to run
    without one. kv_len (static): attend only the first kv_len cache entries (must exceed every
    position in this call). lora: None, or (bank, adapter_ids [B] int32) to add each row's LoRA
    adapter from an `lora.AdapterBank` (id 0 = no adapter). logits_at: None, or [B] int positions:
    then only those positions are unembedded and logits are [B, 1, V] (a prefill needs only each
    prompt's last position; the full [B, T, V] would be 2 GiB for one 2048-token Gemma 3 prompt).
    Returns (logits [B, T, V] float32, new cache or None).
    """
    dtype = params["embedder"]["input_embedding"].dtype
    return Transformer(config, dtype).apply({"params": params}, tokens, positions, cache, kv_len, lora, logits_at)
