"""DeepMind's Gemma Flax checkpoints (Kaggle `gemma/flax`, the `gemma-llm` 1.0 layout) -> our params.

The Kaggle download is an orbax PyTree checkpoint (plus `tokenizer.model` beside it). On disk the
keys are flat paths under a `transformer` root, e.g.

    "transformer/embedder"                      {"input_embedding": [Vp, D]}   Vp = 256128 (padded)
    "transformer/layer_0/attn/qkv_einsum"       {"w": [3, N, D, H]}            MHA (7B): q, k, v
    "transformer/layer_0/attn/q_einsum"         {"w": [N, D, H]}               MQA (2B)
    "transformer/layer_0/attn/kv_einsum"        {"w": [2, K, D, H]}            MQA (2B): k, v
    "transformer/layer_0/attn/attn_vec_einsum"  {"w": [N, H, D]}
    "transformer/layer_0/mlp/gating_einsum"     {"w": [2, D, F]}               [0] gate (gelu), [1] up
    "transformer/layer_0/mlp/linear"            {"w": [F, D]}
    "transformer/layer_0/pre_attention_norm"    {"scale": [D]}    (also pre_ffw_norm; final_norm)

`gemma-llm`'s own loader nests those paths and drops the `w` under `mlp/` (its FeedForward declares
`gating_einsum` / `linear` as bare params), and `Transformer.init` returns the tree without the
`transformer` root. We accept all of these: every path is flattened, the `params` / `transformer`
root is stripped and a bare `mlp/gating_einsum` / `mlp/linear` gets its `w` back. Our tree is the
same layout with MHA's `qkv_einsum` split into `q_einsum` + `kv_einsum[0:2]`, and the q/k/v weights
and MLP weights transposed to put D first (q [N, D, H] -> [D, N, H], kv [2, K, D, H] -> [D, 2, K, H],
gating [2, D, F] -> [D, 2, F]; see `params.py`).

Config: never inferred from the tree (layer counts do not name a model). The caller passes a config
or a variant name ("2b" / "7b" -> our named factories).

Padded vocabulary: the Kaggle embedding has 256128 rows, the tokenizer 256000 ids. We slice the
table to `config.vocab_size` (256000 for the named factories): ids >= 256000 are never produced by
the tokenizer, and their (untrained) rows would otherwise get logits that could win sampling. It
also keeps the parameter count and every downstream shape identical to the HF checkpoints. Pass a
config whose vocab_size equals the padded size to keep all rows.

Memory: the checkpoint is restored by orbax straight onto the device(s) in the target dtype (each
array in the sharding its target needs, so a device reads only its shard); the few arrays that need
a transform (the qkv split, the vocabulary slice) are transformed on device one at a time.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from gemma_jax import params as P
from gemma_jax import sharding
from gemma_jax.config import GemmaConfig, gemma_2b, gemma_7b

VARIANTS: dict[str, Callable[[], GemmaConfig]] = {"2b": gemma_2b, "7b": gemma_7b}

_BARE_MLP = re.compile(r"^(layer_\d+/mlp/(?:gating_einsum|linear))$")
_QKV = re.compile(r"^(layer_\d+)/attn/qkv_einsum/w$")


def config_for_variant(variant: str) -> GemmaConfig:
    try:
        return VARIANTS[variant]()
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}: expected one of {sorted(VARIANTS)}") from None


def canonical_path(keys: tuple[str, ...]) -> str:
    """A checkpoint key path (nested or flat, with or without root) -> our '/'-joined path."""
    path = "/".join(str(k) for k in keys)
    for root in ("params/", "transformer/"):
        if path.startswith(root):
            path = path[len(root):]
    if _BARE_MLP.match(path):
        path += "/w"
    return path


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _read_metadata(ckpt_dir: str):
    """The checkpoint's tree of array metadata (shape, dtype), as stored (nothing is read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(ckpt_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return dict(tree)


