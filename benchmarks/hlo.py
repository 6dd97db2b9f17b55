"""Proof without a GPU (issue 9, item 8): the compiled decode and prefill of the 7B shape, read back.

    python benchmarks/hlo.py                  # gemma_7b, batch 32, context 1024 (~3 min on 2 CPU cores)
    python benchmarks/hlo.py --small          # 2 layers of the same shape (what tests/test_hlo.py checks)
    python benchmarks/hlo.py --dump DIR       # also write every compiled HLO text into DIR
    python benchmarks/hlo.py --engine paged   # only the paged engine's step (below), 270M and 7B shapes

Everything is lowered from `jax.ShapeDtypeStruct` trees (parameters, decode state, LoRA bank) through
the engine's public device functions (`engine.generate_steps`, `engine.prefill_step`, jitted here as
the engine jits them: the state donated), and compiled for this CPU; no weight is allocated. For each
variant the engine can dispatch (sampling mode x LoRA on/off) it prints:

- conditionals: `conditional` instructions (data-dependent control flow; on a GPU each one copies its
  predicate to the host and waits). Target 0.
- vocab sorts: sorts whose sorted axis has >= V elements, and top-ks over >= V elements with k > 16
  (XLA's GPU top-k kernel serves k <= 16; a larger k becomes a full sort). Target 0.
- span copies: copies, or fusions that are not an in-place update, whose output is [B, K, span, H]
  with 1 < span != block: a kv span (bucket) materialised every layer every step. Target 0.
  [B, K, 1, H] arrays are query-sized (G = 1 for the 7B's MHA), not cache copies.
- block copies: the same with span == the decode attention's block (`attention.xla_block`): the
  block the XLA attention loop reads per iteration, copied out of the cache. The decode is jitted as
  the Engine jits it (`engine.decode_compiler_options`), so on this CPU the 7B's MHA at batch 32
  runs the loop's "reduce" form (`attention.default_products`), which XLA:CPU fuses with the slice:
  none. In the "dot" form (smaller batches, G > 1) XLA:CPU fuses no slice into a dot, and each block
  is materialised once before its dot reads it; a TPU dot reads it in place, and on a GPU the engine
  uses the Pallas kernel. Reported, and priced as "fused" below.
- bytes per decode step against the ideal, every weight byte once + every live KV byte once
  (B rows x `--context` tokens; with LoRA the bank's bytes too). Target <= 1.2x. Two measures:
  * XLA's `cost_analysis()["bytes accessed"]` of the dispatch. XLA counts a loop body once, so this
    is one decode step plus the work around the loop, with one block of each layer's attention loop
    (whose trip count is computed on the device). It also counts a scatter as reading and writing its
    whole operand (measured: a [32,16,2048,256] f32 buffer updated at one position per row costs 2x
    the buffer), although the cache update runs in place, and a fused gather as reading its whole
    operand (the embedding lookup as reading the [V, D] table). "adj" is XLA's figure less those two
    (`xla_overcount`), plus the attention loops' other blocks as the traffic model prices them
    (blocks = ceil((context + K) / block): the most any step of the dispatch runs).
  * the traffic model of `hlo_text.traffic`: every scheduled instruction's operands and output, an
    in-place update counted as the bytes it writes, nested loops times their trip count (the
    attention loop: the block count above), the whole dispatch divided by the K steps. Its largest
    instructions are listed for the first variant. "fused": the model less the block copies (what a
    backend that reads the block in place moves).

dtype: float32 by default. This CPU has no bfloat16 arithmetic: XLA:CPU upcasts bf16 dots and
scatters, converting the whole KV cache to f32 and back every layer and step (visible with
`--dtype bfloat16`: the "convert" fusions at the top of the traffic list), which no GPU does and which
would swamp every figure here. In float32 it compiles the program as written; ratios are bytes over
bytes of the same dtype, so they carry over to bf16 (the ideal in bf16 is printed beside).

The paged engine (`engine/paged.py`, `--engine paged`): `paged_step` lowered the same way (abstract
parameters, pools and `PagedEngine._padding_inputs`'s StepInputs; jitted as `PagedEngine` jits it,
the pools donated, XLA reference attention), greedy, at the 270M shape (R 8) and the 7B shape (R
`--batch`): "decode" (T = R, one step), "decode multi" (T = R, the while loop of K = `--steps`
steps, figures per step) and "mixed" (T = `--budget`: R - 1 decode rows and a fresh prompt's first
chunk). The same checks, read for a flat batch of T tokens: span copies are [T, K, span, H] slices
read out of a pool [P, K, S, H] (size-1 dims dropped, as XLA drops them: the 270M's K = 1); "page
copies" (the block copies' counterpart) are span == S, a page per token copied out of the pool;
"pool" a whole pool copied. Weight copies leave out [T, ...] arrays (activations: at T = 512,
T x D of the 270M and T x F of the 7B have a weight's element count). The ideal is every weight byte
once + every KV page the batch's sequences read, once (local layers from their window's first page).
The reference's loop runs page columns lo .. hi of the whole batch, each gathering a page per token
(`paged_attention.ragged_paged_attention`): the traffic model runs each layer's loop that many
columns (the dispatch's longest step) and the step loop K - 1 times; XLA counts each loop body once
(the step before the loop and one step of it), so its figures are divided by the steps it counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hlo_text  # noqa: E402
from gemma_jax import attention  # noqa: E402
from gemma_jax import config as config_lib  # noqa: E402
from gemma_jax import lora as lora_lib  # noqa: E402
from gemma_jax import model as model_lib  # noqa: E402
from gemma_jax import params as params_lib  # noqa: E402
from gemma_jax import sampling  # noqa: E402
from gemma_jax.engine import engine as engine_lib  # noqa: E402
from gemma_jax.engine import paged as paged_lib  # noqa: E402
from gemma_jax.engine.api import SamplingParams  # noqa: E402
from gemma_jax.engine.state import init_decode_state  # noqa: E402

TARGET_RATIO = 1.2


@dataclasses.dataclass(frozen=True)
class Setup:
    config: config_lib.GemmaConfig
    dtype: jnp.dtype
    slots: int  # B
    max_len: int  # S
    steps: int  # K decode steps per dispatch
    context: int  # tokens already in every row's cache (the "live" KV)
    prompt: int  # prefill prompt length (TTFT's)


@dataclasses.dataclass
class Report:
    name: str
    conditionals: int
    sorts: list[hlo_text.SortInfo]
    span_copies: list[str]
    block_copies: list[str]
    weight_copies: list[str]  # a weight copied or permuted before its matmul (`hlo_text.weight_copies`)
    dynamic_loops: int  # while loops whose trip count is computed on the device (the attention loops)
    xla_bytes: float
    xla_flops: float
    xla_overcount: float  # what XLA counts that no backend moves (`xla_overcount`)
    model_bytes: float  # traffic model, per decode step (dispatch / K) or per prefill
    fused_bytes: float  # the model less the block copies
    loop_extra: float  # the attention loops' blocks XLA's count leaves out (modelled), per step
    ideal_bytes: float
    top: list[tuple[int, hlo_text.Traffic]]  # (how many alike, one of them), largest total first
    compile_s: float
    extra: str = ""
    pool_copies: list[str] = dataclasses.field(default_factory=list)  # paged: a whole [P, K, S, H] pool copied
    kv_ideal: float = 0.0  # paged: bytes of the KV pages the batch's sequences read, per step
    kv_looped: float = 0.0  # paged: bytes the attention loops gather (a page per token per column), per step
    kv_copied: float = 0.0  # paged: bytes of the page copies' outputs (gathered pages materialised), per step
    steps: int = 1  # decode steps the dispatch runs (`top` is per dispatch)

    @property
    def vocab_sorts(self) -> list[hlo_text.SortInfo]:
        return [s for s in self.sorts if s.over_vocab]

    @property
    def adj_bytes(self) -> float:
        return self.xla_bytes - self.xla_overcount + self.loop_extra


# -- abstract inputs ------------------------------------------------------------------------------
class _AbstractEngine(engine_lib.Engine):
    """The Engine's host-side planning (buckets) over abstract parameters: nothing is placed."""

    def _place_params(self, params):
        return params


