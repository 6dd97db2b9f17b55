"""LoRA adapters on our parameter tree: the `Adapter` pytree, a functional merge, and an adapter bank.

A PEFT LoRA adapter adds, to a projection y = W x ([out, in], torch layout), a low-rank delta
scale * B (A x) with A [r, in], B [out, r]. Our weights are named-dim einsum tensors, not [out, in]
matrices (`params.py`), so A and B are stored in *our* layout, derived once per target from
`weights.hf.LINEARS` (the table that already maps every HF projection onto our tree) by pushing an
index matrix through its `to_ours` reshape: whatever axes of our weight come from `in` go to A,
whatever come from `out` go to B. For this code base that gives

    target      weight (ours)                A              B
    q_proj      attn/q_einsum     [D, N, H]  [D, r]         [r, N, H]
    k_proj      attn/kv_einsum[:, 0] [D, K, H]  [D, r]      [r, K, H]
    v_proj      attn/kv_einsum[:, 1] [D, K, H]  [D, r]      [r, K, H]
    o_proj      attn/attn_vec_einsum [N,H,D] [N, H, r]      [r, D]
    gate_proj   mlp/gating_einsum[0] [D, F]  [D, r]         [r, F]
    up_proj     mlp/gating_einsum[1] [D, F]  [D, r]         [r, F]
    down_proj   mlp/linear        [F, D]     [F, r]         [r, D]

and the delta of a weight is exactly `einsum(A, B)` back in the weight's axis order.

Two ways to serve an adapter (docs/lora.md says when to use which):
- `merge_lora(params, adapter, scale)`: a merged copy of the weights, zero per-token overhead. Pure and
  jit-compiled; each weight keeps its dtype and sharding (the delta is computed in float32).
- `AdapterBank`: C slots of adapters on device, padded to one max rank R (zero rows/columns of A and
  B add exactly nothing), slot 0 all zeros = "no adapter". `forward(..., lora=(bank, ids))` adds
  each row's delta (x A[ids]) B[ids] * scale[ids] (see `layers.lora_delta`), so one batch can mix
  adapters. `bank_add` / `bank_remove` update one slot in place (the bank is donated, the shapes never
  change): no recompilation of anything that takes the bank as an argument.

PEFT files are read and validated by `weights.peft.load_adapter`; this module knows nothing of files.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma_jax import params as params_lib
from gemma_jax import sharding
from gemma_jax.config import GemmaConfig
from gemma_jax.weights.hf import LINEARS

TARGETS: tuple[str, ...] = tuple(LINEARS)  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
DEFAULT_MAX_RANK = 32

# Shape letters of the module legend (`GemmaConfig`), by logical axis name; used to write the merge
# equations with named dims. R is the LoRA rank.
_LETTERS = {"heads": "N", "kv_heads": "K", "embed": "D", "head_dim": "H", "mlp": "F"}


class LoraError(ValueError):
    """An adapter that cannot be used with this base model (bad files, shapes, options, rank...)."""


# --- layouts: [r, in] / [out, r] torch -> ours ------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class TargetLayout:
    """How one target's A and B sit in our layout (all derived from `LINEARS`, nothing re-typed)."""

    target: str
    path: tuple[str, ...]  # the weight inside layer_i
    index: int | None  # position in the weight's stacked axis (params.STACK_AXIS), if any
    in_features: int
    out_features: int
    in_shape: tuple[int, ...]  # A is [*in_shape, r]
    out_shape: tuple[int, ...]  # B is [r, *out_shape]
    in_names: tuple[str, ...]  # logical axes of in_shape / out_shape (for shardings and equations)
    out_names: tuple[str, ...]
    in_map: np.ndarray  # [*in_shape] -> flat torch `in` index
    out_map: np.ndarray  # [*out_shape] -> flat torch `out` index
    merge_eqn: str  # einsum(A, B) -> delta in the weight's axis order, e.g. "DR,RNH->NDH"

    def a_to_ours(self, a: np.ndarray) -> np.ndarray:
        """torch lora_A [r, in] -> [*in_shape, r]."""
        return np.moveaxis(a[:, self.in_map], 0, -1)

    def b_to_ours(self, b: np.ndarray) -> np.ndarray:
        """torch lora_B [out, r] -> [r, *out_shape]."""
        return np.moveaxis(b[self.out_map], -1, 0)