def _is_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def load_kaggle(ckpt_dir: str | os.PathLike, config: GemmaConfig | None = None, dtype=jnp.bfloat16,
                mesh: Mesh | None = None, *, variant: str | None = None):
    """Load a DeepMind/Kaggle Gemma Flax checkpoint directory -> (config, params).

    config: the architecture (its vocab_size decides the embedding rows kept); or give `variant`
    ("2b" | "7b"). dtype: the dtype every array is restored in. mesh: None for the first local
    device, else each array lands in its `param_shardings` placement.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    if config is None:
        if variant is None:
            raise ValueError("load_kaggle needs a config or a variant ('2b' / '7b'); the size is never guessed")
        config = config_for_variant(variant)
    dtype = jnp.dtype(dtype)
    meta = _read_metadata(ckpt_dir)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(meta, is_leaf=_is_meta)
    source = {}  # our path -> index into leaves
    for i, (keys, _) in enumerate(leaves):
        path = canonical_path(tuple(_key_str(k) for k in keys))
        if path in source:
            raise ValueError(f"checkpoint has {path!r} twice")
        source[path] = i

    want = {"/".join(path): s for path, s in P.flatten(P.param_shapes(config, dtype)).items()}
    axes = {"/".join(path): a for path, a in P.flatten(P.param_axes(config)).items()}
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        target_sharding = {p: device for p in want}

        def place(src_axes, shape):
            return device
    else:
        target_sharding = {p: NamedSharding(mesh, sharding.logical_to_spec(axes[p], want[p].shape, mesh))
                           for p in want}

        def place(src_axes, shape):
            return NamedSharding(mesh, sharding.logical_to_spec(src_axes, shape, mesh))

    # Plan: for each source array, the sharding to restore it in and how it becomes our leaves.
    plan: dict[str, tuple[jax.sharding.Sharding, Callable]] = {}
    covered: set[str] = set()
    problems: list[str] = []
    for path, i in source.items():
        shape = tuple(leaves[i][1].shape)
        qkv = _QKV.match(path)
        if qkv:
            q_path, kv_path = f"{qkv.group(1)}/attn/q_einsum/w", f"{qkv.group(1)}/attn/kv_einsum/w"
            if q_path not in want:
                problems.append(f"unexpected {path}")
                continue
            if config.num_kv_heads != config.num_heads:
                problems.append(f"{path}: fused qkv (MHA) in the checkpoint, but the config has "
                                f"{config.num_heads} heads and {config.num_kv_heads} kv heads")
                continue
            expected = (3, *_from_ours(want[q_path].shape, _DM_PERM["q_einsum"]))
            if shape != expected:
                problems.append(f"{path}: shape {shape}, config expects {expected}")
                continue
            plan[path] = (place(("stack", *_from_ours(axes[q_path], _DM_PERM["q_einsum"])), shape),
                          _qkv_split(q_path, kv_path, target_sharding[q_path], target_sharding[kv_path]))
            covered |= {q_path, kv_path}
        elif path == "embedder/input_embedding":
            v, d = want[path].shape
            if len(shape) != 2 or shape[1] != d or shape[0] < v:
                problems.append(f"{path}: shape {shape}, config expects ({v}, {d}) or more rows (padded vocab)")
                continue
            plan[path] = (place(axes[path], shape), _vocab_slice(path, v, target_sharding[path]))
            covered.add(path)
        elif path in want and _perm_of(path) is not None:  # DeepMind's [.., D, H] -> ours [D, .., H]
            perm = _perm_of(path)
            expected = _from_ours(want[path].shape, perm)
            if shape != expected:
                problems.append(f"{path}: shape {shape}, config expects {expected}")
                continue
            plan[path] = (place(_from_ours(axes[path], perm), shape),
                          _transposed(path, perm, target_sharding[path]))
            covered.add(path)
        elif path in want:
            if shape != want[path].shape:
                problems.append(f"{path}: shape {shape}, config expects {want[path].shape}")
                continue
            plan[path] = (target_sharding[path], _identity(path))
            covered.add(path)
        else:
            problems.append(f"unexpected {path}")
    problems += [f"missing {p}" for p in sorted(set(want) - covered)]
    if problems:
        raise ValueError(f"{ckpt_dir} does not match the config: {'; '.join(problems[:5])}"
                         + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))

    index_to_path = {i: p for p, i in source.items()}
    restore_args = jax.tree_util.tree_unflatten(treedef, [
        ocp.ArrayRestoreArgs(sharding=plan[index_to_path[i]][0], dtype=dtype, global_shape=tuple(m.shape))
        for i, (_, m) in enumerate(leaves)])
    print(f"gemma-jax: restoring Kaggle checkpoint {ckpt_dir}", file=sys.stderr, flush=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    arrays = jax.tree_util.tree_leaves(restored)
    del restored
    out: dict = {}
    for i, array in enumerate(arrays):
        for path, value in plan[index_to_path[i]][1](array).items():
            P.set_path(out, path.split("/"), value)
        arrays[i] = None  # drop the source as soon as it is converted
    return config, out


def _identity(path):
    return lambda x: {path: x}


# DeepMind layout -> ours: ours = deepmind.transpose(perm).
_DM_PERM = {"q_einsum": (1, 0, 2), "kv_einsum": (2, 0, 1, 3), "gating_einsum": (1, 0, 2)}


def _perm_of(path: str):
    parts = path.split("/")
    return _DM_PERM.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "w" else None


def _from_ours(seq, perm):
    """The DeepMind-layout order of `seq` (a shape or axes given in our order)."""
    out = [None] * len(perm)
    for i, p in enumerate(perm):
        out[p] = seq[i]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _transpose_fn(perm, out_sharding):
    return jax.jit(lambda x: x.transpose(perm), out_shardings=out_sharding)


def _transposed(path, perm, out_sharding):
    return lambda x: {path: _transpose_fn(perm, out_sharding)(x)}


@functools.lru_cache(maxsize=None)
def _slice_rows_fn(rows: int, out_sharding):
    return jax.jit(lambda x: x[:rows], out_shardings=out_sharding)


@functools.lru_cache(maxsize=None)
def _split_qkv_fn(q_sharding, kv_sharding):  # one compile shared by every layer
    q_perm, kv_perm = _DM_PERM["q_einsum"], _DM_PERM["kv_einsum"]
    return jax.jit(lambda w: (w[0].transpose(q_perm), w[1:].transpose(kv_perm)),
                   out_shardings=(q_sharding, kv_sharding))


def _vocab_slice(path, vocab, out_sharding):
    return lambda x: {path: x if x.shape[0] == vocab else _slice_rows_fn(vocab, out_sharding)(x)}


def _qkv_split(q_path, kv_path, q_sharding, kv_sharding):
    def split(w):  # [3, N, D, H] -> q [D, N, H], kv [D, 2, N, H]
        q, kv = _split_qkv_fn(q_sharding, kv_sharding)(w)
        return {q_path: q, kv_path: kv}
    return split


def find_tokenizer(ckpt_dir: str | os.PathLike) -> str | None:
    """`tokenizer.model` in the checkpoint directory or beside it (the Kaggle download layout)."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    for directory in (ckpt_dir, os.path.dirname(ckpt_dir)):
        path = os.path.join(directory, "tokenizer.model")
        if os.path.isfile(path):
            return path
    return None
