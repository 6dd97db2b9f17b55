"""LoRA adapters on our parameter tree: the `Adapter` pytree, a functional merge, and an adapter bank.

A PEFT LoRA adapter adds, to a projection y = W x ([out, in], torch layout), a low-rank delta
scale * B (A x) with A [r, in], B [out, r]. Our weights are [*ins, *outs] named-dim tensors (a
stacked pair has its "stack" axis between the two), so A and B are stored in *our* layout, read off
the projection's axis table (`projections.TARGETS`): A [*ins, r], B [r, *outs]. That gives

    target      weight (ours)                         A            B
    q_proj      attn/q_einsum              [D, N, H]  [D, r]       [r, N, H]
    k_proj      attn/kv_einsum[:, 0]       [D, K, H]  [D, r]       [r, K, H]
    v_proj      attn/kv_einsum[:, 1]       [D, K, H]  [D, r]       [r, K, H]
    o_proj      attn/attn_vec_einsum       [N, H, D]  [N, H, r]    [r, D]
    gate_proj   mlp/gating_einsum[:, 0]    [D, F]     [D, r]       [r, F]
    up_proj     mlp/gating_einsum[:, 1]    [D, F]     [D, r]       [r, F]
    down_proj   mlp/linear                 [F, D]     [F, r]       [r, D]

(kv_einsum is [D, 2, K, H] and gating_einsum [D, 2, F]: the pair is stacked at axis 1), and the delta
of a weight is exactly `einsum(A, B)` back in the weight's axis order (`Target.merge_equation`).

Two ways to serve an adapter (docs/lora.md says when to use which):
- `merge_lora(params, adapter, scale)`: a merged copy of the weights, zero per-token overhead. Pure and
  jit-compiled; each weight keeps its dtype and sharding (the delta is computed in float32). It jits
  `apply_adapter`, the same merge as a plain traceable function (what `finetune` differentiates).
- `AdapterBank`: adapter slots on device in rank buckets (e.g. ranks 8, 16, 32; the engine puts an
  adapter in the smallest that holds it, `AdapterBank.bucket_for`), each adapter zero-padded to its
  bucket's rank (zero rows/columns of A and B add exactly nothing), slot 0 of every bucket all zeros
  = "no adapter". `forward(..., lora=(bank, ids))` adds each row's delta (x A[id]) B[id] * scale[id],
  per bucket as grouped matmuls over the rows sorted by adapter on a GPU or TPU, as a one-hot
  product on a CPU (`layers.lora_delta`), so one batch can mix adapters. `bank_add` / `bank_remove`
  update one slot in place (its bucket is donated, the shapes never change): no recompilation of
  anything that takes the bank as an argument.

PEFT files are read and validated by `weights.peft.load_adapter`; this module knows nothing of files.
"""

from __future__ import annotations

import functools
from typing import Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma_jax import params as params_lib
from gemma_jax import projections
from gemma_jax import sharding
from gemma_jax.config import GemmaConfig

TARGETS: tuple[str, ...] = tuple(projections.TARGETS)  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
DEFAULT_MAX_RANK = 32


class LoraError(ValueError):
    """An adapter that cannot be used with this base model (bad files, shapes, options, rank...)."""


class BankFull(LoraError):
    """Every adapter slot of the bank is taken: a capacity limit, not a fault of the adapter."""


# --- the adapter pytree ---------------------------------------------------------------------------
@flax.struct.dataclass
class LoraWeights:
    """One target of one layer: delta = scale * einsum(a, b) in the weight's layout."""

    a: jax.Array  # [*in, r]
    b: jax.Array  # [r, *out]
    scale: jax.Array  # [] float32: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


@flax.struct.dataclass
class Adapter:
    """A LoRA adapter for one base `config`: "layer_i" -> target -> LoraWeights (absent = no delta)."""

    layers: dict[str, dict[str, LoraWeights]]
    config: GemmaConfig = flax.struct.field(pytree_node=False)

    @property
    def rank(self) -> int:
        """The largest rank of any target (rank_pattern may give targets different ranks)."""
        return max((w.a.shape[-1] for layer in self.layers.values() for w in layer.values()), default=0)

    @property
    def targets(self) -> tuple[str, ...]:
        present = {t for layer in self.layers.values() for t in layer}
        return tuple(t for t in TARGETS if t in present)


