"""The engine's device-resident state: `Prefix` (one prefill's result) and `DecodeState` (all slots).

Both are registered pytrees (flax.struct dataclasses), so they pass through `jax.jit` whole and the
decode state can be donated: every decode step updates it in place on the device. Everything a slot
needs to decode lives here, per slot, on the device: its KV cache rows, its sampling parameters and
RNG key, its penalty state, its step counter, its token budget and its adapter id. The host only
keeps bookkeeping (who owns which slot); it never has to send per-step data.

Slot bookkeeping, for a slot holding a prompt of L tokens that has drawn n tokens so far:

    lengths = L + n - 1     tokens already in the KV cache (the last drawn token is not yet)
    tokens  = the n-th drawn token, fed at position `lengths` by the next decode step
    step    = n             index of the next token to draw (the first, drawn by prefill, is 0)
    limit   = most tokens this slot may draw (max_tokens, cut to the total-token limit)
    done    = it drew a stop token or reached its limit; `active` = a request owns it

A slot is *live* when active and not done; only live slots write the cache or advance.

Shapes: P prompts in a prefill batch, T the prompt bucket, B decode slots, S cache positions per
slot, K kv heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax import params as params_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.model import Cache, init_cache
from gemma_jax.sampling import SamplingRows, empty_rows


@flax.struct.dataclass
class Prefix:
    """P prompts after prefill, ready to be inserted into decode slots (padding rows included)."""

    cache: Cache  # [P, K, T, H] per layer, T = the prompt bucket: prefill's K/V (t >= length: padding), int8 + scales for an int8 cache
    lengths: jax.Array  # [P] int32, true prompt lengths
    tokens: jax.Array  # [P] int32, the first drawn token
    rows: SamplingRows  # [P] per-row sampling parameters (keys included)
    seen: jax.Array  # [P, V] bool, tokens in prompt + drawn so far (repetition penalty)
    counts: jax.Array  # [P, V] int32, drawn-token counts (frequency / presence penalties)
    limit: jax.Array  # [P] int32, most tokens to draw
    adapter_ids: jax.Array  # [P] int32, 0 = base model
    done: jax.Array  # [P] bool, the first token already ends the request
    # Host-side, not a device value (so not a jit input): per row, what its decode needs, as
    # (adapter id > 0, sampling mode), written by `Engine.prefill_prompts` for `Engine.insert` to
    # record per slot. () = unknown (the engine then assumes the most general variant).
    needs: tuple[tuple[bool, str], ...] = flax.struct.field(pytree_node=False, default=())


@flax.struct.dataclass
class DecodeState:
    """B fixed decode slots (see the module docstring for the meaning of each field)."""

    cache: Cache  # [B, K, S, H] per layer (int8: with scales [B, K, S], `model.LayerCache`)
    lengths: jax.Array  # [B] int32
    tokens: jax.Array  # [B] int32
    rows: SamplingRows  # [B]
    seen: jax.Array  # [B, V] bool
    counts: jax.Array  # [B, V] int32
    step: jax.Array  # [B] int32
    limit: jax.Array  # [B] int32
    adapter_ids: jax.Array  # [B] int32
    active: jax.Array  # [B] bool
    done: jax.Array  # [B] bool

    @property
    def live(self) -> jax.Array:  # [B] bool
        return self.active & ~self.done


def init_decode_state(config: GemmaConfig, slots: int, max_len: int, cache_dtype=jnp.float32) -> DecodeState:
    """All slots free. Call inside jit (see `state_shardings`) to create it directly on devices.
    cache_dtype int8: an int8 KV cache with per-position scales (`model.init_cache`)."""
    zeros = jnp.zeros((slots,), jnp.int32)
    return DecodeState(
        cache=init_cache(config, slots, max_len, cache_dtype),
        lengths=zeros, tokens=zeros, rows=empty_rows(slots),
        seen=jnp.zeros((slots, config.vocab_size), bool),
        counts=jnp.zeros((slots, config.vocab_size), jnp.int32),
        step=zeros, limit=zeros, adapter_ids=zeros,
        active=jnp.zeros((slots,), bool), done=jnp.ones((slots,), bool),
    )


def state_shardings(config: GemmaConfig, slots: int, max_len: int, mesh: Mesh, cache_dtype=jnp.float32) -> DecodeState:
    """NamedShardings for a DecodeState: slots over "data", the cache's kv heads over "model" (an
    int8 cache's scales too: `params.cache_shardings`).

    Per-slot arrays are split over "data" when it divides the slot count, else replicated.
    """
    data = mesh.shape.get("data", 1)
    split = slots % data == 0 and data > 1

    def per_slot(x):
        spec = PartitionSpec("data", *([None] * (x.ndim - 1))) if split else PartitionSpec()
        return NamedSharding(mesh, spec)

    shapes = jax.eval_shape(lambda: init_decode_state(config, slots, max_len))
    out = jax.tree.map(per_slot, shapes)
    return out.replace(cache=params_lib.cache_shardings(config, slots, max_len, mesh, cache_dtype))


def prefix_shardings(config: GemmaConfig, mesh: Mesh, cache_dtype=jnp.float32) -> Prefix:
    """NamedShardings for a Prefix of any batch P and prompt bucket T: the cache's kv heads over
    "model" (as in the decode state), everything else replicated (P rows are a prefill batch, not
    slots: `insert` spreads them over the decode state's "data" split)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    cache = params_lib.cache_shardings(config, 1, 1, mesh, cache_dtype)  # batch 1: never split over "data"
    rows = jax.tree.map(lambda _: replicated, jax.eval_shape(lambda: empty_rows(1)))
    return Prefix(cache=cache, lengths=replicated, tokens=replicated, rows=rows, seen=replicated,
                  counts=replicated, limit=replicated, adapter_ids=replicated, done=replicated)
