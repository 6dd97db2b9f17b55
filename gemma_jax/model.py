"""The Gemma transformer (Gemma 1 and Gemma 3 text) as Flax linen modules, and `forward`.

    forward(params, tokens, positions, cache) -> (logits, new_cache)

The KV cache is an argument and a result, never a mutable Flax collection, so `forward` is a pure
function that jit can donate the cache through. Layers are unrolled (a Python loop), not a
`lax.scan` over stacked weights: on GPU the scan made XLA allocate a temporary the size of the
weights.

Shape letters: the legend in `projections.py`. The projection weights, their einsums and their LoRA
equations are all derived from the axis table there (`projections.PROJECTIONS` / `TARGETS`).

LoRA without merging: `forward(..., lora=(bank, adapter_ids))` adds each row's adapter delta to
the seven projections (`layers.lora_delta`; the bank is `lora.AdapterBank`, ids [B] int32, 0 = none).
With lora=None nothing is added and the computation is the plain model's.

Cache semantics: row b's token at position p writes its key/value at cache index p; a query at
position q attends the cache indices j <= q (and j > q - window on sliding-window layers). Writes at
positions >= S are dropped, so padding tokens can be given position S and cost nothing; in a decode
step (one token per row) such a row is idle and reads nothing. Attention itself is `attention.py`:
decode reads each row's own length in place, prefill (no cache) is `jax.nn.dot_product_attention`. The cache is
laid out [B, K, S, H] so that both attention einsums are plain batched matmuls over (B, K): with the
sequence axis outside the heads, XLA would transpose the whole cache on every decode step.

int8 KV cache (`init_cache(..., dtype=jnp.int8)`): keys and values are stored int8 with one float32
scale per (row, kv head, position), `LayerCache.k_scale` / `v_scale` [B, K, S], quantized the way
`quantize.py` quantizes weights: symmetric, scale = max |x| over H / 127, x_int8 = clip(round(x /
scale), -127, 127), so |x - x_int8 * scale| <= scale / 2 (`quantize_kv`). Each token's K/V is
quantized as it is written (decode writes here; a prefill's K/V is quantized by the engine when it
goes into the decode state). Decode attention folds the scales into its products instead of
dequantizing the cache (`attention.decode_attention`), so it reads 1 byte per value plus 4 per H
values. A float cache has no scales (None): its computation is exactly what it was. Several tokens
per row against a cache (`_masked_attention`, not used by the engine) dequantize the span they read.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma_jax import projections as proj
from gemma_jax.attention import decode_attention, default_products, prefill_attention
from gemma_jax.config import GemmaConfig
from gemma_jax.contraction import unembed
from gemma_jax.layers import Einsum, RMSNorm, apply_rope, gelu_tanh, lora_delta
from gemma_jax.paged_attention import paged_attention_fn, write_pages
from gemma_jax.quantize import QArray, dequantize, is_qarray, lookup, qeinsum, quantize_array, stored_param

_NEG_INF = float(jnp.finfo(jnp.float32).min)


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [B, K, S, H]
    v: jax.Array  # [B, K, S, H]
    k_scale: jax.Array | None = None  # [B, K, S] float32 for an int8 cache, else None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


Cache = dict[str, LayerCache]  # "layer_0" ... "layer_{L-1}"


@flax.struct.dataclass
class PagedLayer:
    """One layer's page pool: `paged_attention.py`'s layout; an int8 pool has a float32 scale per
    (page, kv head, offset), each token's K/V quantized as it is written (`quantize_kv`)."""

    k: jax.Array  # [P, K, S, H]
    v: jax.Array  # [P, K, S, H]
    k_scale: jax.Array | None = None  # [P, K, S] float32 for an int8 pool, else None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


@flax.struct.dataclass
class PagedBatch:
    """Where a flat token batch's K/V goes and what each token reads (`paged_attention.py`)."""

    pages: jax.Array  # [T] int32: the page each token's K/V is written to (0 for padding)
    offsets: jax.Array  # [T] int32: its offset in that page
    tables: jax.Array  # [Q, M] int32: each sequence's pages, in order
    seq_ids: jax.Array  # [T] int32: the sequence (table row) of each token


PagedCache = dict[str, PagedLayer]