def adapter_from_torch(config: GemmaConfig, torch_weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]],
                       dtype=jnp.float32) -> Adapter:
    """Build an Adapter from {(layer, target): (lora_A [r, in], lora_B [out, r], scale)} (torch layout).

    Shapes are checked against the base model; `weights.peft` does every other validation.
    """
    layers: dict[str, dict[str, LoraWeights]] = {}
    for (layer, target), (a, b, scale) in sorted(torch_weights.items()):
        t = projections.TARGETS[target]
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rank, in_f, out_f = a.shape[0], t.in_features(config), t.out_features(config)
        if a.shape != (rank, in_f):
            raise LoraError(f"layer {layer} {target}: lora_A has shape {tuple(a.shape)}, "
                            f"the base model needs ({rank}, {in_f})")
        if b.shape != (out_f, rank):
            raise LoraError(f"layer {layer} {target}: lora_B has shape {tuple(b.shape)}, "
                            f"the base model needs ({out_f}, {rank})")
        layers.setdefault(f"layer_{layer}", {})[target] = LoraWeights(
            a=jnp.asarray(t.lora_a_from_torch(a, config), dtype), b=jnp.asarray(t.lora_b_from_torch(b, config), dtype),
            scale=jnp.asarray(scale, jnp.float32))
    return Adapter(layers=layers, config=config)


# --- functional merge -----------------------------------------------------------------------------
def apply_adapter(params, adapter: Adapter, scale: float | jax.Array = 1.0):
    """params + scale * adapter as a new tree: the one merge rule, pure and traceable (no jit, no
    sharding lookups), so it can run inside a jitted, differentiated loss (`finetune.loss_fn`).

    Each touched weight gets scale * adapter-scale * einsum(A, B) (`Target.merge_equation`), computed
    and added in float32, then cast back to the weight's dtype; a stacked pair gets it in its slice.
    `params` is not modified and every leaf the adapter does not touch is shared with it. `params`
    may be any tree holding the touched weights: `merge_lora` passes just those.
    """
    out = _new_dicts(params)
    for name, targets in adapter.layers.items():
        paths = {projections.TARGETS[t].path for t in targets}
        merged = {path: params_lib.get_path(params[name], path).astype(jnp.float32) for path in paths}
        for target, lw in targets.items():
            t = projections.TARGETS[target]
            delta = jnp.einsum(t.merge_equation, lw.a.astype(jnp.float32), lw.b.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST) * (lw.scale * scale)
            w = merged[t.path]
            at = (slice(None),) * projections.STACK_AXIS + (t.index,)
            merged[t.path] = w + delta if t.index is None else w.at[at].add(delta)
        for path, w in merged.items():
            params_lib.set_path(out[name], path, w.astype(params_lib.get_path(params[name], path).dtype))
    return out


@functools.lru_cache(maxsize=16)
def _merge_jit(out_shardings):
    return jax.jit(apply_adapter, out_shardings=out_shardings.tree)


def merge_lora(params, adapter: Adapter, scale: float = 1.0):
    """params + scale * adapter, as a new tree; `scale=-1` undoes a merge (within float rounding).

    `apply_adapter`, checked against the base model and jit-compiled over just the weights the
    adapter touches: `params` is not modified, untouched leaves are shared with it, and each merged
    weight keeps its dtype and sharding. One compile per (adapter structure, param shardings);
    `scale` is traced.
    """
    weights: dict = {}
    for name, targets in adapter.layers.items():
        if name not in params:
            raise LoraError(f"the adapter has {name} but the base model has {len(_layers(params))} layers")
        weights[name] = {}
        for path in {projections.TARGETS[t].path for t in targets}:
            w = params_lib.get_path(params[name], path)
            want = params_lib.get_path(params_lib.param_shapes(adapter.config)[name], path).shape
            if w.shape != want:
                raise LoraError(f"{name}/{'/'.join(path)} has shape {w.shape}, the adapter's base model needs {want}")
            params_lib.set_path(weights[name], path, w if isinstance(w, jax.Array) else jnp.asarray(w))
    out_shardings = jax.tree.map(lambda w: w.sharding, weights)
    merged = _merge_jit(_Hashable(out_shardings))(weights, adapter, jnp.float32(scale))
    out = _new_dicts(params)
    for name, leaves in merged.items():
        for path, w in params_lib.flatten(leaves).items():
            params_lib.set_path(out[name], path, w)
    return out


