"""Our native checkpoint format: a directory that restores straight onto a device mesh.

    <dir>/config.json       {"format_version": 1, "config": config_to_dict(config)} and, for an int8
                            tree, "quantization": its method (`quantize.METHODS`):
                            nothing is guessed on load (not an HF
                            config.json: no "model_type")
    <dir>/params/           an orbax checkpoint of the parameter tree (see `params.py`); a quantized
                            weight (`quantize.QArray`) is stored as its two arrays, "w" and "scale"
    <dir>/tokenizer.model   optional: the serialized sentencepiece ModelProto
    <dir>/NOTICE            optional: the weights' terms of use, passed on with them

Why orbax: it restores every array directly into the `NamedSharding` we ask for (and in the dtype we
ask for), reading only each device's shard, so a 7B model never needs a full copy in host memory.
The abstract target is derived from the config (`param_shapes` + `param_shardings`), the same
declarations init and the other loaders use.

Saving is atomic: everything is written into a temporary sibling directory that is renamed onto the
target at the end, so an interrupted save never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from gemma_jax import params as P
from gemma_jax import quantize as Q
from gemma_jax.config import GemmaConfig, Limits

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
NOTICE_FILE = "NOTICE"
FORMAT_VERSION = 1


# --- config <-> JSON -----------------------------------------------------------------------------
def config_to_dict(config: GemmaConfig) -> dict[str, Any]:
    """A JSON-ready dict of every field of `config` (nested `Limits` as a dict, tuples as lists)."""
    out = dataclasses.asdict(config)
    out["attention_types"] = list(config.attention_types)
    return out


def config_from_dict(data: dict[str, Any]) -> GemmaConfig:
    """Inverse of `config_to_dict`. Unknown keys are an error (a newer format), missing ones default."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(GemmaConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown GemmaConfig fields {unknown}")
    if "limits" in data:
        data["limits"] = Limits(**data["limits"])
    if "attention_types" in data:
        data["attention_types"] = tuple(data["attention_types"])
    return GemmaConfig(**data)


# --- save ----------------------------------------------------------------------------------------
def save_checkpoint(directory: str | os.PathLike, config: GemmaConfig, params,
                    tokenizer_model_bytes: bytes | None = None, notice: str | None = None,
                    *, overwrite: bool = False) -> str:
    """Write `params` (any placement: host, one device or sharded) as a native checkpoint.

    Arrays are saved in the dtype they have; a quantized tree (`quantize.quantize_params`) is saved
    as such, and config.json records "quantization": its method (`quantize.METHODS`). Raises FileExistsError if `directory` exists and not
    `overwrite`; with `overwrite` the old checkpoint is replaced only once the new one is complete.
    Returns the absolute path written.
    """
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    quantization = P.quantization(params)
    _check_tree(config, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), Q.as_dicts(params)),
                quantization)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        print(f"gemma-jax: saving checkpoint to {target}", file=sys.stderr, flush=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(config)}
            if quantization:
                meta["quantization"] = quantization
            json.dump(meta, f, indent=2)
        if tokenizer_model_bytes is not None:
            with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as f:
                f.write(tokenizer_model_bytes)
        if notice is not None:
            with open(os.path.join(tmp, NOTICE_FILE), "w") as f:
                f.write(notice)
        if os.path.exists(target):  # overwrite: swap, then drop the old one
            old = tmp + ".old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- load ----------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> GemmaConfig:
    return _read_meta(directory)[0]


def read_quantization(directory: str | os.PathLike) -> str | None:
    """A checkpoint's quantization: its method (`quantize.METHODS`) for a quantized tree, None for a float one."""
    return _read_meta(directory)[1]


def _read_meta(directory) -> tuple[GemmaConfig, str | None]:
    with open(os.path.join(os.fspath(directory), CONFIG_FILE)) as f:
        data = json.load(f)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}")
    quantization = data.get("quantization")
    if quantization not in (None, *Q.METHODS):
        raise ValueError(f"{directory}: unknown quantization {quantization!r}")
    return config_from_dict(data["config"]), quantization


def is_native_checkpoint(directory: str | os.PathLike) -> bool:
    directory = os.fspath(directory)
    return (os.path.isdir(os.path.join(directory, PARAMS_DIR))
            and os.path.isfile(os.path.join(directory, CONFIG_FILE)))


def load_checkpoint(directory: str | os.PathLike, dtype=None, mesh: Mesh | None = None):
    """Restore a native checkpoint -> (config, params, tokenizer_model_bytes | None).

    dtype: None keeps each array's saved dtype; otherwise every float array is restored (cast) to
    it (a quantized checkpoint keeps its int8 weights; their scales, the compute dtype, take `dtype`).
    mesh: None puts everything on the first local device; otherwise each array is restored straight
    into its `param_shardings` placement, each device reading only its own shard.
    A quantized checkpoint restores as the quantized tree (`quantize.QArray` weights).
    """
    directory = os.path.abspath(os.fspath(directory))
    config, quantization = _read_meta(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    saved = _saved_shapes(params_dir)
    _check_tree(config, saved, quantization)
    if quantization:
        saved = Q.from_dicts(saved, config, quantization)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, saved)
    else:
        shardings = P.param_shardings(config, mesh, quantized=quantization or False)

    def target(s, sh):
        keep = dtype is None or s.dtype == jnp.int8  # int8 weights are never cast
        return jax.ShapeDtypeStruct(s.shape, s.dtype if keep else jnp.dtype(dtype), sharding=sh)

    abstract = jax.tree.map(target, saved, shardings)
    print(f"gemma-jax: restoring {directory}", file=sys.stderr, flush=True)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, abstract)
    tokenizer = None
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        with open(tok_path, "rb") as f:
            tokenizer = f.read()
    return config, params, tokenizer


def _saved_shapes(params_dir: str):
    """Tree of ShapeDtypeStruct as stored, read from the orbax metadata (no array data)."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree),
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _check_tree(config: GemmaConfig, tree, quantization: str | None = None) -> None:
    """Raise ValueError unless `tree` (QArrays as dicts) has exactly the names and shapes `config`
    declares (quantized: the int8 tree's, with its "w" and "scale")."""
    expected = Q.as_dicts(P.param_shapes(config, quantized=quantization or False))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]}, config says {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if problems:
        raise ValueError(f"parameter tree does not match the config: {'; '.join(problems[:5])}"
                         + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
