"""The projections of a Gemma layer, declared once by their input and output logical axes.

Everything about a projection weight is derived from `PROJECTIONS` / `TARGETS` below, never
re-typed: its shape and logical axes (`model.py` declares the weight from them), the forward einsum,
the LoRA merge equation and adapter layout (`lora.py`), and the mapping between a
torch `nn.Linear` matrix [out, in] and our weight, which the Hugging Face, GGUF and PEFT loaders all
use (`weights/`).

A weight is [*ins, *outs]: its input axes first, so that each projection is one plain [in, out]
matmul (with D in the middle XLA transposes the weight on every call, which in memory-bound decoding
costs as much as reading it again). A stacked pair (k/v, gate/up) adds the "stack" axis of size 2
between the two, at `STACK_AXIS`: [*ins, 2, *outs].

Shape letters, used with these meanings across the code base (one letter, one meaning):

    B batch rows            T query length          S key / cache length
    D embed_dim             N query heads           K kv heads (only kv heads)
    G = N // K              H head_dim              F hidden_dim (MLP)
    V vocab_size            L layers                C the stacked pair (k/v or gate/up), size 2
    R LoRA rank             A adapter slots of a LoRA bank (`lora.AdapterBank`)
    P prompts of one prefill batch (`engine`)

A torch [out, in] matrix flattens `outs` (and `ins`) row-major in the order given here: q_proj is
[N*H, D] with the heads outermost, o_proj is [D, N*H]. That is how transformers, peft and llama.cpp
all lay them out.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gemma_jax.config import GemmaConfig

# Logical axis name -> shape letter (the einsum letter of that axis everywhere).
LETTERS = {"embed": "D", "heads": "N", "kv_heads": "K", "head_dim": "H", "mlp": "F", "stack": "C", "vocab": "V"}

STACK_AXIS = 1  # the axis of a stacked pair in its weight (every stacked projection has one input axis)


def axis_size(config: GemmaConfig, axis: str) -> int:
    """The size of one logical axis of a weight for `config`."""
    return {"embed": config.embed_dim, "heads": config.num_heads, "kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "mlp": config.hidden_dim, "stack": 2,
            "vocab": config.vocab_size}[axis]


def _letters(axes: tuple[str, ...]) -> str:
    return "".join(LETTERS[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection weight `parent/name/w` of a layer: x [B, T, *ins] -> y [B, T, (C,) *outs]."""

    parent: str  # "attn" | "mlp"
    name: str  # "q_einsum", ...
    ins: tuple[str, ...]  # logical axes of the input, contracted
    outs: tuple[str, ...]  # logical axes of the output
    stacked: bool = False  # a pair of projections in one weight [*ins, 2, *outs]

    def __post_init__(self):
        assert not self.stacked or len(self.ins) == STACK_AXIS, self

    @property
    def path(self) -> tuple[str, ...]:
        """The weight inside layer_i, e.g. ("attn", "q_einsum", "w")."""
        return (self.parent, self.name, "w")

    @property
    def axes(self) -> tuple[str, ...]:
        return (*self.ins, *(("stack",) if self.stacked else ()), *self.outs)

    def shape(self, config: GemmaConfig) -> tuple[int, ...]:
        return tuple(axis_size(config, a) for a in self.axes)

    @property
    def equation(self) -> str:
        """The forward einsum, e.g. "BTD,DCKH->BTCKH" for kv."""
        stack = "C" if self.stacked else ""
        return f"BT{_letters(self.ins)},{_letters(self.axes)}->BT{stack}{_letters(self.outs)}"


Q = Projection("attn", "q_einsum", ("embed",), ("heads", "head_dim"))
KV = Projection("attn", "kv_einsum", ("embed",), ("kv_heads", "head_dim"), stacked=True)
ATTN_VEC = Projection("attn", "attn_vec_einsum", ("heads", "head_dim"), ("embed",))
GATING = Projection("mlp", "gating_einsum", ("embed",), ("mlp",), stacked=True)
LINEAR = Projection("mlp", "linear", ("mlp",), ("embed",))
PROJECTIONS: tuple[Projection, ...] = (Q, KV, ATTN_VEC, GATING, LINEAR)


@dataclasses.dataclass(frozen=True)
class Target:
    """One torch `nn.Linear` of a layer (the names transformers and peft use) on our weights: the
    whole of a projection, or one half (`index`) of a stacked pair. Its matrix is [out, in]."""

    name: str  # "q_proj", ...
    projection: Projection
    index: int | None = None  # position in the stacked axis: k=0 v=1, gate=0 up=1

    @property
    def path(self) -> tuple[str, ...]:
        return self.projection.path

    @property
    def ins(self) -> tuple[str, ...]:
        return self.projection.ins

    @property
    def outs(self) -> tuple[str, ...]:
        return self.projection.outs

    def in_shape(self, config: GemmaConfig) -> tuple[int, ...]:
        return tuple(axis_size(config, a) for a in self.ins)

    def out_shape(self, config: GemmaConfig) -> tuple[int, ...]:
        return tuple(axis_size(config, a) for a in self.outs)

    def in_features(self, config: GemmaConfig) -> int:
        return math.prod(self.in_shape(config))

    def out_features(self, config: GemmaConfig) -> int:
        return math.prod(self.out_shape(config))

    # -- the LoRA merge (letters from LETTERS; R the LoRA rank) -----------------------------------
    @property
    def merge_equation(self) -> str:
        """A [*ins, R], B [R, *outs] -> the delta of this target's (slice of the) weight."""
        i, o = _letters(self.ins), _letters(self.outs)
        return f"{i}R,R{o}->{i}{o}"

    # -- torch [out, in] <-> ours [*ins, *outs] ---------------------------------------------------
    def from_torch(self, w: np.ndarray, config: GemmaConfig) -> np.ndarray:
        """A torch weight [out, in] -> our [*ins, *outs] (the slice `index` of a stacked pair)."""
        want = (self.out_features(config), self.in_features(config))
        if tuple(w.shape) != want:
            raise ValueError(f"{self.name} ({'/'.join(self.path)}): torch weight shape {tuple(w.shape)}, "
                             f"config expects [out, in] = {want}")
        w = w.reshape(*self.out_shape(config), *self.in_shape(config))
        n_out = len(self.outs)
        return w.transpose(*range(n_out, w.ndim), *range(n_out))

    def to_torch(self, w: np.ndarray, config: GemmaConfig) -> np.ndarray:
        """Our [*ins, *outs] -> the torch weight [out, in]."""
        return w.reshape(self.in_features(config), self.out_features(config)).T

    def lora_a_from_torch(self, a: np.ndarray, config: GemmaConfig) -> np.ndarray:
        """peft lora_A [r, in] -> [*ins, r]."""
        return np.moveaxis(a.reshape(a.shape[0], *self.in_shape(config)), 0, -1)

    def lora_b_from_torch(self, b: np.ndarray, config: GemmaConfig) -> np.ndarray:
        """peft lora_B [out, r] -> [r, *outs]."""
        return np.moveaxis(b.reshape(*self.out_shape(config), b.shape[-1]), -1, 0)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("q_proj", Q), Target("k_proj", KV, 0), Target("v_proj", KV, 1), Target("o_proj", ATTN_VEC),
    Target("gate_proj", GATING, 0), Target("up_proj", GATING, 1), Target("down_proj", LINEAR),
)}
