"""A small reader of XLA's compiled HLO text, for `benchmarks/hlo.py` and `tests/test_hlo.py`.

Parses `compiled.as_text()` into computations and instructions (name, shape, opcode, operands,
called computations) and answers the questions issue 9 asks of a dispatch: how many
`conditional`s, which sorts and top-ks and over how many elements, which instructions output a
slice of the KV cache, and how many bytes each top-level instruction moves (a traffic model: see
`traffic`). Not a general HLO parser: enough of the text format that XLA prints (jax 0.10).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
               "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# No-traffic opcodes: views, tuples, control. Their cost is in what they call or view.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "replica-id", "while", "conditional", "call", "opt-barrier", "add-dependency", "domain"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_SLICING = {"slice", "dynamic-slice", "gather"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the printed result shape (a tuple shape keeps its parentheses)
    opcode: str
    operands: list[str]
    raw_operands: str
    attrs: str
    computation: str
    root: bool

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        return parse_arrays(self.shape)

    @property
    def nbytes(self) -> float:
        return shape_bytes(self.shape)

    def called(self, key: str) -> list[str]:
        """Computations named by attribute `key` (calls=, body=, branch_computations={...}, ...)."""
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attrs)
        if not m:
            return []
        return [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", m.group(1).strip("{}"))]

    @property
    def trip_count(self) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.attrs)
        return int(m.group(1)) if m else None



def parse_arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a (possibly tuple) shape string: [(dtype, dims)]."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in parse_arrays(shape))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _split_instr(rest: str) -> tuple[str, str, str, str]:
    """'SHAPE opcode(operands), attrs' -> (shape, opcode, operands text, attrs)."""
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.index("(")
    opcode = rest[:paren].strip()
    close = _balanced(rest, paren)
    return shape, opcode, rest[paren + 1:close - 1], rest[close:].lstrip(", ")


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str
    # Runs assumed for a loop whose trip count XLA does not know (computed on the device): one count for
    # every such loop, or a function of the `while` instruction (loops of different lengths: nested ones).
    unknown_trips: int | Callable[[Instr], int] = 1

    def __post_init__(self):
        self.by_name = {i.name: i for comp in self.computations.values() for i in comp}
        # Computation -> executions per run of the entry: a loop body times its known trip count
        # (`unknown_trips` if unknown), every branch of a conditional as if it ran (an upper bound).
        # Fused computations are not scheduled: their fusion instruction is.
        self.scheduled: dict[str, int] = {}
        self._walk(self.entry, 1)

    def _walk(self, comp: str, times: int) -> None:
        if comp not in self.computations:
            return
        self.scheduled[comp] = self.scheduled.get(comp, 0) + times
        for ins in self.computations[comp]:
            if ins.opcode == "while":
                n = ins.trip_count or self._unknown(ins)
                for c in ins.called("body"):
                    self._walk(c, times * n)
                for c in ins.called("condition"):
                    self._walk(c, times * (n + 1))
            elif ins.opcode == "conditional":
                for key in ("branch_computations", "true_computation", "false_computation"):
                    for c in ins.called(key):
                        self._walk(c, times)
            elif ins.opcode in ("call", "async-start"):
                for c in ins.called("to_apply") + ins.called("calls"):
                    self._walk(c, times)

    def _unknown(self, ins: Instr) -> int:
        return self.unknown_trips(ins) if callable(self.unknown_trips) else self.unknown_trips

    def instructions(self, scheduled_only: bool = True):
        for comp, instrs in self.computations.items():
            if scheduled_only and comp not in self.scheduled:
                continue
            yield from instrs

    def all_instructions(self):
        return self.instructions(scheduled_only=False)

    def root(self, comp: str) -> Instr:
        return next(i for i in self.computations[comp] if i.root)

    def shape_of(self, name: str) -> str:
        ins = self.by_name.get(name)
        return ins.shape if ins is not None else ""


def parse(text: str, unknown_trips: int | Callable[[Instr], int] = 1) -> Module:
    """Parse XLA's HLO module text (`compiled.as_text()` or `lowered.as_text(dialect="hlo")`);
    `unknown_trips`: how many runs to count for a loop whose trip count is not known at compile time
    (or a function of its `while` instruction)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, opcode, operands, attrs = _split_instr(m.group(3))
        names = re.findall(r"%([\w.\-]+)", operands)
        comps[current].append(Instr(m.group(2), shape, opcode, names, operands.strip(), attrs, current, bool(m.group(1))))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(comps, entry, unknown_trips)