@functools.lru_cache(maxsize=64)
def target_layout(config: GemmaConfig, target: str) -> TargetLayout:
    linear = LINEARS[target]
    shape, names = _weight_slice(config, linear)
    out_f, in_f = linear.from_ours(np.zeros(shape, np.int8), config).shape
    flat = linear.to_ours(np.arange(out_f * in_f).reshape(out_f, in_f), config)  # [*shape]
    ins, outs = flat % in_f, flat // in_f
    # Which axes of our weight come from `in` and which from `out`: read off a probe config with
    # every dimension doubled, so that no axis has size 1 (MQA's single kv head would say nothing).
    probe = config.replace(num_layers=1, attention_types=(), vocab_size=8, embed_dim=2 * config.embed_dim,
                           head_dim=2 * config.head_dim, hidden_dim=2 * config.hidden_dim,
                           num_heads=2 * config.num_heads, num_kv_heads=2 * config.num_kv_heads)
    p_shape, _ = _weight_slice(probe, linear)
    p_out, p_in = linear.from_ours(np.zeros(p_shape, np.int8), probe).shape
    p_flat = linear.to_ours(np.arange(p_out * p_in).reshape(p_out, p_in), probe)
    in_axes = tuple(k for k in range(len(shape)) if np.ptp(p_flat % p_in, axis=k).any())
    out_axes = tuple(k for k in range(len(shape)) if np.ptp(p_flat // p_in, axis=k).any())
    assert sorted(in_axes + out_axes) == list(range(len(shape))), (target, in_axes, out_axes)
    first = lambda array, keep: array[tuple(slice(None) if k in keep else 0 for k in range(len(shape)))]
    letters = "".join(_LETTERS[n] for n in names)
    a_letters = "".join(letters[k] for k in in_axes)
    b_letters = "".join(letters[k] for k in out_axes)
    return TargetLayout(
        target=target, path=linear.path, index=linear.index, in_features=in_f, out_features=out_f,
        in_shape=tuple(shape[k] for k in in_axes), out_shape=tuple(shape[k] for k in out_axes),
        in_names=tuple(names[k] for k in in_axes), out_names=tuple(names[k] for k in out_axes),
        in_map=first(ins, in_axes), out_map=first(outs, out_axes),
        merge_eqn=f"{a_letters}R,R{b_letters}->{letters}",
    )


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
        lay = target_layout(config, target)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rank = a.shape[0]
        if a.shape != (rank, lay.in_features):
            raise LoraError(f"layer {layer} {target}: lora_A has shape {tuple(a.shape)}, "
                            f"the base model needs ({rank}, {lay.in_features})")
        if b.shape != (lay.out_features, rank):
            raise LoraError(f"layer {layer} {target}: lora_B has shape {tuple(b.shape)}, "
                            f"the base model needs ({lay.out_features}, {rank})")
        layers.setdefault(f"layer_{layer}", {})[target] = LoraWeights(
            a=jnp.asarray(lay.a_to_ours(a), dtype), b=jnp.asarray(lay.b_to_ours(b), dtype),
            scale=jnp.asarray(scale, jnp.float32))
    return Adapter(layers=layers, config=config)


# --- functional merge -----------------------------------------------------------------------------
def _merge_impl(weights: dict, adapter: Adapter, scale: jax.Array) -> dict:
    """weights: "layer_i" -> path -> array (only the projections the adapter touches)."""
    out = {}
    for name, targets in adapter.layers.items():
        merged = {path: w.astype(jnp.float32) for path, w in weights[name].items()}
        for target, lw in targets.items():
            lay = target_layout(adapter.config, target)
            delta = jnp.einsum(lay.merge_eqn, lw.a.astype(jnp.float32), lw.b.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST) * (lw.scale * scale)
            w = merged[lay.path]
            merged[lay.path] = w + delta if lay.index is None else w.at[:, lay.index].add(delta)
        out[name] = {path: merged[path].astype(w.dtype) for path, w in weights[name].items()}
    return out


@functools.lru_cache(maxsize=16)
def _merge_jit(out_shardings):
    return jax.jit(_merge_impl, out_shardings=out_shardings.tree)


def merge_lora(params, adapter: Adapter, scale: float = 1.0):
    """params + scale * adapter, as a new tree; `scale=-1` undoes a merge (within float rounding).

    Pure: `params` is not modified, untouched leaves are shared with it. Each merged weight keeps its
    dtype and sharding (the delta is computed and added in float32, then cast back). One compile per
    (adapter structure, param shardings); `scale` is traced.
    """
    touched = {name: {target_layout(adapter.config, t).path for t in targets}
               for name, targets in adapter.layers.items()}
    weights = {}
    for name, paths in touched.items():
        if name not in params:
            raise LoraError(f"the adapter has {name} but the base model has {len(_layers(params))} layers")
        weights[name] = {}
        for path in paths:
            w = params_lib.get_path(params[name], path)
            want = params_lib.get_path(params_lib.param_shapes(adapter.config)[name], path).shape
            if w.shape != want:
                raise LoraError(f"{name}/{'/'.join(path)} has shape {w.shape}, the adapter's base model needs {want}")
            weights[name][path] = w if isinstance(w, jax.Array) else jnp.asarray(w)
    out_shardings = jax.tree.map(lambda w: w.sharding, weights)
    merged = _merge_jit(_Hashable(out_shardings))(weights, adapter, jnp.float32(scale))
    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))  # new dicts, same leaves
    for name, paths in merged.items():
        for path, w in paths.items():
            params_lib.set_path(out[name], path, w)
    return out