def init_paged_cache(config: GemmaConfig, pages: int, page_size: int, dtype=jnp.float32) -> PagedCache:
    """All-zeros page pools, `pages` pages of `page_size` positions per layer (int8: with scales)."""
    shape = (pages, config.num_kv_heads, page_size, config.head_dim)

    def layer():
        if jnp.dtype(dtype) == jnp.int8:
            return PagedLayer(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                              jnp.zeros(shape[:3], KV_SCALE_DTYPE), jnp.zeros(shape[:3], KV_SCALE_DTYPE))
        return PagedLayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    return {f"layer_{i}": layer() for i in range(config.num_layers)}

CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
SCALE_AXES = ("batch", "kv_heads", "cache_seq")  # an int8 cache's scales: sharded like the cache
KV_SCALE_DTYPE = jnp.float32


KV_CACHE_KINDS = {"int8": jnp.int8}  # what `--kv-cache` accepts (the CLIs, the benchmarks)


def kv_cache_dtype(kind: str | None):
    """A `--kv-cache` value -> the Engine's cache_dtype: "int8" -> jnp.int8 (an int8 cache with
    scales), None -> None (the compute dtype). Anything else is a ValueError."""
    if kind is not None and kind not in KV_CACHE_KINDS:
        raise ValueError(f"--kv-cache must be one of {tuple(KV_CACHE_KINDS)}, not {kind!r}")
    return None if kind is None else KV_CACHE_KINDS[kind]


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An all-zeros cache for `batch` rows of `max_len` positions (see `sharding` to place it).
    dtype int8: an int8 cache with float32 scales [B, K, S] (see the module docstring)."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    if jnp.dtype(dtype) == jnp.int8:
        scales = lambda: jnp.zeros(shape[:3], KV_SCALE_DTYPE)
        return {f"layer_{i}": LayerCache(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), scales(), scales())
                for i in range(config.num_layers)}
    return {f"layer_{i}": LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for i in range(config.num_layers)}


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] float -> (int8 [..., H], float32 scale [...]): symmetric, one scale per vector,
    scale = max |x| / 127 (0 for an all-zero vector, which stays 0), |x - q * scale| <= scale / 2."""
    q = quantize_array(x, contracted=(x.ndim - 1,), dtype=KV_SCALE_DTYPE)  # the weights' rule, per vector
    return q.w, q.scale[..., 0]


def quantize_layer_cache(layer: LayerCache) -> LayerCache:
    """A float LayerCache ([.., K, T, H] K/V, e.g. a prefill's) as an int8 one with its scales."""
    k, k_scale = quantize_kv(layer.k)
    v, v_scale = quantize_kv(layer.v)
    return LayerCache(k, v, k_scale, v_scale)


def _attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] boolean: causal over positions, limited to `window` on sliding-window layers."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return mask