# -- questions --------------------------------------------------------------------------------------
def conditionals(mod: Module) -> list[Instr]:
    return [i for i in mod.all_instructions() if i.opcode == "conditional"]


@dataclasses.dataclass
class SortInfo:
    name: str
    kind: str  # "sort" or "top-k"
    shape: tuple[int, ...]  # the (first) operand's dims
    sorted_dim: int  # elements along the sorted axis
    k: int | None  # top-k's k
    over_vocab: bool  # a sort over >= V elements, or a top-k over >= V with k > GPU_TOPK_MAX_K

    def __str__(self) -> str:
        what = f"top-k k={self.k}" if self.kind == "top-k" else "sort"
        return f"{what} over {self.sorted_dim} of {list(self.shape)}{'  <-- over the vocabulary' if self.over_vocab else ''}"


GPU_TOPK_MAX_K = 16  # XLA's GPU top-k kernel serves k <= 16; a larger k becomes a full sort


def sorts(mod: Module, vocab: int) -> list[SortInfo]:
    """Every sort and top-k (opcode `topk` or custom-call TopK), with its operand size."""
    out = []
    for ins in mod.all_instructions():
        is_topk = ins.opcode == "topk" or (ins.opcode == "custom-call" and re.search(r'custom_call_target="[^"]*[Tt]op[Kk]', ins.attrs))
        if ins.opcode != "sort" and not is_topk:
            continue
        operand = parse_arrays(mod.shape_of(ins.operands[0])) if ins.operands else []
        dims = operand[0][1] if operand else ins.arrays[0][1]
        if is_topk:
            k = ins.arrays[0][1][-1]
            out.append(SortInfo(ins.name, "top-k", dims, dims[-1], k, dims[-1] >= vocab and k > GPU_TOPK_MAX_K))
        else:
            m = re.search(r"dimensions=\{(\d+)\}", ins.attrs)
            axis = int(m.group(1)) if m else len(dims) - 1
            out.append(SortInfo(ins.name, "sort", dims, dims[axis], None, dims[axis] >= vocab))
    return out


def _through_views(mod: Module, name: str) -> Instr:
    """Follow bitcasts and reshapes back from instruction `name`."""
    ins = mod.by_name[name]
    while ins.opcode in ("bitcast", "reshape") and ins.operands:
        ins = mod.by_name[ins.operands[0]]
    return ins


def fusion_root_ops(mod: Module, fusion: Instr) -> list[Instr]:
    """The instructions a fusion outputs (one per element of a multi-output root), through views."""
    comp = fusion.called("calls")[0]
    root = mod.root(comp)
    elems = [mod.by_name[n] for n in root.operands] if root.opcode == "tuple" else [root]
    return [_through_views(mod, e.name) for e in elems]


def cache_copies(mod: Module, batch: int, kv_heads: int, head_dim: int, max_len: int) -> list[Instr]:
    """Scheduled copies and fusions whose output is a [B, K, span, H] array (span <= max_len) that is
    not an in-place update of the cache (scatter / dynamic-update-slice at the root)."""
    found = []
    for ins in mod.instructions():
        if ins.opcode not in ("copy", "fusion", "slice", "dynamic-slice", "concatenate", "transpose"):
            continue
        outs = ins.arrays
        roots = fusion_root_ops(mod, ins) if ins.opcode == "fusion" else [ins] * len(outs)
        for (dt, dims), root in zip(outs, roots):
            if len(dims) == 4 and dims[0] == batch and dims[1] == kv_heads and dims[3] == head_dim \
                    and dims[2] <= max_len and root.opcode not in _IN_PLACE:
                found.append(ins)
                break
    return found