def abstract_engine(setup: Setup) -> engine_lib.Engine:
    params = params_lib.param_shapes(setup.config, setup.dtype)
    return _AbstractEngine(setup.config, params, slots=setup.slots, max_len=setup.max_len,
                           steps_per_call=setup.steps, cache_dtype=setup.dtype)


def abstract_bank(setup: Setup, adapters: int, rank: int):
    """ShapeDtypeStructs of a bank of `adapters` slots (+ slot 0, the base model) of rank `rank`."""
    return jax.eval_shape(lambda: lora_lib.make_bank(setup.config, adapters + 1, rank, setup.dtype))


def weight_sizes(config) -> set[int]:
    """Element counts of the model's matrices (norm scales, [D], left out: activations share them)."""
    return {math.prod(x.shape) for x in jax.tree.leaves(params_lib.param_shapes(config)) if x.ndim > 1}


def tree_bytes(tree) -> float:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kv_bytes_per_token(setup: Setup, dtype=None) -> float:
    cfg = setup.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype or setup.dtype).itemsize


# -- lowering -------------------------------------------------------------------------------------
_prefill = jax.jit(engine_lib.prefill_step, static_argnames=("config", "cache_dtype", "use_lora", "mode"))


def products(setup: Setup) -> str:
    """The decode attention's form of its block products at this setup (`engine.decode_products`)."""
    return engine_lib.decode_products(setup.config, setup.slots)