# --- the adapter bank -----------------------------------------------------------------------------
@flax.struct.dataclass
class BankWeights:
    """One target of one layer for all C slots, padded to the bank's rank R."""

    a: jax.Array  # [C, *in, R]
    b: jax.Array  # [C, R, *out]
    scale: jax.Array  # [C] float32


@flax.struct.dataclass
class AdapterBank:
    """C adapter slots on device: "layer_i" -> target -> BankWeights. Slot 0 stays zero (no adapter)."""

    layers: dict[str, dict[str, BankWeights]]
    config: GemmaConfig = flax.struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return next(iter(next(iter(self.layers.values())).values())).scale.shape[0]

    @property
    def rank(self) -> int:
        return next(iter(next(iter(self.layers.values())).values())).a.shape[-1]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(next(iter(self.layers.values())))

    def layer(self, i: int) -> dict[str, BankWeights]:
        return self.layers[f"layer_{i}"]


def bank_nbytes(config: GemmaConfig, capacity: int, rank: int, dtype=jnp.float32,
                targets: Iterable[str] = TARGETS) -> int:
    """Device bytes of a bank: C * L * sum over targets of R * (in + out) * dtype bytes (+ scales)."""
    per_layer = sum(rank * (target_layout(config, t).in_features + target_layout(config, t).out_features)
                    for t in targets)
    return capacity * config.num_layers * (per_layer * jnp.dtype(dtype).itemsize + 4 * len(tuple(targets)))


def _bank_axes(config: GemmaConfig, targets: tuple[str, ...]) -> dict:
    """Logical axes of every bank array (slot and rank axes are never sharded)."""
    def weights(t):
        lay = target_layout(config, t)
        return BankWeights(a=(None, *lay.in_names, None), b=(None, None, *lay.out_names), scale=(None,))
    return {f"layer_{i}": {t: weights(t) for t in targets} for i in range(config.num_layers)}


def _zeros_bank(config: GemmaConfig, capacity: int, rank: int, dtype, targets: tuple[str, ...]) -> AdapterBank:
    def weights(t):
        lay = target_layout(config, t)
        return BankWeights(a=jnp.zeros((capacity, *lay.in_shape, rank), dtype),
                           b=jnp.zeros((capacity, rank, *lay.out_shape), dtype),
                           scale=jnp.zeros((capacity,), jnp.float32))
    return AdapterBank({f"layer_{i}": {t: weights(t) for t in targets} for i in range(config.num_layers)}, config)


def bank_shardings(config: GemmaConfig, capacity: int, rank: int, mesh: Mesh, targets: Iterable[str] = TARGETS,
                   rules: sharding.Rules = sharding.DEFAULT_RULES) -> AdapterBank:
    """NamedShardings for a bank: in/out axes sharded like the weights they modify (heads, mlp...)."""
    targets = tuple(targets)
    shapes = jax.eval_shape(lambda: _zeros_bank(config, capacity, rank, jnp.float32, targets))
    axes = _bank_axes(config, targets)
    return AdapterBank(sharding.tree_shardings(axes, shapes.layers, mesh, rules), config)


