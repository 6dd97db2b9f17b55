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

from gemma_jax.quantize import is_qarray, qeinsum, stored_param

Axes = tuple[str | None, ...]


class Einsum(nn.Module):
    """One weight `w` of `shape` with logical `axes`, applied by an einsum equation at call time.

    The stored `w` may be an int8 `quantize.QArray` (per-output-channel scales): then the einsum
    runs on the int8 weight and scales its output (`quantize.qeinsum`), with no float copy of w."""

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
        return jnp.einsum(eqn, x, w.astype(x.dtype))


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


def lora_delta(lora, target: str, x: jax.Array, eqn_in: str, eqn_out: str) -> jax.Array | None:
    """Per-row LoRA delta (x A[ids]) B[ids] * scale[ids], or None when the bank lacks `target`.

    lora: None, or (bank layer, ids [B]) where the bank layer maps a target name ("q_proj", ...) to
    weights with a [A, *in, R], b [A, R, *out], scale [A] (see `lora.AdapterBank`; A adapter slots).
    eqn_in contracts x with one row's A (e.g. "BTD,BDR->BTR"), eqn_out the result with one row's B
    ("BTR,BRD->BTD"); both come from `projections.Target.lora_equations`. Slot 0 of a bank is zeros,
    so rows with id 0 get exactly +0.

    Given a bank, the delta is always computed: a caller whose batch has no adapter at all passes
    lora=None instead (the engine compiles that variant separately), so base-model traffic never
    reads the bank. Two ways to apply it, chosen statically by what reads less memory per step
    (decode is bound by memory reads): with A <= B every row meets every adapter (the bank is read
    once, a one-hot mask keeps each row's own: "BTD,ADR->BTAR"); with A > B each row gathers its own
    A and B.
    """
    if lora is None:
        return None
    bank, ids = lora
    weights = bank.get(target)
    if weights is None:
        return None
    slots, batch = weights.a.shape[0], ids.shape[0]

    if slots > batch:  # gather each row's own adapter
        a = jnp.take(weights.a, ids, axis=0).astype(x.dtype)  # [B, *in, R]
        b = jnp.take(weights.b, ids, axis=0).astype(x.dtype)  # [B, R, *out]
        out = jnp.einsum(eqn_out, jnp.einsum(eqn_in, x, a), b)
        scale = jnp.take(weights.scale, ids, axis=0).astype(x.dtype)  # [B]
        return out * scale.reshape((-1,) + (1,) * (out.ndim - 1))

    (x_in, a_in), r_out = _split(eqn_in)  # e.g. BTD, BDR -> BTR
    (r_in, b_in), out = _split(eqn_out)  # e.g. BTR, BRD -> BTD
    mask = jax.nn.one_hot(ids, slots, dtype=x.dtype) * weights.scale.astype(x.dtype)[None]  # [B, A]
    xa = jnp.einsum(f"{x_in},A{a_in[1:]}->{r_out[:-1]}AR", x, weights.a.astype(x.dtype))  # [B, T, A, R]
    xa = xa * mask.reshape((batch,) + (1,) * (xa.ndim - 3) + (slots, 1))
    return jnp.einsum(f"{r_in[:-1]}AR,A{b_in[1:]}->{out}", xa, weights.b.astype(x.dtype))


def _split(eqn: str) -> tuple[tuple[str, str], str]:
    inputs, output = eqn.split("->")
    first, second = inputs.split(",")
    return (first, second), output