class Attention(nn.Module):
    """Self-attention over the tokens given (no cache: `attention.prefill_attention`), or over the
    cache after writing them into it: one token per row reads each row's own length in place
    (`attention.decode_attention`); several per row use the masked einsum over the first kv_len."""

    config: GemmaConfig
    local: bool
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "xla"  # `attention.IMPLS`

    @nn.compact
    def __call__(self, x, positions, cache: LayerCache | None, kv_len: int | None, lora=None, return_kv=False):
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim
        dt = self.param_dtype
        q = _project(proj.Q, cfg, dt, x)  # [B, T, N, H]
        kv = _project(proj.KV, cfg, dt, x)  # [B, T, C, K, H]
        key, value = kv[:, :, 0], kv[:, :, 1]
        q = _plus_lora(q, lora, "q_proj", x)
        key = _plus_lora(key, lora, "k_proj", x)
        value = _plus_lora(value, lora, "v_proj", x)
        if cfg.use_qk_norm:
            q = RMSNorm("head_dim", cfg.norm_eps, dt, name="query_norm")(q)
            key = RMSNorm("head_dim", cfg.norm_eps, dt, name="key_norm")(key)
        if self.local:
            base, factor = cfg.local_rope_base, 1.0
        else:
            base, factor = cfg.rope_base, cfg.rope_scaling_factor
        q = apply_rope(q, positions, base, factor)
        key = apply_rope(key, positions, base, factor)

        b, t = q.shape[:2]
        window = cfg.sliding_window if self.local else None
        kw = dict(window=window, scale=cfg.query_scale, softcap=cfg.attn_logit_softcap, impl=self.impl)
        if isinstance(cache, PagedLayer):  # a flat batch: B tokens of T = 1, each over its sequence's pages
            paged: PagedBatch = kv_len
            if cache.quantized:  # int8 K/V [T, K, H] and their scales [T, K] at the same places
                (k1, ks), (v1, vs) = quantize_kv(key[:, 0]), quantize_kv(value[:, 0])
                k_pages, v_pages = write_pages(cache.k, cache.v, k1, v1, paged.pages, paged.offsets)
                k_scale, v_scale = write_pages(cache.k_scale, cache.v_scale, ks, vs, paged.pages, paged.offsets)
                new_cache = PagedLayer(k_pages, v_pages, k_scale, v_scale)
            else:
                k_pages, v_pages = write_pages(cache.k, cache.v, key[:, 0], value[:, 0], paged.pages, paged.offsets)
                new_cache = PagedLayer(k_pages, v_pages)
            extra = {}
            if self.impl == "xla":  # the reference's product form for this batch (`paged_products`)
                extra["products"] = paged_products(cfg, b)
            encoded = paged_attention_fn(self.impl)(
                q[:, 0], k_pages, v_pages, paged.tables, paged.seq_ids, positions[:, 0], window=window,
                scale=cfg.query_scale, softcap=cfg.attn_logit_softcap, k_scale=new_cache.k_scale,
                v_scale=new_cache.v_scale, **extra)[:, None]
        elif cache is None:  # the tokens given attend each other (causal by index)
            encoded = prefill_attention(q, key, value, **kw)  # [B, T, N, H]
            new_cache = None
            if return_kv:  # this call's keys/values, [B, K, T, H], for the caller to place in a cache
                new_cache = LayerCache(k=key.transpose(0, 2, 1, 3), v=value.transpose(0, 2, 1, 3))
        else:  # write this step's keys/values at their positions, attend the cache
            rows = jnp.arange(b)[:, None]  # [B, 1] with positions [B, T]: indexes [B, T, K, H]
            write = lambda buf, x: buf.at[rows, :, positions].set(x.astype(buf.dtype), mode="drop")
            if cache.quantized:  # int8 K/V [B, T, K, H] and their scales [B, T, K] at the same places
                (key, k_scale), (value, v_scale) = quantize_kv(key), quantize_kv(value)
                new_cache = LayerCache(write(cache.k, key), write(cache.v, value),
                                       write(cache.k_scale, k_scale), write(cache.v_scale, v_scale))
            else:
                new_cache = LayerCache(write(cache.k, key), write(cache.v, value))
            if t == 1:  # decode: row b attends [.., p] of its own cache; a position >= S is an idle row
                p = positions[:, 0]
                lengths = jnp.where(p < cache.k.shape[2], p + 1, 0)
                encoded = decode_attention(q[:, 0], new_cache.k, new_cache.v, lengths, k_scale=new_cache.k_scale,
                                           v_scale=new_cache.v_scale, **kw)[:, None]
            else:
                encoded = _masked_attention(cfg, q, new_cache, positions, kv_len, window)
        encoded = encoded.reshape(b, t, n, h).astype(x.dtype)
        out = _project(proj.ATTN_VEC, cfg, dt, encoded)  # [B, T, D]
        return _plus_lora(out, lora, "o_proj", encoded), new_cache


def _masked_attention(cfg: GemmaConfig, q, cache: LayerCache, positions, kv_len: int | None, window):
    """Several tokens per row against the first kv_len cache entries, masked by position (a [B, T, S]
    mask and [B, K, G, T, S] logits): q [B, T, N, H] -> [B, T, N, H]."""
    b, t, n, h = q.shape
    k = cfg.num_kv_heads
    span = kv_len or cache.k.shape[2]
    keys, values = cache.k[:, :, :span], cache.v[:, :, :span]
    if cache.quantized:  # int8: this path reads a dequantized copy of the span (decode never does)
        keys = dequantize(QArray(keys, cache.k_scale[:, :, :span, None]), jnp.float32).astype(q.dtype)
        values = dequantize(QArray(values, cache.v_scale[:, :, :span, None]), jnp.float32).astype(q.dtype)
    k_pos = jnp.broadcast_to(jnp.arange(span), (b, span))
    q = (q * jnp.asarray(cfg.query_scale, q.dtype)).reshape(b, t, k, n // k, h)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap:
        logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    mask = _attention_mask(positions, k_pos, window)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum("BKGTS,BKSH->BTKGH", probs, values).reshape(b, t, n, h)


class FeedForward(nn.Module):
    """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_down. gating_einsum[:, 0] is the gate."""

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lora=None):
        cfg, dt = self.config, self.param_dtype
        gate_up = _project(proj.GATING, cfg, dt, x)  # [B, T, C, F]
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        gate = _plus_lora(gate, lora, "gate_proj", x)
        up = _plus_lora(up, lora, "up_proj", x)
        hidden = gelu_tanh(gate) * up
        out = _project(proj.LINEAR, cfg, dt, hidden)  # [B, T, D]
        return _plus_lora(out, lora, "down_proj", hidden)


