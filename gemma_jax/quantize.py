"""int8 weights, with per-output-channel scales in three methods and per-block scales in one (`METHODS`):

    quantize_params(params, config, dtype=None, method="int8") -> params   (big weights as QArray)

"int8", weight-only: each product dequantizes inside the matmul (for accelerators). "w8a8": each
product also quantizes its activation to int8, one scale per row, and multiplies integers with int32
sums (for CPUs, where that is the only int8 product XLA runs without a float copy of the weight).
"w8a8-embedding": w8a8 for the tied embedding alone, the layers kept float (the embedded 270M's CPU
default where q8_0's kernel cannot be built: its biggest weight, read once per token as the
unembedding, at a quarter of the bytes, while the layers' products keep float activations, whose
int8 rounding is what costs w8a8 its quality on that model; BENCHMARKS.md). "q8_0": every weight in blocks of 32 along its input, one
scale per block (llama.cpp's Q8_0 layout, with float scales), products on float activations by a
CPU kernel of ours (`cpu_kernel.py`) that reads the int8 weight as stored (see "q8_0" below).

Which weights (`quantized_paths`): every projection of every layer (`projections.PROJECTIONS`) and
the embedding, or the embedding alone ("w8a8-embedding"). Norm scales stay float. Each quantized
weight becomes a `QArray` in the same tree position:

    w      int8, the float weight's shape
    scale  the weight's shape with its contracted (input) axes set to 1, in the compute dtype
    act    static: None (int8) or "int8" (w8a8), how its products treat the activation

Symmetric, one scale per output channel: scale = max |w| over the input axes / 127 and
w = clip(round(w / scale), -127, 127), so |w - w_int8 * scale| <= scale / 2. A projection's input
axes are its `ins` (declared in `projections.py`, always the leading axes); the embedding [V, D]
contracts D both ways it is used, so its channel is the vocabulary row: one scale per token serves
the lookup (row v times scale[v]) and the tied unembedding (logit v times scale[v]).

int8 (`qeinsum`): the einsum runs on the int8 weight cast to the activation dtype (int8 is exact in
bf16) and its output is multiplied by the scale, which is constant along the contracted axes: no
dequantized copy of a weight is kept, and a TPU or GPU reads 1 byte per weight instead of 2 or 4. On
XLA:CPU the int8 -> float convert is not fused into the matmul: each weight is converted into a
temporary float buffer every step, several times slower than float (BENCHMARKS.md).

w8a8 (`int8_einsum`): each row of the activation (its kept axes) is quantized like a weight row,
x ~ x_int8 * s_row, and y = (x_int8 . w_int8, summed in int32) * s_row * scale. XLA:CPU hands an
s8 x s8 -> s32 dot to YNNPACK's int8 kernels, which read the weight as stored (no copy;
`tests/test_w8a8.py` checks the compiled step), but only when both sides have at least two rows
(YNNPACK takes no matrix-vector product): a lone row is padded with a zero row (`MIN_ROWS`, on a CPU
only), else XLA's own dot converts the whole weight first. Every row is quantized alone, so a row's
result does not depend on its batch neighbours. The price is the activations' rounding: on the
embedded 270M it moves the model further from float32 than int8 weights alone do (BENCHMARKS.md).

q8_0 (`block_einsum`): the weight is stored as a matrix w [O, I], its kept (output) axes flattened
into the rows and its contracted (input) axes into the columns, in the float weight's order (the
embedding [V, D] as it is; a projection [*ins, *outs] transposed), with scale [O, I / 32]: the
same symmetric rule per block of 32 inputs, |w - w_int8 * scale| <= scale / 2 for each weight of a
block. A block's scale follows its own 32 weights, not a whole row's largest, so the rounding is
finer than per-channel int8 and the activations stay float (BENCHMARKS.md: the quality measured).
The product flattens x's kept axes into rows and its contracted ones into I and calls
`cpu_kernel.block_matmul` (XLA on the dequantized weight off a CPU or without a compiler). I of
every quantized weight must be a multiple of 32. The layout is the kernel's; a q8_0 tree is for one
device (its weights are replicated on a mesh, and the kernel is not partitioned).

The compute dtype is the scales' dtype, chosen when quantizing (default: the float weights' dtype).
`QArray.dtype` answers it, so code that asks the embedding for the model's dtype (`model.forward`,
the engine's cache and LoRA bank) gets the compute dtype, never int8. LoRA deltas are added to the
projection outputs in that dtype, as for a float model.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from gemma_jax import cpu_kernel
from gemma_jax import projections as proj
from gemma_jax.contraction import weight_einsum
from gemma_jax.config import GemmaConfig

METHODS = ("int8", "w8a8", "w8a8-embedding", "q8_0")
ACTIVATIONS = {"int8": None, "w8a8": "int8", "w8a8-embedding": "int8", "q8_0": None}  # method -> how products treat x
BLOCKED = ("q8_0",)  # the methods with per-block scales (the [O, I] layout)
BLOCK = cpu_kernel.BLOCK  # weights per scale along the input in a q8_0 weight
EMBEDDING_ONLY = ("w8a8-embedding",)  # the methods that quantize the embedding and no layer weight
MIN_ROWS = 2  # an int8 product's rows on a CPU, padded up to (module docstring)
EMBEDDING = ("embedder", "input_embedding")
_EMBEDDING_CONTRACTED = (1,)  # [V, D]: D is contracted both in the lookup's use and in the unembedding


@flax.struct.dataclass
class QArray:
    """An int8 weight with per-output-channel scales, or per-block ones (`block`; module docstring).

    Also used as a container of ShapeDtypeStructs, logical axes or shardings of the two parts."""

    w: jax.Array  # int8, the float weight's shape (block: [O, I], module docstring)
    scale: jax.Array  # the weight's shape with the contracted axes 1 (block: [O, I / block]); compute dtype
    act: str | None = flax.struct.field(pytree_node=False, default=None)  # None, or "int8" (w8a8)
    block: int = flax.struct.field(pytree_node=False, default=0)  # 0: per channel; else weights per scale
    float_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # block: the float weight's
    contracted: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # block: its input axes

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape (what the model declares), whatever the layout."""
        return tuple(self.float_shape) if self.block else tuple(self.w.shape)

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


