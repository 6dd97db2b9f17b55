"""Small architectural pieces: a named-dims Einsum weight, RMSNorm(1 + w), rotary embedding.

Every weight is declared exactly once, here or in `model.py`, with its shape and its *logical* axis
names (`nn.with_logical_partitioning`). Random init, shardings (`sharding.py`) and checkpoint
loading (`weights/`) are all derived from these declarations, never re-typed.

Logical axis names: "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "stack" (the 2 of a
stacked pair such as k/v or gate/up), "batch", "cache_seq". The projections' axes are declared in
`projections.py`, which also holds the shape-letter legend.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.contraction import weight_einsum
from gemma_jax.quantize import is_qarray, qeinsum, stored_param

Axes = tuple[str | None, ...]


class Einsum(nn.Module):
    """One weight `w` of `shape` with logical `axes`, applied by an einsum equation at call time.

    The stored `w` may be an int8 `quantize.QArray` (per-output-channel scales): then the einsum
    runs on the int8 weight cast to x's dtype and the scale multiplies its output (`quantize.qeinsum`)."""

    shape: tuple[int, ...]
    axes: Axes
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
        w = stored_param(self, "w", init, self.shape, self.param_dtype)
        if is_qarray(w):
            return qeinsum(eqn, x, w)
        return weight_einsum(eqn, x, w.astype(x.dtype))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: normalise in float32, multiply by (1 + scale), cast back to the input dtype.

    `scale` is stored as Hugging Face and DeepMind store it (zero = identity); GGUF files store
    1 + scale and the GGUF loader subtracts the 1.
    """

    axis_name: str = "embed"
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.1  # random, not zero, so that random-weight parity tests exercise (1 + w)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (self.axis_name,))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale_factor: float = 1.0) -> jax.Array:
    """Rotary embedding, split-halves layout (the first half of H pairs with the second half).

    x: [B, T, N, H]; positions: [B, T] (int). Angles are computed in float32; sin and cos are cast
    to the activation dtype before the rotation, as transformers does.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / scale_factor
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def lora_delta(lora, target: str, x: jax.Array) -> jax.Array | None:
    """Per-row LoRA delta (x A[id]) B[id] * scale[id] of `target`, or None when the bank lacks it.

    x: [B, T, *in]; returns [B, T, *out]. lora: None, or (bank layer, ids [B] int32) where the bank
    layer maps a target name ("q_proj", ...) to one `lora.BankWeights` per rank bucket (a [A, *in, R],
    b [A, R, *out], scale [A]; A slots, slot 0 zeros) and id k * (A - 1) + s names bucket k's slot s
    (`lora.AdapterBank`); id 0 is no adapter in every bucket and adds exactly +0.

    Given a bank, the delta is always computed: a caller whose batch has no adapter at all passes
    lora=None instead (the engine compiles that variant separately), so base-model traffic never
    reads the bank. Per bucket, S-LoRA / Punica's shrink and expand as two grouped matmuls over the
    rows grouped by adapter (`_ragged_delta`): no per-row copy of any weight, each adapter's A and B
    read once per step. On a CPU, where XLA has no grouped kernel (`lax.ragged_dot` lowers to a dense
    masked matmul over every slot), the same product is computed as a one-hot product
    (`_dense_delta`), faster there (`benchmarks/lora.py`); `lax.platform_dependent` picks one when
    the function is lowered (a constant choice that XLA folds: no conditional in the compiled step).
    """
    if lora is None:
        return None
    bank, ids = lora
    buckets = bank.get(target)
    if buckets is None:
        return None
    delta, first = None, 0  # first: the id of this bucket's slot 0 (its slot s is id first + s)
    for weights in buckets:
        slots = weights.scale.shape[0]
        local = ids - first
        local = jnp.where((local > 0) & (local < slots), local, 0)  # rows of other buckets: slot 0
        d = jax.lax.platform_dependent(weights, local, x, cpu=_dense_delta, default=_ragged_delta)
        delta = d if delta is None else delta + d
        first += slots - 1
    return delta


def _ragged_delta(weights, ids: jax.Array, x: jax.Array) -> jax.Array:
    """One bucket's delta: rows sorted by slot, shrink x A and expand (x A) B as `lax.ragged_dot`s.

    ids [B] (slots of this bucket), x [B, T, *in] -> [B, T, *out]. The rows are put in slot order by
    a stable argsort of the B ids (only activations move), group g being the T * count(ids == g)
    sorted rows of slot g; the result is put back in row order. The multi-axis in / out dims are
    flattened for the matmuls (A [A, in, R], B [A, R, out]) and restored after.
    """
    slots, rank = weights.scale.shape[0], weights.a.shape[-1]
    batch, length, outs = x.shape[0], x.shape[1], weights.b.shape[2:]
    order = jnp.argsort(ids, stable=True)  # [B]: rows in slot order
    sizes = (ids[:, None] == jnp.arange(slots, dtype=ids.dtype)).sum(0, dtype=jnp.int32) * length  # [A]
    xs = jnp.take(x, order, axis=0).reshape(batch * length, -1)  # [B*T, in]
    a = weights.a.reshape(slots, -1, rank).astype(x.dtype)  # [A, in, R]
    b = weights.b.reshape(slots, rank, -1).astype(x.dtype)  # [A, R, out]
    xa = jax.lax.ragged_dot(xs, a, sizes).reshape(batch, length, rank)  # [B, T, R]
    xa = xa * jnp.take(weights.scale, ids[order]).astype(x.dtype)[:, None, None]
    y = jax.lax.ragged_dot(xa.reshape(batch * length, rank), b, sizes).reshape(batch, length, -1)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(batch, dtype=order.dtype))  # inverse permutation
    return jnp.take(y, back, axis=0).reshape(batch, length, *outs)


def _dense_delta(weights, ids: jax.Array, x: jax.Array) -> jax.Array:
    """One bucket's delta as the dense product `_ragged_delta` stands for: every row meets every
    slot's A (read once, in place), a one-hot mask keeps each row's own, then B. ids [B], x [B, T, *in]."""
    slots, rank = weights.scale.shape[0], weights.a.shape[-1]
    batch, length, outs = x.shape[0], x.shape[1], weights.b.shape[2:]
    a = weights.a.reshape(slots, -1, rank).astype(x.dtype)  # [A, in, R]
    b = weights.b.reshape(slots, rank, -1).astype(x.dtype)  # [A, R, out]
    mask = (ids[:, None] == jnp.arange(slots, dtype=ids.dtype)).astype(x.dtype) * weights.scale.astype(x.dtype)
    xa = jnp.einsum("BTI,AIR->BTAR", x.reshape(batch, length, -1), a) * mask[:, None, :, None]  # [B, T, A, R]
    return jnp.einsum("BTAR,ARO->BTO", xa, b).reshape(batch, length, *outs)