def make_bank(config: GemmaConfig, capacity: int, max_rank: int = DEFAULT_MAX_RANK, dtype=jnp.float32,
              mesh: Mesh | None = None, targets: Iterable[str] = TARGETS) -> AdapterBank:
    """An empty bank of `capacity` slots (slot 0 included) and rank `max_rank`, created on device."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoraError(f"unknown target module(s) {unknown}: supported are {', '.join(TARGETS)}")
    if capacity < 1 or max_rank < 1:
        raise LoraError(f"a bank needs capacity >= 1 and max_rank >= 1, got {capacity} and {max_rank}")
    out = None if mesh is None else bank_shardings(config, capacity, max_rank, mesh, targets)
    return jax.jit(lambda: _zeros_bank(config, capacity, max_rank, jnp.dtype(dtype), targets), out_shardings=out)()


def _slot_impl(bank: AdapterBank, index: jax.Array, slot: dict) -> AdapterBank:
    """Write one slot (slot: "layer_i" -> target -> BankWeights without the C axis)."""
    def put(full, one):
        return jax.lax.dynamic_update_index_in_dim(full, one.astype(full.dtype), index, axis=0)
    return bank.replace(layers=jax.tree.map(put, bank.layers, slot))


@functools.lru_cache(maxsize=16)
def _slot_jit(out_shardings):
    return jax.jit(_slot_impl, donate_argnums=(0,), out_shardings=out_shardings.tree)


def _write_slot(bank: AdapterBank, index: int, slot: dict) -> AdapterBank:
    shardings = bank.replace(layers=jax.tree.map(lambda x: x.sharding, bank.layers))
    return _slot_jit(_Hashable(shardings))(bank, jnp.int32(index), slot)


def _check_index(bank: AdapterBank, index: int) -> int:
    index = int(index)
    if not 1 <= index < bank.capacity:
        raise LoraError(f"adapter slot {index} is out of range: slots 1..{bank.capacity - 1} hold adapters "
                        "(slot 0 means no adapter)")
    return index


def bank_add(bank: AdapterBank, index: int, adapter: Adapter) -> AdapterBank:
    """Put `adapter` in slot `index` (1 <= index < C), zero-padded to the bank's rank. The bank is donated.

    The padded slot always has the bank's shapes, so this compiles once per bank, whatever the
    adapter's rank or targets; functions that take the bank as an argument never recompile.
    """
    index = _check_index(bank, index)
    if adapter.config != bank.config:
        raise LoraError("the adapter was built for a different base model than the bank's")
    if adapter.rank > bank.rank:
        raise LoraError(f"adapter rank {adapter.rank} exceeds the bank's maximum rank {bank.rank}")
    missing = [t for t in adapter.targets if t not in bank.targets]
    if missing:
        raise LoraError(f"the bank has no room for target module(s) {missing} (bank targets: {', '.join(bank.targets)})")
    r = bank.rank
    slot = {}
    for name, targets in bank.layers.items():
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
    return _write_slot(bank, index, slot)


def bank_remove(bank: AdapterBank, index: int) -> AdapterBank:
    """Zero slot `index`: rows that still name it get the base model. The bank is donated."""
    index = _check_index(bank, index)
    slot = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), bank.layers)
    return _write_slot(bank, index, slot)


def bank_from_adapters(config: GemmaConfig, adapters: Iterable[Adapter], capacity: int | None = None,
                       max_rank: int = DEFAULT_MAX_RANK, dtype=jnp.float32, mesh: Mesh | None = None) -> AdapterBank:
    """A bank holding `adapters` in slots 1, 2, ... (slot 0 = no adapter)."""
    adapters = list(adapters)
    bank = make_bank(config, capacity or len(adapters) + 1, max_rank, dtype, mesh)
    for i, adapter in enumerate(adapters, start=1):
        bank = bank_add(bank, i, adapter)
    return bank


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


def _weight_slice(config: GemmaConfig, linear) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Shape and logical axes of the weight a projection writes (its slice, for a stacked pair)."""
    shape = params_lib.get_path(params_lib.param_shapes(config)["layer_0"], linear.path).shape
    names = params_lib.get_path(params_lib.param_axes(config)["layer_0"], linear.path)
    if linear.index is None:
        return shape, names
    drop = params_lib.STACK_AXIS
    return shape[:drop] + shape[drop + 1:], names[:drop] + names[drop + 1:]


def _layers(params) -> list[str]:
    return [k for k in params if k.startswith("layer_")]
