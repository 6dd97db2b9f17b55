"""Parameter trees derived from the module declarations: shapes, logical axes, shardings, init.

The tree is the one `Transformer.init` builds, without the "params" wrapper:

    embedder/input_embedding                [V, D]
    layer_i/pre_attention_norm/scale        [D]
    layer_i/attn/q_einsum/w                 [D, N, H]
    layer_i/attn/kv_einsum/w                [D, 2, K, H]     k = [:, 0], v = [:, 1]
    layer_i/attn/attn_vec_einsum/w          [N, H, D]
    layer_i/attn/{query,key}_norm/scale     [H]              (Gemma 3)
    layer_i/post_attention_norm/scale       [D]              (Gemma 3)
    layer_i/pre_ffw_norm/scale              [D]
    layer_i/mlp/gating_einsum/w             [D, 2, F]        gate = [:, 0], up = [:, 1]
    layer_i/mlp/linear/w                    [F, D]
    layer_i/post_ffw_norm/scale             [D]              (Gemma 3)
    final_norm/scale                        [D]

This is DeepMind's Flax layout (gemma-llm 1.0) with two changes: MHA's fused `qkv_einsum` is always
split into `q_einsum` + `kv_einsum`, so one tree serves MHA, MQA and GQA; and every projection puts
its input axes first (q [D, N, H], kv [D, 2, K, H], gating [D, 2, F], where DeepMind has
[N, D, H], [2, K, D, H], [2, D, F]), so that each is one plain [in, out] matmul, the stacked pair
included (why: `projections.py`, where each projection's axes are declared). The Kaggle loader
transposes once, at load time.

An int8 tree (`quantize.quantize_params`) has the same paths, with each weight its method quantizes
(`quantize.quantized_paths`: every projection and the embedding, or the embedding alone) a
`quantize.QArray` (int8 `w` + per-output-channel `scale`); `quantized=True` (or the method's name,
`quantize.METHODS`) gives its shapes, axes and shardings.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma_jax import quantize as quantize_lib
from gemma_jax import sharding
from gemma_jax.config import GemmaConfig
from gemma_jax.model import CACHE_AXES, SCALE_AXES, LayerCache, Transformer, init_cache
from gemma_jax.quantize import is_quantized, quantization  # noqa: F401 - re-exported: params.is_quantized(tree)


def get_path(tree, path):
    """tree[path[0]][path[1]]... for a path of keys into the parameter tree."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value) -> None:
    """Set tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: leaf} of a tree of nested dicts (anything that is not a dict is a leaf)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    """Inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        set_path(tree, path, value)
    return tree


def _boxed_init(config: GemmaConfig, dtype, key):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config, dtype).init(key, tokens, tokens)["params"]


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: GemmaConfig, dtype):
    return jax.eval_shape(functools.partial(_boxed_init, config, dtype), jax.random.key(0))


def _method(quantized: bool | str) -> str | None:
    """A `quantized` argument (False, True: "int8", or a `quantize.METHODS` name) -> the method."""
    return ("int8" if quantized is True else quantized) or None


def param_shapes(config: GemmaConfig, dtype=jnp.float32, quantized: bool | str = False):
    """Tree of jax.ShapeDtypeStruct, computed without allocating anything. quantized (True: "int8",
    or a method): the tree `quantize.quantize_params` makes (int8 weights, scales in `dtype`, as
    `quantize.QArray`s)."""
    shapes = jax.tree.map(lambda b: b.value, _abstract_boxed(config, jnp.dtype(dtype)), is_leaf=_is_box)
    return quantize_lib.quantized_shapes(shapes, config, _method(quantized)) if quantized else shapes


def param_axes(config: GemmaConfig, quantized: bool | str = False):
    """Tree of logical-axis tuples, one per weight (quantized: a QArray of the weight's axes and
    its scale's, the scale sharded like the weight's output axes)."""
    axes = jax.tree.map(lambda b: tuple(b.names), _abstract_boxed(config, jnp.dtype(jnp.float32)), is_leaf=_is_box)
    return quantize_lib.quantized_axes(axes, config, _method(quantized)) if quantized else axes


def count_params(config: GemmaConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))