def attention_blocks(setup: Setup) -> int:
    """Blocks each layer's XLA decode attention loop runs at `setup.context` (the dispatch's last step)."""
    block = min(attention.xla_block(products(setup)), setup.max_len)
    return -(-min(setup.context + setup.steps, setup.max_len) // block)


def compile_decode(setup: Setup, mode: str, bank=None):
    """The compiled `generate_steps` dispatch (XLA attention: what a CPU or TPU runs). No context
    length is compiled in: the attention loop's trip count is computed on the device."""
    params = params_lib.param_shapes(setup.config, setup.dtype)
    state = jax.eval_shape(lambda: init_decode_state(setup.config, setup.slots, setup.max_len, setup.dtype))
    generate = jax.jit(engine_lib.generate_steps, static_argnames=("config", "steps", "use_lora", "mode"),
                       donate_argnums=(2,), compiler_options=engine_lib.decode_compiler_options(setup.config, setup.slots))
    lowered = generate.lower(params, bank, state, config=setup.config, steps=setup.steps,
                             use_lora=bank is not None, mode=mode)
    return lowered.compile()


def compile_prefill(setup: Setup, engine: engine_lib.Engine, mode: str, bank=None):
    """The compiled `prefill_step` of one prompt of `setup.prompt` tokens (padded to its bucket)."""
    t = engine.prompt_bucket(setup.prompt)
    params = params_lib.param_shapes(setup.config, setup.dtype)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    rows = jax.eval_shape(lambda: sampling.empty_rows(1))
    lowered = _prefill.lower(params, bank, i32(1, t), i32(1), rows, i32(1), i32(1), config=setup.config,
                             cache_dtype=setup.dtype, use_lora=bank is not None, mode=mode)
    return lowered.compile(), t


# -- analysis -------------------------------------------------------------------------------------
def _xla_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def group_traffic(traffic: list[hlo_text.Traffic]) -> list[tuple[int, hlo_text.Traffic]]:
    """Instructions alike (same description, bytes and runs: e.g. one per layer) grouped, largest first."""
    groups: dict[tuple, list[hlo_text.Traffic]] = {}
    for t in traffic:
        groups.setdefault((t.what, round(t.bytes_per_run), t.runs), []).append(t)
    return sorted(((len(g), g[0]) for g in groups.values()), key=lambda item: -item[0] * item[1].total)


def xla_overcount(mod: hlo_text.Module) -> float:
    """Bytes XLA's cost model counts that no backend moves, each scheduled instruction once (as XLA
    counts a loop body once): a scatter reads and writes its whole operand buffer (it runs in place:
    only the update moves), and a fused gather reads its whole operand (the embedding lookup reads
    B rows, not the [V, D] table). Both measured on this jax with one-op programs."""
    total = 0.0
    for ins in mod.instructions():
        roots = hlo_text.fusion_root_ops(mod, ins) if ins.opcode == "fusion" else [ins]
        total += sum(2 * hlo_text.shape_bytes(mod.shape_of(r.operands[0])) for r in roots if r.opcode == "scatter")
        if ins.opcode == "fusion":
            for param in mod.computations[ins.called("calls")[0]]:
                users = [u for u in mod.computations[param.computation] if param.name in u.operands]
                if param.opcode == "parameter" and users and all(
                        u.opcode == "gather" and u.operands[0] == param.name for u in users):
                    total += param.nbytes - sum(u.nbytes for u in users)
    return total


def analyse(name: str, compiled, setup: Setup, ideal: float, per: int, compile_s: float,
            dump: str | None = None, blocks: int = 1) -> tuple[Report, hlo_text.Module]:
    """Read one compiled dispatch; `per`: the traffic model divides the dispatch by it (K for decode);
    `blocks`: runs of a loop whose trip count is computed on the device (the attention loops)."""
    text = compiled.as_text()
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{name.replace(' ', '_')}.hlo.txt"), "w") as f:
            f.write(text)
    mod = hlo_text.parse(text, unknown_trips=blocks)
    cfg = setup.config
    cost = _xla_cost(compiled)
    traffic = hlo_text.traffic(mod)
    once = sum(t.total for t in hlo_text.traffic(hlo_text.parse(text))) / per  # each attention loop run once
    model = sum(t.total for t in traffic) / per
    block = min(attention.xla_block(products(setup)), setup.max_len)
    spans, block_copies = [], []
    for c in hlo_text.cache_copies(mod, setup.slots, cfg.num_kv_heads, cfg.head_dim, setup.max_len):
        span = next(d for _, d in c.arrays if len(d) == 4 and d[0] == setup.slots)[2]
        if span > 1:
            (block_copies if span == block else spans).append(c)
    blocked = {c.name for c in block_copies}
    describe = lambda cs: [f"{c.opcode} {c.name} -> {c.shape.split('{')[0]}" for c in cs]
    weights = weight_sizes(cfg)
    report = Report(
        name=name, conditionals=len(hlo_text.conditionals(mod)), sorts=hlo_text.sorts(mod, cfg.vocab_size),
        span_copies=describe(spans), block_copies=describe(block_copies),
        weight_copies=describe(hlo_text.weight_copies(mod, weights)),
        dynamic_loops=sum(1 for i in mod.instructions() if i.opcode == "while" and i.trip_count is None),
        xla_bytes=float(cost.get("bytes accessed", float("nan"))), xla_flops=float(cost.get("flops", float("nan"))),
        xla_overcount=xla_overcount(mod), model_bytes=model,
        fused_bytes=model - sum(t.total for t in traffic if t.name in blocked) / per, loop_extra=model - once,
        ideal_bytes=ideal, top=group_traffic(traffic)[:12], compile_s=compile_s)
    return report, mod


def decode_reports(setup: Setup, *, modes=None, lora_ranks=(8, 16), adapters: int = 8, lora_mode: str = "greedy",
                   short_contexts=(256,), dump: str | None = None, log=print) -> list[Report]:
    """Every decode variant at `setup.context`: the base model in each sampling mode, then LoRA banks
    of `adapters` slots per rank (in `lora_mode`); then the base model (greedy) at each of
    `short_contexts` (the same program: only the block count and the ideal change)."""
    weights = tree_bytes(params_lib.param_shapes(setup.config, setup.dtype))
    variants = [(f"decode {m}", setup, m, None) for m in (modes or sampling.MODES)]
    variants += [(f"decode {lora_mode} + LoRA {adapters}x r{r}", setup, lora_mode, abstract_bank(setup, adapters, r))
                 for r in lora_ranks]
    variants += [(f"decode greedy, context {c}", dataclasses.replace(setup, context=c), "greedy", None)
                 for c in short_contexts]
    out = []
    for name, where, mode, bank in variants:
        t0 = time.perf_counter()
        compiled = compile_decode(where, mode, bank)
        dt = time.perf_counter() - t0
        live_kv = where.slots * where.context * kv_bytes_per_token(where)
        bank_bytes = 0.0 if bank is None else tree_bytes(bank) * adapters / (adapters + 1)  # slot 0 never read
        blocks = attention_blocks(where)
        report, _ = analyse(name, compiled, where, weights + live_kv + bank_bytes, where.steps, dt, dump, blocks)
        report.extra = f"{blocks} blocks of {min(attention.xla_block(products(where)), where.max_len)}"
        log(format_row(report))
        out.append(report)
    return out


def prefill_report(setup: Setup, mode: str = "greedy", dump: str | None = None) -> Report:
    engine = abstract_engine(setup)
    t0 = time.perf_counter()
    compiled, t = compile_prefill(setup, engine, mode)
    dt = time.perf_counter() - t0
    weights = tree_bytes(params_lib.param_shapes(setup.config, setup.dtype))
    ideal = weights + setup.prompt * kv_bytes_per_token(setup)  # weights once, the prompt's K/V written once
    report, mod = analyse(f"prefill T={t}", compiled, setup, ideal, 1, dt, dump)
    scores = [i for i in mod.instructions() if any(len(d) >= 2 and d[-2:] == (t, t) for _, d in i.arrays)]
    biggest = max((i.nbytes for i in scores), default=0.0)
    report.extra = f"[T, T] arrays: {len(scores)} (largest {biggest / 2**20:.0f} MiB)"
    return report


# -- the paged engine (engine/paged.py) -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PagedSetup:
    """One `paged_step` shape: R rows, pages of S positions, page tables of M = ceil(L / S) pages."""

    config: config_lib.GemmaConfig
    dtype: jnp.dtype
    max_seqs: int  # R (and T of a decode-only step)
    page_size: int  # S
    max_len: int  # L: a sequence's most positions
    budget: int  # T of a mixed step
    steps: int  # K: decode steps of the multi-step dispatch
    context: int  # tokens already in every decoding row's cache
    label: str = ""  # the shape's name in the report

    @property
    def max_pages(self) -> int:
        return -(-self.max_len // self.page_size)

    @property
    def num_pages(self) -> int:
        return (self.max_seqs + 1) * self.max_pages + 1  # PagedEngine's pool on a CPU

    def page_bytes(self) -> float:
        """One layer's K and V of one page."""
        cfg = self.config
        return 2 * cfg.num_kv_heads * self.page_size * cfg.head_dim * jnp.dtype(self.dtype).itemsize


PAGED_VARIANTS = ("decode", "decode multi", "mixed")


def paged_plan(setup: PagedSetup, variant: str) -> list[list[tuple[int, int]]]:
    """Per decode step of the dispatch, each sequence's (first position, tokens): "decode" and
    "decode multi" (K steps): R rows at `context`; "mixed": R - 1 of them and a fresh prompt's
    first chunk, the rest of the budget."""
    rows = setup.max_seqs
    if variant == "mixed":
        return [[(setup.context, 1)] * (rows - 1) + [(0, setup.budget - rows + 1)]]
    return [[(setup.context + i, 1)] * rows for i in range(setup.steps if variant == "decode multi" else 1)]


def page_columns(setup: PagedSetup, seqs: list[tuple[int, int]], window: int | None) -> tuple[int, int]:
    """(columns the reference's loop runs, pages the sequences read) in one layer of one step
    (`paged_attention.ragged_paged_attention`: columns lo .. hi over every token of the batch)."""
    s = setup.page_size
    first = lambda p: 0 if window is None else max(p - window + 1, 0)
    lo = min(first(a) // s for a, _ in seqs)
    hi = max((a + n - 1) // s + 1 for a, n in seqs)
    return hi - lo, sum((a + n - 1) // s + 1 - first(a) // s for a, n in seqs)


def _layer_window(cfg, layer: int) -> int | None:
    return cfg.sliding_window if cfg.layer_types[layer] == "local" else None


_ATTN_LOOP = re.compile(r'op_name="[^"]*/layer_(\d+)/attention/[^"]*/while"')
_STEP_LOOP = re.compile(r'op_name="jit\(paged_step\)/while"')


def paged_trips(columns: dict[int, int], step_runs: int):
    """`hlo_text.parse`'s trip counts: a layer's attention loop its columns, the decode steps' loop
    `step_runs`; any other loop computed on the device is refused, not guessed."""
    def trips(ins: hlo_text.Instr) -> int:
        m = _ATTN_LOOP.search(ins.attrs)
        if m:
            return columns[int(m.group(1))]
        if _STEP_LOOP.search(ins.attrs):
            return step_runs
        raise ValueError(f"a device-bounded loop neither attention nor the step loop: {ins.name} {ins.attrs[:200]}")
    return trips


def abstract_step_inputs(setup: PagedSetup, t: int):
    """`PagedEngine._padding_inputs`'s StepInputs of T tokens (the engine's shapes), as ShapeDtypeStructs."""
    engine = types.SimpleNamespace(max_seqs=setup.max_seqs, max_pages=setup.max_pages, max_len=setup.max_len)
    inputs = paged_lib.PagedEngine._padding_inputs(engine, t, SamplingParams(temperature=0.0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)


def compile_paged(setup: PagedSetup, t: int, max_steps: int, mode: str = "greedy", quantize: str | None = None,
                  mixed_switch: bool = False):
    """The compiled `paged_step` of T tokens, jitted as `PagedEngine` jits it (the cache donated;
    XLA attention; `paged.step_compiler_options` for its mixed budget), on float weights or on the
    `quantize` method's tree; mixed_switch: `paged_step`'s (a CPU engine's: True; an
    accelerator's: False). Nothing about the context is compiled in: the loops' trip counts are
    on the device."""
    params = params_lib.param_shapes(setup.config, setup.dtype, quantized=quantize or False)
    cache = jax.eval_shape(lambda: model_lib.init_paged_cache(setup.config, setup.num_pages, setup.page_size,
                                                              setup.dtype))
    step = jax.jit(paged_lib.paged_step, static_argnames=("config", "mode", "use_lora", "max_steps", "attn_impl",
                                                         "mixed_switch"),
                   donate_argnums=(2,), compiler_options=paged_lib.step_compiler_options(setup.config, setup.budget))
    return step.lower(params, None, cache, abstract_step_inputs(setup, t), config=setup.config, mode=mode,
                      use_lora=False, max_steps=max_steps, mixed_switch=mixed_switch).compile()


def paged_copies(mod: hlo_text.Module, setup: PagedSetup, t: int) -> tuple[list, list, list]:
    """(span copies, page copies, pool copies): scheduled copies, slices, gathers and fusions that read
    a page pool [P, K, S, H] and output, not as an in-place update, either a [T, K, span, H] slice of
    it with span > 1 (size-1 dims dropped, as XLA drops them): span == S is a page per token copied
    out of the pool (`hlo.py`'s block copies), any other span a span copy; or a whole pool (a copy)."""
    cfg = setup.config
    squeeze = lambda dims: tuple(d for d in dims if d != 1)
    head, tail = squeeze((t, cfg.num_kv_heads)), squeeze((cfg.head_dim,))
    pool = squeeze((setup.num_pages, cfg.num_kv_heads, setup.page_size, cfg.head_dim))
    spans, pages, pools = [], [], []
    for ins in mod.instructions():
        if ins.opcode not in ("copy", "fusion", "slice", "dynamic-slice", "gather", "concatenate", "transpose"):
            continue
        if not any(squeeze(d) == pool for o in ins.operands for _, d in hlo_text.parse_arrays(mod.shape_of(o))):
            continue
        roots = hlo_text.fusion_root_ops(mod, ins) if ins.opcode == "fusion" else [ins] * len(ins.arrays)
        for (_, dims), root in zip(ins.arrays, roots):
            if root.opcode in hlo_text._IN_PLACE or len(dims) > 4:
                continue
            dims = squeeze(dims)
            if dims == pool:
                pools.append(ins)
                break
            if len(dims) == len(head) + len(tail) + 1 and dims[:len(head)] == head and dims[len(head) + 1:] == tail:
                (pages if dims[len(head)] == setup.page_size else spans).append(ins)
                break
    return spans, pages, pools


def paged_report(setup: PagedSetup, variant: str, dump: str | None = None) -> Report:
    """One compiled paged step, read back: per decode step (the dispatch / K), against the ideal of
    every weight byte once + every KV page the batch's sequences read, once (`paged_plan`)."""
    cfg = setup.config
    plan = paged_plan(setup, variant)
    k = len(plan)
    t = setup.budget if variant == "mixed" else setup.max_seqs
    t0 = time.perf_counter()
    compiled = compile_paged(setup, t, k)
    dt = time.perf_counter() - t0
    text = compiled.as_text()
    name = f"{setup.label} {variant} T={t}".strip() + (f" K={k}" if k > 1 else "")
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{cfg.num_layers}L_{name.replace(' ', '_')}.hlo.txt"), "w") as f:
            f.write(text)
    per_layer = [[page_columns(setup, seqs, _layer_window(cfg, i)) for i in range(cfg.num_layers)] for seqs in plan]
    columns = {i: max(step[i][0] for step in per_layer) for i in range(cfg.num_layers)}  # the longest step's
    needed = sum(need for step in per_layer for _, need in step) / k  # pages per step, all layers
    looped = sum(t * cols for step in per_layer for cols, _ in step) / k  # pages the loops gather, all tokens
    weights = tree_bytes(params_lib.param_shapes(cfg, setup.dtype))
    ideal = weights + needed * setup.page_bytes()
    mod = hlo_text.parse(text, unknown_trips=paged_trips(columns, k - 1))
    traffic = hlo_text.traffic(mod)
    model = sum(x.total for x in traffic) / k
    # XLA counts each loop body once: the step before the loop and one step of it (K > 1), each with
    # one column of every attention loop. Its figure per step, plus the other columns as modelled.
    counted = 1 if k == 1 else 2
    once = sum(x.total for x in hlo_text.traffic(hlo_text.parse(text)))
    columned = sum(x.total for x in hlo_text.traffic(hlo_text.parse(text, unknown_trips=paged_trips(columns, 1))))
    spans, pages, pools = paged_copies(mod, setup, t)
    page_names = {c.name for c in pages}
    copied = sum(x.total for x in traffic if x.name in page_names) / k
    cost = _xla_cost(compiled)
    describe = lambda cs: [f"{c.opcode} {c.name} -> {c.shape.split('{')[0]}" for c in cs]
    report = Report(
        name=name, conditionals=len(hlo_text.conditionals(mod)), sorts=hlo_text.sorts(mod, cfg.vocab_size),
        span_copies=describe(spans), block_copies=describe(pages),
        weight_copies=describe(c for c in hlo_text.weight_copies(mod, weight_sizes(cfg))
                               if not any(d[:1] == (t,) for _, d in c.arrays)),  # [T, ...]: activations
        dynamic_loops=sum(1 for i in mod.instructions() if i.opcode == "while" and i.trip_count is None),
        xla_bytes=float(cost.get("bytes accessed", float("nan"))) / counted,
        xla_flops=float(cost.get("flops", float("nan"))) / counted, xla_overcount=xla_overcount(mod) / counted,
        model_bytes=model, fused_bytes=model - copied, loop_extra=(columned - once) / counted, ideal_bytes=ideal,
        top=group_traffic(traffic)[:12], compile_s=dt, pool_copies=describe(pools),
        kv_ideal=needed * setup.page_bytes(), kv_looped=looped * setup.page_bytes(),
        kv_copied=sum(mod.by_name[x.name].nbytes * x.runs for x in traffic if x.name in page_names) / k, steps=k,
        extra=f"columns {'/'.join(map(str, sorted(set(columns.values()))))} x {t} tokens: gathers "
              f"{looped / needed:.1f}x the KV pages read")
    return report


def paged_reports(setups: list[PagedSetup], variants=PAGED_VARIANTS, dump: str | None = None,
                  log=print) -> list[Report]:
    out = []
    for setup in setups:
        for variant in variants:
            out.append(paged_report(setup, variant, dump))
            log(format_paged_row(out[-1]))
    return out


# -- printing -------------------------------------------------------------------------------------
HEADER = (f"{'variant':34} {'cond':>4} {'vsort':>5} {'spans':>5} {'blocks':>6} {'XLA GB':>8} {'XLA/ideal':>9} "
          f"{'adj/ideal':>9} {'model GB':>8} {'model/ideal':>11} {'fused/ideal':>11} {'compile':>7}  notes")


def format_row(r: Report) -> str:
    return (f"{r.name:34} {r.conditionals:4d} {len(r.vocab_sorts):5d} {len(r.span_copies):5d} "
            f"{len(r.block_copies):6d} {r.xla_bytes / 1e9:8.2f} {r.xla_bytes / r.ideal_bytes:9.2f} "
            f"{r.adj_bytes / r.ideal_bytes:9.2f} {r.model_bytes / 1e9:8.2f} {r.model_bytes / r.ideal_bytes:11.2f} "
            f"{r.fused_bytes / r.ideal_bytes:11.2f} {r.compile_s:6.1f}s  {r.extra}")


def verdicts(reports: list[Report]) -> list[str]:
    """One PASS/FAIL line per issue-9 check over the decode variants."""
    decode = [r for r in reports if r.name.startswith("decode")]
    lines = []

    def check(ok: bool, what: str, detail: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {what}{'' if ok else ': ' + detail}")

    bad = [f"{r.name} ({r.conditionals})" for r in decode if r.conditionals]
    check(not bad, "no conditional in any decode variant", ", ".join(bad))
    bad = [f"{r.name}: {'; '.join(map(str, r.vocab_sorts))}" for r in decode if r.vocab_sorts]
    check(not bad, "no sort over the vocabulary in any decode variant", " | ".join(bad))
    bad = [f"{r.name}: {len(r.span_copies)} ({r.span_copies[0]})" for r in decode if r.span_copies]
    check(not bad, "no [B, K, span, H] cache copy in any decode variant", " | ".join(bad))
    bad = [f"{r.name}: {len(r.weight_copies)} ({r.weight_copies[0]})" for r in decode if r.weight_copies]
    check(not bad, "no weight copied or permuted in any decode variant", " | ".join(bad))
    for r in decode:
        adj = r.adj_bytes / r.ideal_bytes
        check(adj <= TARGET_RATIO, f"{r.name}: XLA bytes (adj) within {TARGET_RATIO}x of the ideal",
              f"{adj:.2f}x (raw XLA {r.xla_bytes / r.ideal_bytes:.2f}x, model {r.model_bytes / r.ideal_bytes:.2f}x, "
              f"fused {r.fused_bytes / r.ideal_bytes:.2f}x)")
    return lines


PAGED_HEADER = (f"{'variant':34} {'cond':>4} {'vsort':>5} {'spans':>5} {'pages':>5} {'pool':>4} {'XLA GB':>8} "
                f"{'XLA/ideal':>9} {'adj/ideal':>9} {'model GB':>8} {'model/ideal':>11} {'fused/ideal':>11} "
                f"{'compile':>7}  notes")


def format_paged_row(r: Report) -> str:
    return (f"{r.name:34} {r.conditionals:4d} {len(r.vocab_sorts):5d} {len(r.span_copies):5d} "
            f"{len(r.block_copies):5d} {len(r.pool_copies):4d} {r.xla_bytes / 1e9:8.2f} "
            f"{r.xla_bytes / r.ideal_bytes:9.2f} {r.adj_bytes / r.ideal_bytes:9.2f} {r.model_bytes / 1e9:8.2f} "
            f"{r.model_bytes / r.ideal_bytes:11.2f} {r.fused_bytes / r.ideal_bytes:11.2f} {r.compile_s:6.1f}s  "
            f"{r.extra}")


def paged_verdicts(reports: list[Report]) -> list[str]:
    """The slot decode's checks (`verdicts`) over paged steps, the byte target unchanged."""
    lines = []

    def check(ok: bool, what: str, detail: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {what}{'' if ok else ': ' + detail}")

    counts = {"conditional": lambda r: r.conditionals, "sort over the vocabulary": lambda r: len(r.vocab_sorts),
              "[T, K, span, H] KV copy": lambda r: len(r.span_copies),
              "copy of a whole page pool": lambda r: len(r.pool_copies),
              "weight copied or permuted": lambda r: len(r.weight_copies)}
    for what, count in counts.items():
        bad = [f"{r.name}: {count(r)}" for r in reports if count(r)]
        check(not bad, f"no {what} in any paged step", ", ".join(bad))
    for r in reports:
        adj = r.adj_bytes / r.ideal_bytes
        check(adj <= TARGET_RATIO, f"{r.name}: XLA bytes (adj) within {TARGET_RATIO}x of weights + KV pages read",
              f"{adj:.2f}x (raw XLA {r.xla_bytes / r.ideal_bytes:.2f}x, model {r.model_bytes / r.ideal_bytes:.2f}x, "
              f"fused {r.fused_bytes / r.ideal_bytes:.2f}x; KV pages gathered {r.kv_looped / 1e9:.2f} GB, copied "
              f"{r.kv_copied / 1e9:.2f} GB, read {r.kv_ideal / 1e9:.2f} GB per step)")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="2 layers of the 7B shape (quick; what the test runs)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8, help="decode steps per dispatch (K)")
    p.add_argument("--context", type=int, default=1024, help="tokens in every row's cache (the live KV)")
    p.add_argument("--short-contexts", default="256", help="also lower greedy decode at these contexts")
    p.add_argument("--prompt", type=int, default=1512, help="prefill prompt length")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--ranks", default="8,16", help="LoRA bank ranks to lower ('' for none)")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--dump", default=None, help="write each compiled HLO text into this directory")
    p.add_argument("--engine", default="all", choices=["slot", "paged", "all"],
                   help="the slot engine's decode and prefill, the paged engine's step (270M and 7B shapes), or both")
    p.add_argument("--page-size", type=int, default=16, help="paged: positions per page (S)")
    p.add_argument("--budget", type=int, default=512, help="paged: a mixed step's tokens (the accelerator default)")
    p.add_argument("--seqs-270m", type=int, default=8, help="paged: the 270M's max_seqs (the 7B's is --batch)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_lib.gemma_7b()
    layers = args.layers or (2 if args.small else cfg.num_layers)
    cfg = cfg.replace(num_layers=layers)
    if args.engine in ("slot", "all"):
        slot_main(args, cfg)
    if args.engine in ("paged", "all"):
        paged_main(args, cfg)
    return 0


def paged_main(args, cfg7b) -> None:
    small = config_lib.gemma3_270m()
    dtype = jnp.dtype(args.dtype)
    big = "7B" if cfg7b.num_layers == config_lib.gemma_7b().num_layers else f"7B/{cfg7b.num_layers}L"
    setups = [PagedSetup(small, dtype, args.seqs_270m, args.page_size, small.limits.max_total_tokens, args.budget,
                         args.steps, args.context, "270M"),
              PagedSetup(cfg7b, dtype, args.batch, args.page_size, args.max_len, args.budget, args.steps, args.context,
                         big)]
    print(f"\n# paged engine: `paged_step` (XLA reference attention), greedy, {args.dtype}; jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}. Variants: decode (T = R, 1 step), decode multi (T = R, a while "
          f"loop of K = {args.steps} steps, per step), mixed (T = {args.budget}: R - 1 decode rows + a fresh "
          f"prompt's first chunk). Decode rows at context {args.context}, pages of {args.page_size}.")
    for st in setups:
        c = st.config
        print(f"# {st.label}: {c.num_layers} layers, D {c.embed_dim}, N {c.num_heads}, K {c.num_kv_heads}, "
              f"H {c.head_dim}, V {c.vocab_size}, window {c.sliding_window} ({c.layer_types.count('local')} local layers): R "
              f"{st.max_seqs}, L {st.max_len}, P {st.num_pages}; weights "
              f"{tree_bytes(params_lib.param_shapes(c, dtype)) / 1e9:.2f} GB, a page {st.page_bytes() / 2**10:.0f} "
              f"KiB per layer")
    print(PAGED_HEADER)
    reports = paged_reports(setups, dump=args.dump)
    print("\n# KV per step: the pages the batch's sequences read (ideal); what the attention loops gather, a page"
          " per token per column (tokens x columns); of that, what the compiled program copies out of the pools"
          " before its dots read it (the page copies' outputs, from the HLO):")
    for r in reports:
        print(f"  {r.name:34} ideal {r.kv_ideal / 1e9:7.3f} GB  gathered {r.kv_looped / 1e9:7.3f} GB "
              f"({r.kv_looped / r.kv_ideal:5.1f}x)  copied {r.kv_copied / 1e9:7.3f} GB  page copies "
              f"{len(r.block_copies)}: {r.block_copies[:1]}")
    print("\n# sorts / top-ks, span / pool / weight copies per variant:")
    for r in reports:
        print(f"  {r.name}: sorts {'; '.join(map(str, r.sorts)) or 'none'}; spans {r.span_copies[:2]}; "
              f"pools {r.pool_copies[:2]}; weights {r.weight_copies[:2]}")
    for r in reports:
        k = r.steps
        print(f"\n# where the bytes of {r.name} go (traffic model, GB per step; 'n x': n alike instructions):")
        for n, t in r.top[:6]:
            print(f"  {n * t.total / k / 1e9:8.3f} GB = {n:3d} x {t.total / k / 1e9:7.3f}  runs {t.runs:<4} "
                  f"{t.what[:60]} (e.g. {t.name})")
    print()
    for line in paged_verdicts(reports):
        print(line)


def slot_main(args, cfg) -> None:
    layers = cfg.num_layers
    setup = Setup(cfg, jnp.dtype(args.dtype), args.batch, args.max_len, args.steps, args.context, args.prompt)
    weights = tree_bytes(params_lib.param_shapes(cfg, setup.dtype))
    bf16 = Setup(cfg, jnp.dtype(jnp.bfloat16), *dataclasses.astuple(setup)[2:])
    print(f"# gemma_7b shape, {layers} layers, vocab {cfg.vocab_size}, {args.dtype}; jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}")
    print(f"# decode: batch {args.batch}, max_len {args.max_len}, {args.steps} steps/dispatch, context "
          f"{args.context} tokens per row; ideal per step = weights {weights / 1e9:.2f} GB + live KV "
          f"{args.batch * args.context * kv_bytes_per_token(setup) / 1e9:.2f} GB (in bf16: "
          f"{tree_bytes(params_lib.param_shapes(cfg, jnp.bfloat16)) / 1e9:.2f} + "
          f"{args.batch * args.context * kv_bytes_per_token(bf16) / 1e9:.2f} GB)")
    print(HEADER)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    short = [int(c) for c in args.short_contexts.split(",") if c.strip()]
    reports = decode_reports(setup, lora_ranks=ranks, adapters=args.adapters, short_contexts=short, dump=args.dump)
    if not args.no_prefill:
        reports.append(prefill_report(setup, dump=args.dump))
        print(format_row(reports[-1]))
    first = reports[0]
    print(f"\n# sorts / top-ks per variant (V = {cfg.vocab_size}):")
    for r in reports:
        print(f"  {r.name}: {'; '.join(map(str, r.sorts)) or 'none'}")
    print("\n# span copies ([B, K, span, H] outputs, 1 < span != block, not in-place updates), first 3 per variant:")
    for r in reports:
        print(f"  {r.name}: {len(r.span_copies)} {r.span_copies[:3]}")
    print("\n# weight copies (a weight copied or permuted before its matmul), first 3 per variant:")
    for r in reports:
        print(f"  {r.name}: {len(r.weight_copies)} {r.weight_copies[:3]}")
    print(f"\n# block copies (an attention block copied out before it is read; products: {products(setup)}), "
          "first 2 per variant:")
    for r in reports:
        print(f"  {r.name}: {len(r.block_copies)} {r.block_copies[:2]}")
    print(f"\n# where the bytes of {first.name} go (traffic model, GB per step = dispatch / {args.steps};"
          f" 'n x': n alike instructions, e.g. one per layer; 'runs': executions per dispatch):")
    for n, t in first.top:
        print(f"  {n * t.total / args.steps / 1e9:8.3f} GB = {n:3d} x {t.total / args.steps / 1e9:7.3f}  "
              f"runs {t.runs:<3} {t.what[:60]} (e.g. {t.name})")
    print()
    for line in verdicts(reports):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
