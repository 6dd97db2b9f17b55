"""Proof without a GPU (issue 9, item 8): the compiled decode and prefill of the 7B shape, read back.

    python benchmarks/hlo.py                  # gemma_7b, batch 32, context 1024 (~2 min on 2 CPU cores)
    python benchmarks/hlo.py --small          # 2 layers of the same shape (what tests/test_hlo.py checks)
    python benchmarks/hlo.py --dump DIR       # also write every compiled HLO text into DIR

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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hlo_text  # noqa: E402
from gemma_jax import attention  # noqa: E402
from gemma_jax import config as config_lib  # noqa: E402
from gemma_jax import lora as lora_lib  # noqa: E402
from gemma_jax import params as params_lib  # noqa: E402
from gemma_jax import sampling  # noqa: E402
from gemma_jax.engine import engine as engine_lib  # noqa: E402
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_lib.gemma_7b()
    layers = args.layers or (2 if args.small else cfg.num_layers)
    cfg = cfg.replace(num_layers=layers)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