def weight_copies(mod: Module, weight_sizes: set[int]) -> list[Instr]:
    """Scheduled copies, transposes and non-dot fusions whose output has as many elements as one of
    the weights (`weight_sizes`, element counts): a weight permuted or copied before its matmul
    (what `jnp.einsum` contracting axes out of the weight's order costs, every call)."""
    found = []
    for ins in mod.instructions():
        if ins.opcode not in ("copy", "fusion", "transpose"):
            continue
        roots = fusion_root_ops(mod, ins) if ins.opcode == "fusion" else [ins] * len(ins.arrays)
        for (dt, dims), root in zip(ins.arrays, roots):
            if math.prod(dims) in weight_sizes and root.opcode not in _IN_PLACE | {"dot", "custom-call"}:
                found.append(ins)
                break
    return found


# -- traffic model ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Traffic:
    name: str
    opcode: str
    what: str  # fusion root opcode(s) or the opcode, and the op_name metadata's tail
    bytes_per_run: float
    runs: int  # executions per dispatch

    @property
    def total(self) -> float:
        return self.bytes_per_run * self.runs


def _param_read_bytes(mod: Module, comp: str) -> dict[int, float]:
    """Bytes a fusion reads of each parameter: a parameter used only through slices costs the slices,
    one used only as the buffer of an in-place update costs nothing (the update is counted)."""
    instrs = mod.computations[comp]
    users: dict[str, list[Instr]] = {}
    for ins in instrs:
        for op in ins.operands:
            users.setdefault(op, []).append(ins)
    result = {}
    for ins in instrs:
        if ins.opcode != "parameter":
            continue
        us = users.get(ins.name, [])
        if us and all(u.opcode in _SLICING and u.operands[0] == ins.name for u in us):
            nbytes = sum(u.nbytes for u in us)
        elif us and all(u.opcode in _IN_PLACE and u.operands[0] == ins.name for u in us):
            nbytes = 0.0
        else:
            nbytes = ins.nbytes
        result[int(ins.raw_operands)] = nbytes
    return result


def _op_name(ins: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    return m.group(1).split("/")[-1] if m else ""


def instruction_traffic(mod: Module, ins: Instr) -> tuple[float, str]:
    """(bytes read + written, description) of one scheduled instruction, the model:
    - views, tuples and control flow move nothing (their bodies are counted on their own);
    - an in-place update (scatter / dynamic-update-slice, alone or at a fusion's root) reads and
      writes the update, not the buffer it updates;
    - a fusion reads of each operand only the slices it takes of it; everything else reads its
      operands and writes its output once."""
    if ins.opcode in _FREE:
        return 0.0, ins.opcode
    if ins.opcode in _IN_PLACE:
        rest = sum(shape_bytes(mod.shape_of(o)) for o in ins.operands[1:])
        update = shape_bytes(mod.shape_of(ins.operands[-1]))
        return rest + update, ins.opcode
    if ins.opcode == "fusion":
        comp = ins.called("calls")[0]
        reads = _param_read_bytes(mod, comp)
        read = sum(reads.get(i, shape_bytes(mod.shape_of(o))) for i, o in enumerate(ins.operands))
        roots = fusion_root_ops(mod, ins)
        write = 0.0
        for (dt, dims), root in zip(ins.arrays, roots):
            if root.opcode in _IN_PLACE:
                write += shape_bytes(mod.shape_of(root.operands[-1]))
            else:
                write += DTYPE_BYTES.get(dt, 4) * math.prod(dims)
        kinds = "+".join(sorted({r.opcode for r in roots}))
        return read + write, f"fusion[{kinds}]"
    read = sum(shape_bytes(mod.shape_of(o)) for o in ins.operands)
    return read + ins.nbytes, ins.opcode


def traffic(mod: Module) -> list[Traffic]:
    """Modelled bytes of every scheduled instruction, times how often it runs per dispatch."""
    out = []
    for comp, runs in mod.scheduled.items():
        for ins in mod.computations[comp]:
            nbytes, what = instruction_traffic(mod, ins)
            if nbytes:
                out.append(Traffic(ins.name, ins.opcode, f"{what} {_op_name(ins)}".strip(), nbytes, runs))
    return out
