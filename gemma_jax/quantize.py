"""int8 weight-only quantization: per-output-channel scales, dequantized inside the matmul.

    quantize_params(params, config, dtype=None) -> params   (the same tree, big weights as QArray)

Which weights: every projection of every layer (`projections.PROJECTIONS`) and the embedding. Norm
scales stay float. Each quantized weight becomes a `QArray` in the same tree position:

    w      int8, the float weight's shape
    scale  the weight's shape with its contracted (input) axes set to 1, in the compute dtype

Symmetric, one scale per output channel: scale = max |w| over the input axes / 127 and
w = clip(round(w / scale), -127, 127), so |w - w_int8 * scale| <= scale / 2. A projection's input
axes are its `ins` (declared in `projections.py`, always the leading axes); the embedding [V, D]
contracts D both ways it is used, so its channel is the vocabulary row: one scale per token serves
the lookup (row v times scale[v]) and the tied unembedding (logit v times scale[v]).

Dequantized inside the matmul (`qeinsum`): the einsum runs on the int8 weight cast to the
activation dtype (int8 is exact in bf16) and its output is multiplied by the scale. The scale is
constant along the contracted axes, so it factors out of the sum: no dequantized float copy of a
weight is kept, and decoding reads 1 byte per weight instead of 2 or 4.

On XLA:CPU the int8 -> float convert is not fused into the matmul: each weight is converted into a
temporary float buffer every step, so int8 decodes several times slower than float on a CPU (see
BENCHMARKS.md). It is meant for accelerators, where decoding is bound by reading the weights.

The compute dtype is the scales' dtype, chosen when quantizing (default: the float weights' dtype).
`QArray.dtype` answers it, so code that asks the embedding for the model's dtype (`model.forward`,
the engine's cache and LoRA bank) gets the compute dtype, never int8. LoRA deltas are added to the
projection outputs in that dtype, as for a float model.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma_jax import projections as proj
from gemma_jax.contraction import weight_einsum
from gemma_jax.config import GemmaConfig

METHODS = ("int8",)
EMBEDDING = ("embedder", "input_embedding")
_EMBEDDING_CONTRACTED = (1,)  # [V, D]: D is contracted both in the lookup's use and in the unembedding


@flax.struct.dataclass
class QArray:
    """An int8 weight with per-output-channel scales (see the module docstring).

    Also used as a container of ShapeDtypeStructs, logical axes or shardings of the two parts."""

    w: jax.Array  # int8, the float weight's shape
    scale: jax.Array  # the weight's shape with the contracted axes 1; the compute dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self):
        """The compute dtype (the scales'), not int8: what the model computes in."""
        return self.scale.dtype


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def contracted_axes(config: GemmaConfig | int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path of each quantized weight: its contracted (input) axes}, for a config or a layer count."""
    out = {EMBEDDING: _EMBEDDING_CONTRACTED}
    for i in range(config if isinstance(config, int) else config.num_layers):
        for p in proj.PROJECTIONS:
            out[(f"layer_{i}", *p.path)] = tuple(range(len(p.ins)))
    return out


def is_quantized(params) -> bool:
    """Whether `params` holds quantized weights (the embedding is quantized with the rest)."""
    return is_qarray(params["embedder"]["input_embedding"])


# --- one array -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("contracted", "dtype"))
def quantize_array(w: jax.Array, contracted: tuple[int, ...], dtype=None) -> QArray:
    """w (float) -> QArray: symmetric int8, one scale per index of the axes not in `contracted`.

    The rounding uses the scale as stored (in `dtype`), so dequantization is exactly w_int8 * scale."""
    dtype = jnp.dtype(dtype if dtype is not None else w.dtype)
    w32 = w.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(w32), axis=contracted, keepdims=True) / 127.0).astype(dtype)
    s32 = scale.astype(jnp.float32)
    q = jnp.round(w32 / jnp.where(s32 > 0, s32, 1.0))
    return QArray(w=jnp.clip(q, -127, 127).astype(jnp.int8), scale=scale)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    """The float weight w_int8 * scale (for references and tests; the model never builds it)."""
    return q.w.astype(dtype) * q.scale.astype(dtype)


def qeinsum(eqn: str, x: jax.Array, q: QArray, **kwargs) -> jax.Array:
    """einsum(eqn, x, dequantize(q)) without building the dequantized weight: the int8 weight (cast
    to x's dtype) goes into the einsum, and the output is multiplied by the scale, which is constant
    along every contracted axis. eqn: "xletters,wletters->out" with q the second operand."""
    inputs, out = eqn.split("->")
    w_letters = inputs.split(",")[1]
    y = weight_einsum(eqn, x, q.w.astype(x.dtype), **kwargs)
    contracted = tuple(i for i, letter in enumerate(w_letters) if letter not in out)
    kept = "".join(letter for letter in w_letters if letter in out)
    scale = jnp.squeeze(q.scale, axis=contracted).astype(y.dtype)  # [the output channels]
    return jnp.einsum(f"{out},{kept}->{out}", y, scale)


def lookup(q: QArray, ids: jax.Array) -> jax.Array:
    """Rows `ids` of a quantized [V, D] table, dequantized: [..., D] in the compute dtype."""
    return jnp.take(q.w, ids, axis=0).astype(q.dtype) * jnp.take(q.scale, ids, axis=0)


def stored_param(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype):
    """`module.param(name, ...)`, or the stored QArray under that name (checked against `shape`).

    Flax checks a stored param's shape against its initializer's; a QArray is checked here instead."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_qarray(value):
            if value.shape != tuple(shape):
                raise ValueError(f"{module.name}/{name}: quantized weight shape {value.shape}, expected {tuple(shape)}")
            return value
    return module.param(name, init, shape, dtype)


# --- whole trees ---------------------------------------------------------------------------------
def _map_quantized(tree, config: GemmaConfig | None, fn):
    """A copy of the nested-dict `tree` with fn(leaf, contracted) at every quantized path (config
    None: the layers are the tree's own "layer_i" entries)."""
    out = _copy_dicts(tree)
    layers = sum(k.startswith("layer_") for k in tree) if config is None else config
    for path, contracted in contracted_axes(layers).items():
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = fn(parent[path[-1]], contracted)
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def quantize_params(params, config: GemmaConfig | None = None, dtype=None, method: str = "int8"):
    """Quantize the projections and the embedding of a float tree (see the module docstring).

    config: the model's (None: the layers are the tree's own "layer_i" entries).
    dtype: the compute dtype, stored as the scales' dtype (default: each weight's own float dtype).
    Norm scales keep their dtype (cast to `dtype` when it is given). Weights that are already
    QArrays are kept as they are. Runs on whatever devices the params are on; the result takes
    1/4 (float32) or 1/2 (bfloat16) of the projection and embedding bytes."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}: expected one of {METHODS}")
    out = _map_quantized(params, config,
                         lambda w, c: w if is_qarray(w) else quantize_array(w, c, None if dtype is None else jnp.dtype(dtype)))
    if dtype is not None:  # the float leaves left (norms) take the compute dtype too
        out = jax.tree.map(lambda x: x if is_qarray(x) else x.astype(dtype), out, is_leaf=is_qarray)
    return out


def quantized_shapes(shapes, config: GemmaConfig):
    """A tree of ShapeDtypeStruct (`params.param_shapes`) -> the quantized tree's: each quantized
    weight a QArray of ShapeDtypeStructs (int8 weight, scale in the weight's float dtype)."""
    def quantized(s, contracted):
        scale = tuple(1 if i in contracted else n for i, n in enumerate(s.shape))
        return QArray(w=jax.ShapeDtypeStruct(s.shape, jnp.int8), scale=jax.ShapeDtypeStruct(scale, s.dtype))
    return _map_quantized(shapes, config, quantized)


def quantized_axes(axes, config: GemmaConfig):
    """A tree of logical-axis tuples (`params.param_axes`) -> the quantized tree's: the scale keeps
    the weight's output axes (so it shards like them) and has None for the contracted ones."""
    def quantized(a, contracted):
        return QArray(w=a, scale=tuple(None if i in contracted else name for i, name in enumerate(a)))
    return _map_quantized(axes, config, quantized)


def as_dicts(tree):
    """QArrays -> {"w": ..., "scale": ...} dicts (how a checkpoint stores them)."""
    if is_qarray(tree):
        return {"w": tree.w, "scale": tree.scale}
    if isinstance(tree, dict):
        return {k: as_dicts(v) for k, v in tree.items()}
    return tree


def from_dicts(tree, config: GemmaConfig):
    """Inverse of `as_dicts` at the quantized paths of `config`."""
    return _map_quantized(tree, config, lambda d, _: d if is_qarray(d) else QArray(w=d["w"], scale=d["scale"]))


def tree_bytes(tree) -> int:
    """Bytes of every array in a parameter tree (quantized or not)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