def quantized_paths(config: GemmaConfig | int, method: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The part of `contracted_axes` that `method` quantizes: every weight, or the embedding alone."""
    _check_method(method)
    return {EMBEDDING: _EMBEDDING_CONTRACTED} if method in EMBEDDING_ONLY else contracted_axes(config)


def is_quantized(params) -> bool:
    """Whether `params` holds quantized weights (every method quantizes the embedding)."""
    return is_qarray(params["embedder"]["input_embedding"])


def quantization(params) -> str | None:
    """The method (`METHODS`) `params` were quantized with, None for a float tree."""
    emb = params["embedder"]["input_embedding"]
    if not is_qarray(emb):
        return None
    first = params.get("layer_0", {}).get("attn", {}).get("q_einsum", {}).get("w")
    if first is not None and not is_qarray(first):
        return next(m for m in EMBEDDING_ONLY if ACTIVATIONS[m] == emb.act)
    return method_of(emb)


def method_of(q: QArray) -> str:
    """The all-weights method `q` was made by: "q8_0" for a block layout, else the one whose
    products treat the activation as `q`'s do ("int8" or "w8a8")."""
    if q.block:
        return BLOCKED[0]
    return next(m for m, act in ACTIVATIONS.items() if act == q.act)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}: expected one of {METHODS}")


# --- one array -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("contracted", "dtype", "method"))
def quantize_array(w: jax.Array, contracted: tuple[int, ...], dtype=None, method: str = "int8") -> QArray:
    """w (float) -> QArray: symmetric int8, one scale per index of the axes not in `contracted`
    (q8_0: per block of `BLOCK` along them, module docstring); `method` (`METHODS`) says how its
    products run (`qeinsum`).

    The rounding uses the scale as stored (in `dtype`), so dequantization is exactly w_int8 * scale."""
    dtype = jnp.dtype(dtype if dtype is not None else w.dtype)
    if method in BLOCKED:
        return _quantize_blocks(w, contracted, dtype)
    w32 = w.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(w32), axis=contracted, keepdims=True) / 127.0).astype(dtype)
    s32 = scale.astype(jnp.float32)
    q = jnp.round(w32 / jnp.where(s32 > 0, s32, 1.0))
    return QArray(w=jnp.clip(q, -127, 127).astype(jnp.int8), scale=scale, act=ACTIVATIONS[method])


