"""Hugging Face checkpoints (config.json + `model*.safetensors`) <-> our parameter tree.

A torch `nn.Linear` weight is [out, in]; ours are named-dim einsum weights (see `params.py`). Where
each of the seven projections transformers and peft name lives in our tree, and how its [out, in]
matrix maps there, comes from `projections.TARGETS` (the same mapping the GGUF loader uses).

Safetensors files are read with numpy memory maps (bfloat16 through ml_dtypes), one tensor at a
time, so a 17 GB checkpoint never needs 17 GB of extra host memory; each converted tensor is put on
device straight into its sharding.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gemma_jax import params as P
from gemma_jax.config import GemmaConfig, from_hf_config
from gemma_jax.projections import STACK_AXIS, TARGETS, Target

_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# HF module holding each of our layer's sub-trees: layers.{i}.self_attn.q_proj, layers.{i}.mlp.gate_proj...
HF_PARENT = {"attn": "self_attn", "mlp": "mlp"}


def _norm_names(config: GemmaConfig) -> dict[str, tuple[str, ...]]:
    """HF layer norm name -> our path. In Gemma 1, HF's `post_attention_layernorm` is the pre-MLP
    norm; Gemma 3 has four norms and a separate `pre_feedforward_layernorm`."""
    names = {"input_layernorm": ("pre_attention_norm", "scale")}
    if config.use_post_attn_norm:
        names["post_attention_layernorm"] = ("post_attention_norm", "scale")
        names["pre_feedforward_layernorm"] = ("pre_ffw_norm", "scale")
    else:
        names["post_attention_layernorm"] = ("pre_ffw_norm", "scale")
    if config.use_post_ffw_norm:
        names["post_feedforward_layernorm"] = ("post_ffw_norm", "scale")
    if config.use_qk_norm:
        names["self_attn.q_norm"] = ("attn", "query_norm", "scale")
        names["self_attn.k_norm"] = ("attn", "key_norm", "scale")
    return names


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: our path, its index in a stacked axis, its projection (if any)."""

    path: tuple[str, ...]
    index: int | None = None
    target: Target | None = None


def hf_names(config: GemmaConfig) -> dict[str, Slot]:
    """Every HF tensor name (without the `model.` prefix) -> its Slot in our tree."""
    out = {"embed_tokens.weight": Slot(("embedder", "input_embedding")), "norm.weight": Slot(("final_norm", "scale"))}
    for i in range(config.num_layers):
        layer = f"layer_{i}"
        for hf, ours in _norm_names(config).items():
            out[f"layers.{i}.{hf}.weight"] = Slot((layer, *ours))
        for name, target in TARGETS.items():
            parent = HF_PARENT[target.path[0]]
            out[f"layers.{i}.{parent}.{name}.weight"] = Slot((layer, *target.path), target.index, target)
    return out


# --- safetensors reading -----------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of one .safetensors file, memory-mapped (bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        yield name, data[start:end].view(dtype).reshape(info["shape"])


def _strip_prefix(name: str) -> str | None:
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


# --- conversion --------------------------------------------------------------------------------
def params_from_hf_state(state: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                         config: GemmaConfig, dtype=jnp.float32, mesh: Mesh | None = None,
                         total: int | None = None):
    """Convert HF tensors (names as in `GemmaForCausalLM.state_dict()`) into our parameter tree.

    Stacked weights (k/v, gate/up) are assembled on the host, then every leaf goes to its device /
    sharding. Raises ValueError naming any missing, unexpected or misshapen tensor.
    """
    items = state.items() if isinstance(state, Mapping) else state
    names = hf_names(config)
    shapes = P.param_shapes(config)
    shardings = P.param_shardings(config, mesh) if mesh is not None else None
    staged: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for name, array in tqdm(items, total=total, desc="loading safetensors", unit="tensor", leave=False):
        short = _strip_prefix(name)
        if short is None or short == "lm_head.weight" or name == "lm_head.weight":
            continue  # tied output embedding
        if short not in names:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        slot = names[short]
        array = np.asarray(array)
        if slot.target is not None:
            array = slot.target.from_torch(array, config)
        staged.setdefault(slot.path, {})[slot.index] = array
    missing = [n for n, s in names.items() if s.index not in staged.get(s.path, {})]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    out: dict = {}
    for path, parts in staged.items():
        array = parts[None] if None in parts else np.stack([parts[i] for i in sorted(parts)], axis=STACK_AXIS)
        expected = P.get_path(shapes, path).shape
        if array.shape != expected:
            raise ValueError(f"{'/'.join(path)}: checkpoint shape {array.shape}, config expects {expected}")
        array = array.astype(dtype)
        placed = jax.device_put(array, P.get_path(shardings, path)) if shardings is not None else jnp.asarray(array)
        P.set_path(out, path, placed)
    return out


def load_hf(directory: str | os.PathLike, dtype=jnp.bfloat16, mesh: Mesh | None = None):
    """Load a Hugging Face Gemma / Gemma 3 checkpoint directory -> (config, params)."""
    directory = os.fspath(directory)
    config = from_hf_config(directory)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory} (PyTorch .bin files are not read: never unpickled)")

    def tensors():
        for path in files:
            yield from read_safetensors(path)

    total = sum(len([k for k in _header(f) if k != "__metadata__"]) for f in files)
    return config, params_from_hf_state(tensors(), config, dtype, mesh, total=total)


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))
