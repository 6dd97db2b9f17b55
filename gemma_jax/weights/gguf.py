"""llama.cpp GGUF files (Gemma 1 `gemma`, Gemma 3 `gemma3`) -> (GemmaConfig, our parameter tree).

The file is read by `gguf_file.read_gguf` (metadata, tensor directory, memory-mapped data; ~1 s,
the same reader the tokenizer uses) and the `gguf` package dequantizes each tensor to float32
(`gguf.quants.dequantize`; ~5 s for the embedded Gemma 3 270M Q4_K_M). `embedded.py` still converts
once and keeps an orbax checkpoint, which restores faster still.

What the conversion has to know (checked against transformers' own GGUF loader,
`modeling_gguf_pytorch_utils.py`, and numerically by `tests/test_gemma3_parity.py`):

- After dequantizing, a matrix has numpy shape [out, in], exactly torch's `nn.Linear.weight`, and
  needs no permutation for Gemma (llama.cpp only permutes q/k for LLaMA-style interleaved RoPE;
  Gemma's converter writes them as they are, and transformers' Gemma2/3 tensor processor only
  touches the norms).
- llama.cpp bakes Gemma's `1 + w` into every `*norm.weight`; our RMSNorm stores `w`, so 1 is
  subtracted (transformers does the same).
- The config comes from `<arch>.*` metadata. The GGUF has no query_pre_attn_scalar, no local RoPE
  base and no layer pattern: we use query_pre_attn_scalar = key_length (transformers' default is 256,
  the same for Gemma 3 270M/1B/4B/12B; 27B really uses 168 = d/N, which llama.cpp hard-codes by
  model size and neither we nor transformers do), local base 10000, and "every 6th layer global"
  unless the file carries `<arch>.attention.sliding_window_pattern`. Linear RoPE scaling of the
  global layers (4B and up) comes from `<arch>.rope.scaling.{type,factor}`.
- There is no `output.weight`: the output projection is tied to `token_embd`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gemma_jax import params as P
from gemma_jax.config import GemmaConfig, Limits, gemma3_pattern
from gemma_jax.gguf_file import GGUFTensor, read_gguf
from gemma_jax.projections import STACK_AXIS, TARGETS, Target

_SUPPORTED = ("gemma", "gemma3")


# --- metadata -> config ----------------------------------------------------------------------------
def _token_id(metadata: dict[str, Any], piece: str, default: int) -> int:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None or piece not in tokens:
        return default
    return tokens.index(piece)


def config_from_gguf(metadata: dict[str, Any], tensors: list[GGUFTensor]) -> GemmaConfig:
    """A GemmaConfig from GGUF metadata (and the embedding's shape, for the vocabulary size)."""
    arch = metadata.get("general.architecture")
    if arch not in _SUPPORTED:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (expected one of {_SUPPORTED})")

    def meta(key, default=None, required=False):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"GGUF metadata {arch}.{key} is missing")
        return value

    embed = [t for t in tensors if t.name == "token_embd.weight"]
    if not embed:
        raise ValueError("GGUF tensor 'token_embd.weight' is missing")
    vocab = embed[0].dims[1]  # GGUF dims are [D, V]
    num_layers = int(meta("block_count", required=True))
    embed_dim = int(meta("embedding_length", required=True))
    num_heads = int(meta("attention.head_count", required=True))
    head_dim = int(meta("attention.key_length", embed_dim // num_heads))
    value_dim = int(meta("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"GGUF value_length {value_dim} != key_length {head_dim}: not a Gemma model")
    common = dict(
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        hidden_dim=int(meta("feed_forward_length", required=True)),
        vocab_size=vocab,
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        pad_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        eos_id=int(metadata.get("tokenizer.ggml.eos_token_id", 1)),
        bos_id=int(metadata.get("tokenizer.ggml.bos_token_id", 2)),
        limits=Limits(),
    )
    if arch == "gemma":
        return GemmaConfig(
            rope_base=float(meta("rope.freq_base", 10_000.0)),
            start_of_turn_id=_token_id(metadata, "<start_of_turn>", 106),
            end_of_turn_id=_token_id(metadata, "<end_of_turn>", 107), **common)
    window = meta("attention.sliding_window")
    scaling = meta("rope.scaling.type")
    factor = float(meta("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    if scaling not in (None, "none", "linear"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")
    return GemmaConfig(
        rope_base=float(meta("rope.freq_base", 1_000_000.0)),
        local_rope_base=10_000.0, rope_scaling_factor=factor,
        query_pre_attn_scalar=head_dim,
        use_qk_norm=True, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=_layer_pattern(meta("attention.sliding_window_pattern"), num_layers),
        sliding_window=int(window) if window is not None else 512,
        start_of_turn_id=_token_id(metadata, "<start_of_turn>", 105),
        end_of_turn_id=_token_id(metadata, "<end_of_turn>", 106), **common)


def _layer_pattern(pattern, num_layers: int):
    """Gemma 3's local/global layer types: an int period, a per-layer bool list (True = sliding),
    or (absent) every 6th layer global, as transformers' Gemma3TextConfig and llama.cpp assume."""
    if pattern is None:
        return gemma3_pattern(num_layers, 6)
    if isinstance(pattern, (int, np.integer)):
        return gemma3_pattern(num_layers, int(pattern))
    flags = list(pattern)
    if len(flags) != num_layers:
        raise ValueError(f"sliding_window_pattern has {len(flags)} entries for {num_layers} layers")
    return tuple("local" if flag else "global" for flag in flags)


# --- tensors -> our tree -----------------------------------------------------------------------
# GGUF per-layer tensor -> a projection (`projections.TARGETS`: path, stack index and the same
# [out, in] -> ours mapping the HF loader uses), or a norm's path inside layer_i.
_LAYER_TARGETS = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
_LAYER_NORMS = {
    "attn_norm": ("pre_attention_norm", "scale"),
    "attn_q_norm": ("attn", "query_norm", "scale"),
    "attn_k_norm": ("attn", "key_norm", "scale"),
    "post_attention_norm": ("post_attention_norm", "scale"),
    "ffn_norm": ("pre_ffw_norm", "scale"),
    "post_ffw_norm": ("post_ffw_norm", "scale"),
}


def _target(name: str) -> tuple[tuple[str, ...], int | None, Target | str]:
    """(path tuple, stack index, Target or "norm" / "embed") for a GGUF tensor name; ValueError if
    it is not ours."""
    if not name.endswith(".weight"):
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    stem = name[: -len(".weight")]
    if stem == "token_embd":
        return ("embedder", "input_embedding"), None, "embed"
    if stem == "output_norm":
        return ("final_norm", "scale"), None, "norm"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer = f"layer_{int(parts[1])}"
        if parts[2] in _LAYER_TARGETS:
            target = TARGETS[_LAYER_TARGETS[parts[2]]]
            return (layer, *target.path), target.index, target
        if parts[2] in _LAYER_NORMS:
            return (layer, *_LAYER_NORMS[parts[2]]), None, "norm"
    if stem == "output":
        raise ValueError("GGUF has an untied output.weight; Gemma ties the output to token_embd")
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _convert(w: np.ndarray, kind: Target | str, config: GemmaConfig) -> np.ndarray:
    """One dequantized tensor (numpy [out, in] for matrices, as torch's) -> our layout."""
    if kind == "norm":
        return w - np.float32(1.0)  # GGUF stores 1 + w
    if kind == "embed":
        return w  # [V, D]
    return kind.from_torch(w, config)


def read_config(path: str | os.PathLike) -> GemmaConfig:
    """The config of a GGUF file, from its header alone (no tensor is read): what the mesh is built
    from before the weights load onto it."""
    return config_from_gguf(*read_gguf(path))


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, mesh: Mesh | None = None,
              progress: bool = True, quantize: str | None = None) -> tuple[GemmaConfig, dict]:
    """Read a Gemma GGUF: (config, params) with params in `dtype`, sharded onto `mesh` if given.

    Each tensor is dequantized and converted on the host, then put straight onto its
    `params.param_shardings` placement (`params.placer`; no mesh: the default device) as it is
    read, so no device ever holds more than its shards plus one tensor. quantize: "int8" quantizes
    each weight as it is placed (`quantize.py`), so the float tree never exists on device.
    Every tensor is checked against `params.param_shapes(config)`; a missing, unexpected or
    misshapen tensor raises ValueError naming it.
    """
    import gguf

    metadata, tensors = read_gguf(path)
    config = config_from_gguf(metadata, tensors)
    dtype = jnp.dtype(dtype)
    expected = P.flatten(P.param_shapes(config, dtype))
    placer = P.placer(config, mesh, dtype, quantize)

    def place(key, value):
        want = expected[key].shape
        if value.shape != want:
            raise ValueError(f"{'/'.join(key)}: GGUF gives shape {value.shape}, config expects {want}")
        return placer(key, value)

    loaded: dict[tuple[str, ...], jax.Array] = {}
    pending: dict[tuple[str, ...], dict[int, np.ndarray]] = {}  # halves of k/v and gate/up
    for tensor in tqdm(tensors, desc="GGUF tensors", unit="tensor", disable=not progress):
        key, index, kind = _target(tensor.name)
        if key not in expected:
            raise ValueError(f"GGUF tensor {tensor.name!r} -> {'/'.join(key)}, which this config does not have")
        w = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(tensor.qtype))
        w = w.astype(np.float32, copy=False)
        w = _convert(w, kind, config)
        if index is None:
            if key in loaded:
                raise ValueError(f"GGUF tensor {tensor.name!r} appears twice")
            loaded[key] = place(key, w)
            continue
        parts = pending.setdefault(key, {})
        parts[index] = w
        if len(parts) == 2:
            loaded[key] = place(key, np.stack([parts[0], parts[1]], axis=STACK_AXIS))
            del pending[key]
    missing = sorted("/".join(k) for k in expected if k not in loaded)
    if missing:
        raise ValueError(f"GGUF lacks tensors for: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    return config, P.unflatten(loaded)