# --- the adapter bank -----------------------------------------------------------------------------
@flax.struct.dataclass
class BankWeights:
    """One target of one layer for all A slots of one rank bucket, padded to the bucket's rank R."""

    a: jax.Array  # [A, *ins, R]
    b: jax.Array  # [A, R, *outs]
    scale: jax.Array  # [A] float32


@flax.struct.dataclass
class AdapterBank:
    """Adapter slots on device, in rank buckets: "layer_i" -> target -> one BankWeights per bucket
    (ascending rank). Every bucket has `capacity` slots, its slot 0 zero (no adapter).

    Adapter ids number the slots of all buckets in a row: bucket k's slot s (1 <= s < capacity) is id
    k * (capacity - 1) + s, so an id names its bucket and slot with no table (`locate`), on the host
    and on the device alike (`layers.lora_delta`), and id 0 is no adapter in every bucket.
    """

    layers: dict[str, dict[str, tuple[BankWeights, ...]]]
    config: GemmaConfig = flax.struct.field(pytree_node=False)

    def _first(self) -> tuple[BankWeights, ...]:
        return next(iter(next(iter(self.layers.values())).values()))

    @property
    def capacity(self) -> int:
        """Slots per bucket, slot 0 included."""
        return self._first()[0].scale.shape[0]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of each bucket, ascending."""
        return tuple(w.a.shape[-1] for w in self._first())

    @property
    def rank(self) -> int:
        """The largest rank an adapter may have here (the last bucket's)."""
        return self.ranks[-1]

    @property
    def num_ids(self) -> int:
        """Adapter ids are 1..num_ids."""
        return len(self.ranks) * (self.capacity - 1)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(next(iter(self.layers.values())))

    def layer(self, i: int) -> dict[str, tuple[BankWeights, ...]]:
        return self.layers[f"layer_{i}"]

    def bucket(self, k: int) -> dict[str, dict[str, BankWeights]]:
        """Bucket k alone: "layer_i" -> target -> BankWeights."""
        return {name: {t: ws[k] for t, ws in targets.items()} for name, targets in self.layers.items()}

    def locate(self, adapter_id: int) -> tuple[int, int]:
        """Adapter id (1..num_ids) -> (bucket, slot in that bucket)."""
        index = _check_index(self, adapter_id)
        return (index - 1) // (self.capacity - 1), (index - 1) % (self.capacity - 1) + 1

    def bucket_ids(self, k: int) -> range:
        """The adapter ids of bucket k's slots 1..capacity-1."""
        return range(k * (self.capacity - 1) + 1, (k + 1) * (self.capacity - 1) + 1)

    def bucket_for(self, rank: int) -> int:
        """The smallest bucket that holds an adapter of `rank`; LoraError if none does."""
        if rank > self.rank:
            raise LoraError(f"adapter rank {rank} exceeds the bank's maximum rank {self.rank}")
        return next(k for k, r in enumerate(self.ranks) if r >= rank)


def bank_ranks(max_rank: int, rank_buckets: Iterable[int] = ()) -> tuple[int, ...]:
    """The ranks of a bank's buckets: those of `rank_buckets` below `max_rank`, then `max_rank`."""
    rank_buckets = tuple(int(r) for r in rank_buckets)
    if max_rank < 1 or any(r < 1 for r in rank_buckets):
        raise LoraError(f"LoRA ranks must be >= 1, got max_rank {max_rank} and rank buckets {list(rank_buckets)}")
    return tuple(sorted({r for r in rank_buckets if r < max_rank})) + (int(max_rank),)


def default_rank_buckets(platform: str) -> tuple[int, ...]:
    """The smaller rank buckets a bank gets by default (with the maximum rank: 8, 16, 32) on a GPU or
    TPU, where `lax.ragged_dot` reads only the slots a batch uses; none on a CPU, where the dense form
    (`layers.lora_delta`) reads every slot of every bucket, so buckets only add reads there."""
    return () if platform == "cpu" else (8, 16)


def bank_nbytes(config: GemmaConfig, capacity: int, rank: int, dtype=jnp.float32,
                targets: Iterable[str] = TARGETS, rank_buckets: Iterable[int] = ()) -> int:
    """Device bytes of a bank: A * L * sum over buckets and targets of R * (in + out) * dtype bytes
    (+ scales), A = `capacity` slots per bucket."""
    targets = tuple(targets)
    ts = [projections.TARGETS[t] for t in targets]
    ranks = bank_ranks(rank, rank_buckets)
    per_layer = sum(r * (t.in_features(config) + t.out_features(config)) for t in ts for r in ranks)
    return capacity * config.num_layers * (per_layer * jnp.dtype(dtype).itemsize + 4 * len(targets) * len(ranks))


def _bucket_axes(config: GemmaConfig, targets: tuple[str, ...]) -> dict:
    """Logical axes of every array of one bucket (slot and rank axes are never sharded)."""
    def weights(name):
        t = projections.TARGETS[name]
        return BankWeights(a=(None, *t.ins, None), b=(None, None, *t.outs), scale=(None,))
    return {f"layer_{i}": {t: weights(t) for t in targets} for i in range(config.num_layers)}


def _zeros_bucket(config: GemmaConfig, capacity: int, rank: int, dtype, targets: tuple[str, ...]) -> dict:
    def weights(name):
        t = projections.TARGETS[name]
        return BankWeights(a=jnp.zeros((capacity, *t.in_shape(config), rank), dtype),
                           b=jnp.zeros((capacity, rank, *t.out_shape(config)), dtype),
                           scale=jnp.zeros((capacity,), jnp.float32))
    return {f"layer_{i}": {t: weights(t) for t in targets} for i in range(config.num_layers)}


def _join(config: GemmaConfig, buckets: list[dict]) -> AdapterBank:
    """Per-bucket trees ("layer_i" -> target -> BankWeights) -> one AdapterBank."""
    return AdapterBank({name: {t: tuple(b[name][t] for b in buckets) for t in targets}
                        for name, targets in buckets[0].items()}, config)


def bank_shardings(config: GemmaConfig, capacity: int, rank: int, mesh: Mesh,
                   targets: Iterable[str] = TARGETS, rank_buckets: Iterable[int] = ()) -> AdapterBank:
    """NamedShardings for a bank: in/out axes sharded like the weights they modify (heads, mlp...)."""
    targets = tuple(targets)
    axes = _bucket_axes(config, targets)
    buckets = []
    for r in bank_ranks(rank, rank_buckets):
        shapes = jax.eval_shape(lambda r=r: _zeros_bucket(config, capacity, r, jnp.float32, targets))
        buckets.append(sharding.tree_shardings(axes, shapes, mesh))
    return _join(config, buckets)


def make_bank(config: GemmaConfig, capacity: int, max_rank: int = DEFAULT_MAX_RANK, dtype=jnp.float32,
              mesh: Mesh | None = None, targets: Iterable[str] = TARGETS,
              rank_buckets: Iterable[int] = ()) -> AdapterBank:
    """An empty bank, created on device: one bucket per rank of `bank_ranks(max_rank, rank_buckets)`
    (just `max_rank` by default), each of `capacity` slots (slot 0 included)."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoraError(f"unknown target module(s) {unknown}: supported are {', '.join(TARGETS)}")
    if capacity < 1 or max_rank < 1:
        raise LoraError(f"a bank needs capacity >= 1 and max_rank >= 1, got {capacity} and {max_rank}")
    ranks = bank_ranks(max_rank, rank_buckets)
    out = None if mesh is None else bank_shardings(config, capacity, max_rank, mesh, targets, ranks)
    return jax.jit(lambda: _join(config, [_zeros_bucket(config, capacity, r, jnp.dtype(dtype), targets)
                                          for r in ranks]), out_shardings=out)()


def _slot_impl(bucket: dict, index: jax.Array, slot: dict) -> dict:
    """Write one slot of one bucket (slot: "layer_i" -> target -> BankWeights without the A axis)."""
    def put(full, one):
        return jax.lax.dynamic_update_index_in_dim(full, one.astype(full.dtype), index, axis=0)
    return jax.tree.map(put, bucket, slot)


@functools.lru_cache(maxsize=16)
def _slot_jit(out_shardings):
    return jax.jit(_slot_impl, donate_argnums=(0,), out_shardings=out_shardings.tree)


def _write_slot(bank: AdapterBank, k: int, index: int, slot: dict) -> AdapterBank:
    """Bucket k with `slot` written at `index` (that bucket donated, the others untouched)."""
    bucket = bank.bucket(k)
    shardings = jax.tree.map(lambda x: x.sharding, bucket)
    new = _slot_jit(_Hashable(shardings))(bucket, jnp.int32(index), slot)
    return _join(bank.config, [new if j == k else bank.bucket(j) for j in range(len(bank.ranks))])


def _check_index(bank: AdapterBank, index: int) -> int:
    index = int(index)
    if not 1 <= index <= bank.num_ids:
        raise LoraError(f"adapter slot {index} is out of range: slots 1..{bank.num_ids} hold adapters "
                        "(slot 0 means no adapter)")
    return index


def bank_add(bank: AdapterBank, index: int, adapter: Adapter) -> AdapterBank:
    """Put `adapter` at adapter id `index` (1..num_ids), zero-padded to the rank of that id's bucket.
    The bucket is donated.

    The padded slot always has the bucket's shapes, so this compiles once per bucket shape, whatever
    the adapter's rank or targets; functions that take the bank as an argument never recompile.
    """
    k, slot_index = bank.locate(index)
    if adapter.config != bank.config:
        raise LoraError("the adapter was built for a different base model than the bank's")
    bank.bucket_for(adapter.rank)  # refuses a rank above the bank's maximum
    r = bank.ranks[k]
    if adapter.rank > r:
        raise LoraError(f"adapter rank {adapter.rank} exceeds the rank {r} of the bucket of adapter id {index}")
    missing = [t for t in adapter.targets if t not in bank.targets]
    if missing:
        raise LoraError(f"the bank has no room for target module(s) {missing} (bank targets: {', '.join(bank.targets)})")
    slot = {}
    for name, targets in bank.bucket(k).items():
        slot[name] = {}
        for t, full in targets.items():
            lw = adapter.layers.get(name, {}).get(t)
            if lw is None:
                slot[name][t] = BankWeights(a=np.zeros(full.a.shape[1:], full.a.dtype),
                                            b=np.zeros(full.b.shape[1:], full.b.dtype), scale=np.float32(0))
                continue
            pad = r - lw.a.shape[-1]
            slot[name][t] = BankWeights(
                a=jnp.pad(lw.a, [(0, 0)] * (lw.a.ndim - 1) + [(0, pad)]),
                b=jnp.pad(lw.b, [(0, pad)] + [(0, 0)] * (lw.b.ndim - 1)), scale=lw.scale)
    return _write_slot(bank, k, slot_index, slot)


def bank_remove(bank: AdapterBank, index: int) -> AdapterBank:
    """Zero adapter id `index`'s slot: rows that still name it get the base model. Its bucket is donated."""
    k, slot_index = bank.locate(index)
    slot = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), bank.bucket(k))
    return _write_slot(bank, k, slot_index, slot)


# --- helpers --------------------------------------------------------------------------------------
class _Hashable:
    """Wrap a pytree of shardings so it can key an lru_cache (compared by flattened leaves)."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple(leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


def _new_dicts(tree):
    """A copy of a tree of nested dicts: new dicts, the same leaves."""
    return jax.tree.map(lambda x: x, tree, is_leaf=lambda x: not isinstance(x, dict))


def _layers(params) -> list[str]:
    return [k for k in params if k.startswith("layer_")]