def _blocked_shape(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, int]:
    """A float weight's [O, I] in the block layout: its kept axes' size, its contracted axes' size."""
    i = math.prod(shape[a] for a in contracted)
    if i % BLOCK:
        raise ValueError(f"a q8_0 weight's inputs must be a multiple of {BLOCK}: shape {shape}, contracted "
                         f"axes {contracted} hold {i}")
    return math.prod(shape) // i, i


def _quantize_blocks(w: jax.Array, contracted: tuple[int, ...], dtype) -> QArray:
    """The q8_0 QArray of w (module docstring): w as [O, I], symmetric int8 per block of `BLOCK`."""
    kept = tuple(a for a in range(w.ndim) if a not in contracted)
    o, i = _blocked_shape(w.shape, contracted)
    rows = jnp.transpose(w.astype(jnp.float32), kept + tuple(contracted)).reshape(o, i // BLOCK, BLOCK)
    scale = (jnp.max(jnp.abs(rows), axis=-1) / 127.0).astype(dtype)  # [O, I / BLOCK]
    s32 = scale.astype(jnp.float32)[..., None]
    q = jnp.clip(jnp.round(rows / jnp.where(s32 > 0, s32, 1.0)), -127, 127).astype(jnp.int8)
    return QArray(w=q.reshape(o, i), scale=scale, act=None, block=BLOCK, float_shape=tuple(w.shape),
                  contracted=tuple(contracted))


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    """The float weight w_int8 * scale, in the float weight's shape (for references and tests; the
    model never builds it)."""
    if not q.block:
        return q.w.astype(dtype) * q.scale.astype(dtype)
    o, i = q.w.shape
    rows = (q.w.reshape(o, i // q.block, q.block).astype(dtype) * q.scale.astype(dtype)[..., None])
    kept = tuple(a for a in range(len(q.float_shape)) if a not in q.contracted)
    order = kept + tuple(q.contracted)
    rows = rows.reshape(tuple(q.float_shape[a] for a in order))
    return jnp.transpose(rows, [order.index(a) for a in range(len(order))])


def qeinsum(eqn: str, x: jax.Array, q: QArray, **kwargs) -> jax.Array:
    """einsum(eqn, x, dequantize(q)) without building the dequantized weight: the int8 weight (cast
    to x's dtype) goes into the einsum, and the output is multiplied by the scale, which is constant
    along every contracted axis. eqn: "xletters,wletters->out" with q the second operand. A w8a8
    weight (`q.act == "int8"`) multiplies int8 activations instead (`int8_einsum`), a q8_0 weight
    goes to `block_einsum`."""
    if q.block:
        return block_einsum(eqn, x, q, **kwargs)
    if q.act == "int8":
        return int8_einsum(eqn, x, q, **kwargs)
    inputs, out = eqn.split("->")
    w_letters = inputs.split(",")[1]
    y = weight_einsum(eqn, x, q.w.astype(x.dtype), **kwargs)
    contracted = tuple(i for i, letter in enumerate(w_letters) if letter not in out)
    kept = "".join(letter for letter in w_letters if letter in out)
    scale = jnp.squeeze(q.scale, axis=contracted).astype(y.dtype)  # [the output channels]
    return jnp.einsum(f"{out},{kept}->{out}", y, scale)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, ...] -> (int8 [M, ...], float32 scale [M]): symmetric, one scale per row (the weights'
    rule over every axis but the first), so |x - x_int8 * scale| <= scale / 2 in each row."""
    q = quantize_array(x, tuple(range(1, x.ndim)), jnp.float32)
    return q.w, q.scale.reshape(x.shape[0])


def int8_einsum(eqn: str, x: jax.Array, q: QArray, preferred_element_type=None) -> jax.Array:
    """einsum(eqn, x, dequantize(q)) as an integer product: each row of x (its kept letters) is
    quantized to int8 with its own scale (`quantize_rows`), multiplied by the int8 weight with int32
    sums (one `dot_general`, contracted in the weight's storage order), and the sums are scaled by
    the row's and the output channel's scales. eqn must be a weight product (every shared letter
    contracted, every other kept). On a CPU at least `MIN_ROWS` rows go into the product (zero rows
    pad a single one), so that XLA:CPU hands it to YNNPACK's int8 kernels, which read the weight as
    stored (module docstring). Returns preferred_element_type (default x's dtype)."""
    rows, kept_shape, w_axes, finish = _weight_product(eqn, x)
    contracted_shape = rows.shape[len(kept_shape):]
    m = math.prod(kept_shape)
    rows = rows.reshape(m, *contracted_shape).astype(jnp.float32)
    pad = max(0, MIN_ROWS - m) if jax.default_backend() == "cpu" else 0
    xq, xs = quantize_rows(jnp.pad(rows, [(0, pad)] + [(0, 0)] * len(contracted_shape)))
    dims = ((tuple(range(1, 1 + len(w_axes))), w_axes), ((), ()))
    sums = lax.dot_general(xq, q.w, dims, preferred_element_type=jnp.int32)[:m]  # [M, *w kept]
    scale = jnp.squeeze(q.scale, axis=w_axes).astype(jnp.float32)  # [*w kept]
    y = sums.astype(jnp.float32) * xs[:m].reshape((m,) + (1,) * scale.ndim) * scale
    return finish(y.reshape(*kept_shape, *y.shape[1:])).astype(preferred_element_type or x.dtype)


def _weight_product(eqn: str, x: jax.Array):
    """A weight product eqn "x,w->out" (every shared letter contracted, every other kept; else
    ValueError) and its x -> (rows: x transposed to [*x's kept axes, *the contracted ones in w's
    order], the kept axes' shape, w's contracted axes, finish: y [*x's kept, *w's kept] -> y in
    out's order)."""
    inputs, out = eqn.split("->")
    x_letters, w_letters = inputs.split(",")
    shared = [c for c in w_letters if c in x_letters]
    x_kept = [c for c in x_letters if c not in shared]
    w_kept = [c for c in w_letters if c not in shared]
    if sorted(out) != sorted(x_kept + w_kept) or any(c in out for c in shared):
        raise ValueError(f"a quantized product takes a weight product, not {eqn!r}")
    rows = jnp.transpose(x, [x_letters.index(c) for c in x_kept + shared])
    natural = "".join(x_kept + w_kept)
    order = [natural.index(c) for c in out]

    def finish(y):
        return y if natural == out else jnp.transpose(y, order)
    return rows, rows.shape[:len(x_kept)], tuple(w_letters.index(c) for c in shared), finish


def block_einsum(eqn: str, x: jax.Array, q: QArray, preferred_element_type=None) -> jax.Array:
    """einsum(eqn, x, dequantize(q)) for a q8_0 weight: x's kept axes flattened into rows and its
    contracted ones (in the weight's order) into I, one `cpu_kernel.block_matmul` with the stored
    [O, I] int8 weight and its block scales, the [M, O] result unflattened into `out`. eqn must be a
    weight product contracting exactly the weight's `contracted` axes. Returns
    preferred_element_type (default x's dtype)."""
    rows, kept_shape, w_axes, finish = _weight_product(eqn, x)
    if w_axes != tuple(q.contracted):
        raise ValueError(f"{eqn!r} contracts other axes than the q8_0 weight's {q.contracted}")
    y = cpu_kernel.block_matmul(rows.reshape(math.prod(kept_shape), -1), q.w, q.scale)  # [M, O] float32
    y = y.reshape(*kept_shape, *(n for a, n in enumerate(q.float_shape) if a not in q.contracted))
    return finish(y).astype(preferred_element_type or x.dtype)


def lookup(q: QArray, ids: jax.Array) -> jax.Array:
    """Rows `ids` of a quantized [V, D] table, dequantized: [..., D] in the compute dtype."""
    rows, scale = jnp.take(q.w, ids, axis=0), jnp.take(q.scale, ids, axis=0)
    if not q.block:
        return rows.astype(q.dtype) * scale
    blocks = rows.reshape(*rows.shape[:-1], -1, q.block).astype(q.dtype) * scale[..., None]
    return blocks.reshape(rows.shape)


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
def _map_quantized(tree, config: GemmaConfig | None, fn, method: str):
    """A copy of the nested-dict `tree` with fn(leaf, contracted, path) at every path `method` quantizes
    (config None: the layers are the tree's own "layer_i" entries)."""
    out = _copy_dicts(tree)
    layers = sum(k.startswith("layer_") for k in tree) if config is None else config
    for path, contracted in quantized_paths(layers, method).items():
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = fn(parent[path[-1]], contracted, path)
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def quantize_params(params, config: GemmaConfig | None = None, dtype=None, method: str = "int8"):
    """Quantize the weights `method` quantizes (`quantized_paths`) of a float tree (module docstring).

    config: the model's (None: the layers are the tree's own "layer_i" entries).
    dtype: the compute dtype, stored as the scales' dtype (default: each weight's own float dtype).
    Norm scales keep their dtype (cast to `dtype` when it is given). Weights that are already
    QArrays are kept as they are. Runs on whatever devices the params are on; the result takes
    1/4 (float32) or 1/2 (bfloat16) of the quantized weights' bytes (q8_0: plus one scale per 32)."""
    _check_method(method)
    out = _map_quantized(params, config, lambda w, c, _: w if is_qarray(w) else quantize_array(
        w, c, None if dtype is None else jnp.dtype(dtype), method), method)
    if dtype is not None:  # the float leaves left (norms) take the compute dtype too
        out = jax.tree.map(lambda x: x if is_qarray(x) else x.astype(dtype), out, is_leaf=is_qarray)
    return out


def quantized_shapes(shapes, config: GemmaConfig, method: str = "int8"):
    """A tree of ShapeDtypeStruct (`params.param_shapes`) -> the `method` tree's: each quantized
    weight a QArray of ShapeDtypeStructs (int8 weight, scale in the weight's float dtype)."""
    _check_method(method)

    def quantized(s, contracted, _):
        if method in BLOCKED:
            o, i = _blocked_shape(s.shape, contracted)
            return QArray(w=jax.ShapeDtypeStruct((o, i), jnp.int8), scale=jax.ShapeDtypeStruct((o, i // BLOCK), s.dtype),
                          block=BLOCK, float_shape=tuple(s.shape), contracted=contracted)
        scale = tuple(1 if i in contracted else n for i, n in enumerate(s.shape))
        return QArray(w=jax.ShapeDtypeStruct(s.shape, jnp.int8), scale=jax.ShapeDtypeStruct(scale, s.dtype),
                      act=ACTIVATIONS[method])
    return _map_quantized(shapes, config, quantized, method)


def quantized_axes(axes, config: GemmaConfig, method: str = "int8"):
    """A tree of logical-axis tuples (`params.param_axes`) -> the `method` tree's: the scale keeps
    the weight's output axes (so it shards like them) and has None for the contracted ones. A q8_0
    weight and its scale are replicated ((None, None): the kernel runs on one device's whole weight)."""
    _check_method(method)

    def quantized(a, contracted, path):
        if method in BLOCKED:
            return QArray(w=(None, None), scale=(None, None), block=BLOCK, float_shape=float_shape(config, path),
                          contracted=contracted)
        return QArray(w=a, scale=tuple(None if i in contracted else name for i, name in enumerate(a)),
                      act=ACTIVATIONS[method])
    return _map_quantized(axes, config, quantized, method)


def as_dicts(tree):
    """QArrays -> {"w": ..., "scale": ...} dicts (how a checkpoint stores them)."""
    if is_qarray(tree):
        return {"w": tree.w, "scale": tree.scale}
    if isinstance(tree, dict):
        return {k: as_dicts(v) for k, v in tree.items()}
    return tree


def from_dicts(tree, config: GemmaConfig, method: str = "int8"):
    """Inverse of `as_dicts` at the quantized paths of `config` (the `method` the tree was made with)."""
    _check_method(method)
    if method in BLOCKED:
        return _map_quantized(tree, config, lambda d, c, path: d if is_qarray(d) else QArray(
            w=d["w"], scale=d["scale"], block=BLOCK, float_shape=float_shape(config, path), contracted=c), method)
    return _map_quantized(tree, config, lambda d, *_: d if is_qarray(d) else QArray(
        w=d["w"], scale=d["scale"], act=ACTIVATIONS[method]), method)


def float_shape(config: GemmaConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """The float shape of the quantizable weight at `path` (the embedding, or a layer's projection)."""
    if tuple(path) == EMBEDDING:
        return (config.vocab_size, config.embed_dim)
    return next(p.shape(config) for p in proj.PROJECTIONS if p.path == tuple(path[1:]))


def tree_bytes(tree) -> int:
    """Bytes of every array in a parameter tree (quantized or not)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