def _project(p: proj.Projection, config: GemmaConfig, dtype, x: jax.Array) -> jax.Array:
    """Declare projection `p`'s weight (its shape and logical axes) and apply its forward einsum."""
    return Einsum(p.shape(config), p.axes, dtype, name=p.name)(p.equation, x)


def _plus_lora(y: jax.Array, lora, target: str, x: jax.Array) -> jax.Array:
    """y + the LoRA delta of `target` for input x (y itself without a bank or that target)."""
    if lora is None:
        return y
    delta = lora_delta(lora, target, x)
    return y if delta is None else y + delta.astype(y.dtype)


class Block(nn.Module):
    config: GemmaConfig
    local: bool
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, positions, cache, kv_len, lora=None, return_kv=False):
        cfg, dt = self.config, self.param_dtype
        with jax.named_scope("attention"):
            h = RMSNorm("embed", cfg.norm_eps, dt, name="pre_attention_norm")(x)
            h, new_cache = Attention(cfg, self.local, dt, self.attn_impl, name="attn")(
                h, positions, cache, kv_len, lora, return_kv)
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
    """Token embedding [V, D], scaled by sqrt(D) on the way in, tied as the output projection.

    The stored table may be an int8 `quantize.QArray` with one scale per vocabulary row: the lookup
    dequantizes only the rows it takes, the unembedding scales each logit by its row's scale."""

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        shape = (self.config.vocab_size, self.config.embed_dim)
        self.input_embedding = stored_param(self, "input_embedding", init, shape, self.param_dtype)

    def encode(self, tokens):  # [B, T] -> [B, T, D]
        # The sqrt(D) normaliser is cast to the activation dtype first (bf16: 55.5, not 55.4256).
        scale = jnp.asarray(math.sqrt(self.config.embed_dim), self.param_dtype)
        if is_qarray(self.input_embedding):
            return lookup(self.input_embedding, tokens).astype(self.param_dtype) * scale
        return jnp.take(self.input_embedding, tokens, axis=0) * scale

    def decode(self, x):  # [B, T, D] -> [B, T, V] float32
        if is_qarray(self.input_embedding):
            return qeinsum("BTD,VD->BTV", x, self.input_embedding, preferred_element_type=jnp.float32)
        return unembed(x, self.input_embedding.astype(x.dtype), preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """tokens [B, T], positions [B, T], cache | None -> (logits [B, T, V] float32, cache | None).

    lora: None or (bank, adapter_ids [B]) with bank an `lora.AdapterBank` (per-row adapters).
    kv_len: a dense cache's bound (`forward`), or with a PagedCache the PagedBatch saying where each
    token's K/V goes and which pages it reads (`forward_paged`: B tokens, T = 1).
    """

    config: GemmaConfig
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"
    hidden_only: bool = False  # return the final-normed hidden states [.., D], not logits (`logits_from_hidden`)

    @nn.compact
    def __call__(self, tokens, positions, cache: Cache | PagedCache | None = None,
                 kv_len: int | PagedBatch | None = None, lora=None, logits_at: jax.Array | None = None,
                 return_kv: bool = False, rows: jax.Array | None = None):
        cfg, dt = self.config, self.param_dtype
        embedder = Embedder(cfg, dt, name="embedder")
        x = embedder.encode(tokens)
        new_cache: Cache | None = None if cache is None and not return_kv else {}
        for i, kind in enumerate(cfg.layer_types):
            name = f"layer_{i}"
            layer_lora = None if lora is None else (lora[0].layers[name], lora[1])
            x, layer_cache = Block(cfg, kind == "local", dt, self.attn_impl, name=name)(
                x, positions, None if cache is None else cache[name], kv_len, layer_lora, return_kv)
            if new_cache is not None:
                new_cache[name] = layer_cache
        if logits_at is not None:  # only one position per row needs logits (e.g. a prompt's last)
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        if rows is not None:  # only these rows need logits (a flat batch's sampling tokens)
            x = x[rows]  # [R, T, D]
        x = RMSNorm("embed", cfg.norm_eps, dt, name="final_norm")(x)
        if self.hidden_only:
            return x, new_cache
        return _softcap(embedder.decode(x), cfg), new_cache


def _softcap(logits: jax.Array, config: GemmaConfig) -> jax.Array:
    if config.final_logit_softcap:
        return jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def logits_from_hidden(params, x: jax.Array, *, config: GemmaConfig) -> jax.Array:
    """The output projection of final-normed hidden states x [..., D] (what `forward_paged(...,
    unembed=False)` returns): logits [..., V] float32, soft-capped as `Transformer` does."""
    dtype = params["embedder"]["input_embedding"].dtype
    rows = x.reshape(-1, 1, x.shape[-1])  # the [B, T, D] that `Embedder.decode` takes
    logits = Embedder(config, dtype).apply({"params": params["embedder"]}, rows, method="decode")
    return _softcap(logits, config).reshape(*x.shape[:-1], logits.shape[-1])


def forward(params, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *,
            config: GemmaConfig, kv_len: int | None = None, lora=None, logits_at: jax.Array | None = None,
            return_kv: bool = False, attn_impl: str = "xla"):
    """Pure forward pass. params: the tree `params.init_params` returns (no "params" wrapper).

    tokens, positions: [B, T] int32. cache: from `init_cache` or a previous call, or None to run
    without one. Without a cache the tokens attend each other causally by index, so each row's real
    tokens must have positions 0, 1, ... (padding after them may have any position, e.g. S so that a
    later cache write drops it). With a cache and T == 1 (decode), row b attends cache positions up
    to its own (`attention.decode_attention`, reading only those; a position >= S marks an idle row).
    kv_len (static): with a cache and T > 1, attend only the first kv_len cache entries (must exceed
    every position in this call); decode needs no bound. return_kv (static, no cache): also return
    this call's keys/values as a Cache of [B, K, T, H] per layer (index t = token t), for a caller to
    place into a decode cache. attn_impl (static): one of `attention.IMPLS`. lora: None, or
    (bank, adapter_ids [B] int32) to add each row's LoRA adapter from an `lora.AdapterBank` (id 0 =
    no adapter). logits_at: None, or [B] int positions:
    then only those positions are unembedded and logits are [B, 1, V] (a prefill needs only each
    prompt's last position; the full [B, T, V] would be 2 GiB for one 2048-token Gemma 3 prompt).
    Returns (logits [B, T, V] float32, new cache, or this call's keys/values with return_kv, or None).
    """
    dtype = params["embedder"]["input_embedding"].dtype
    return Transformer(config, dtype, attn_impl).apply({"params": params}, tokens, positions, cache, kv_len, lora,
                                                       logits_at, return_kv)


def paged_products(config: GemmaConfig, tokens: int) -> str:
    """The XLA paged attention's product form for a flat batch of `tokens` tokens of this model on
    this backend (`attention.default_products`: "reduce" on a CPU for a large MHA batch, else "dot");
    jit a step with `attention.compiler_options` of it (`engine/paged.py` does)."""
    groups = config.num_heads // config.num_kv_heads
    return default_products(tokens, config.num_kv_heads, groups, config.head_dim)


def forward_paged(params, tokens: jax.Array, positions: jax.Array, cache: PagedCache, batch: PagedBatch, *,
                  config: GemmaConfig, lora=None, logits_rows: jax.Array | None = None, attn_impl: str = "xla",
                  unembed: bool = True):
    """One step over a flat, ragged token batch and a paged KV cache (issue 17's step, the model part).

    tokens, positions: [T] int32: decode tokens and prompt chunks of any sequences, in any order,
    padded (position -1: attends nothing, writes page 0). Each token's K/V is written at
    (batch.pages, batch.offsets) first; then every token attends its own sequence's positions up to
    its own (`paged_attention.ragged_paged_attention`). lora: None or (bank, adapter_ids [T]) per
    token. logits_rows: None (logits for every token) or [R] int token indices (the last token of
    each sequence that samples). attn_impl (static): `paged_attention.paged_attention_fn`'s impl.
    unembed (static): False returns the final-normed hidden states [R or T, D] instead of logits
    (for a caller that may not need them: `logits_from_hidden`).
    Returns (logits [R or T, V] float32, new cache).
    """
    dtype = params["embedder"]["input_embedding"].dtype
    logits, new_cache = Transformer(config, dtype, attn_impl, hidden_only=not unembed).apply(
        {"params": params}, tokens[:, None], positions[:, None], cache, batch, lora, None, False, logits_rows)
    return logits[:, 0], new_cache