def param_shardings(config: GemmaConfig, mesh: Mesh, quantized: bool | str = False):
    """NamedShardings of the parameter tree (quantized: of the `quantize_params` tree)."""
    return sharding.tree_shardings(param_axes(config, quantized), param_shapes(config, quantized=quantized), mesh)


def init_params(config: GemmaConfig, key: jax.Array, dtype=jnp.float32, mesh: Mesh | None = None):
    """Random parameters, created directly on device(s) in `dtype`: no full host copy is made.

    With a mesh, every weight is born sharded by `param_shardings` (jit with out_shardings).
    Norm scales are random too (std 0.1) so that random-weight tests exercise the (1 + w) path.
    """
    dtype = jnp.dtype(dtype)

    def init(k):
        return jax.tree.map(lambda b: b.value, _boxed_init(config, dtype, k), is_leaf=_is_box)

    out_shardings = None if mesh is None else param_shardings(config, mesh)
    return jax.jit(init, out_shardings=out_shardings)(key)


def placer(config: GemmaConfig, mesh: Mesh | None = None, dtype=None, quantize: str | None = None):
    """fn(path, array) -> the leaf at `path` of the tree the engine runs on, from one array of the
    float tree (host numpy or on device): cast to `dtype` (None: kept), quantized if `quantize` names
    a method (`quantize.METHODS`) and `path` is a weight it quantizes, and put on its
    `param_shardings` placement on `mesh` (None: the default device). A `quantize.QArray` is only
    placed. Loaders place each tensor as they read it, so no device ever holds the whole model and
    `Engine` finds every leaf where it wants it (its own `device_put` is then a no-op)."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    if quantize is not None and quantize not in quantize_lib.METHODS:
        raise ValueError(f"unknown quantization {quantize!r}: expected one of {quantize_lib.METHODS}")
    floats = flatten(param_shardings(config, mesh)) if mesh is not None else {}

    @functools.cache
    def quantized(method: str) -> dict:  # path -> the QArray of shardings of a `method` weight
        return flatten(param_shardings(config, mesh, quantized=method)) if mesh is not None else {}

    contracted = quantize_lib.quantized_paths(config, quantize) if quantize is not None else {}
    quantizers: dict = {}  # one jit per (contracted axes, output sharding): compiled once per shape

    def quantizer(axes, out):
        if (axes, out) not in quantizers:
            quantizers[axes, out] = jax.jit(functools.partial(quantize_lib.quantize_array, contracted=axes, dtype=dtype,
                                                              method=quantize), out_shardings=out)
        return quantizers[axes, out]

    def place(path: tuple[str, ...], x):
        path = tuple(path)
        if quantize_lib.is_qarray(x):
            return jax.device_put(x, quantized(quantize_lib.method_of(x)).get(path))
        if isinstance(x, jax.Array):
            x = x if dtype is None else x.astype(dtype)
        else:
            x = np.asarray(x, dtype=dtype)
        x = jax.device_put(x, floats.get(path))  # one float tensor, already on its shards
        if path not in contracted:
            return x
        return quantizer(contracted[path], quantized(quantize).get(path))(x)

    return place


def place_params(params, config: GemmaConfig, mesh: Mesh | None = None, dtype=None, quantize: str | None = None):
    """`params` (float, quantized, or a mix; host or device) with every leaf put where `placer`
    puts it: on `mesh` by `param_shardings` (None: the default device), quantized if asked."""
    place = placer(config, mesh, dtype, quantize)
    return unflatten({path: place(path, leaf) for path, leaf in flatten(params).items()})


def cache_axes(config: GemmaConfig, quantized: bool = False) -> dict:
    """Logical axes of a KV cache's arrays (quantized: an int8 cache's scales [B, K, S] too)."""
    scales = (SCALE_AXES, SCALE_AXES) if quantized else (None, None)
    return {f"layer_{i}": LayerCache(CACHE_AXES, CACHE_AXES, *scales) for i in range(config.num_layers)}


def cache_shardings(config: GemmaConfig, batch: int, max_len: int, mesh: Mesh, dtype=jnp.float32):
    """NamedShardings of a KV cache (`model.init_cache` of `dtype`): batch over "data", kv heads over
    "model"; an int8 cache's scales [B, K, S] split the same way as the cache."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype))
    return sharding.tree_shardings(cache_axes(config, jnp.dtype(dtype) == jnp.int8), shapes, mesh)
