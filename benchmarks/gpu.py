"""Issue 9 on the accelerator, one command: the Gemma-7B shape (random bf16 weights) on the serving
engine (`engine.build.build_engine`: `PagedEngine`), beside `shared/bench/anchor_hf.py` (transformers)
in the same call.

    python benchmarks/gpu.py --batches 1,32 --anchor-skip-eager --deadline 420   # GPU (H100 / H200)
    python benchmarks/gpu.py --small          # CPU smoke: a shrunk 7B shape, every section, ~30 s

Every figure goes through what serving runs: `engine.add(prompt, max_tokens)` and `engine.step()`
until the events say the sequence finished (chunked prefill mixed with decode, multi-step decode
dispatches, the prefix cache on unless said). Stop ids are off: every sequence draws exactly its
`max_tokens`. Each timed figure is the median over `--repeats` runs after one warm-up run (which
compiles what it reaches: its time is printed apart); every run uses fresh random prompts, so the
prefix cache never serves a run from an earlier one. Sections (`--skip` takes their names):
- decode: B sequences (`--batches`; an engine with max_seqs B), `--prompt` 128 in, `--new` 256 out.
  tok/s = tokens drawn after every sequence drew its first one / that time (prefill excluded, as
  HF's static figures are not: the end-to-end rate, prefill included, is in the note);
- lora: `--adapters` random LoRA adapters (rank `--lora-rank`) mixed in a batch of `--lora-batch`
  vs the base model on the same engine (its base figure is also the decode row of that batch);
- ctx: decode at a 1k context (`--ctx-prompt` 1024 in, 256 out, batch `--ctx-batch`);
- ttft: time from `add` to the first token's event, a `--ttft-prompt` 1512-token prompt on an idle
  serving-shape engine (max_seqs `--max-seqs`, the default token budget: chunked prefill);
- prefix: a `--prefix-system` ~1000-token shared system prompt + distinct `--prefix-tail`-token
  tails, one request at a time: the first vs the later ones, TTFT and prompt tokens computed
  (`stats()` tokens_fed, prefix_hits), with the prefix cache on and off (target: later <= 25%);
- int8: int8 weight-only decode at batch 1 (`quantize.quantize_params`);
- kv8: the ctx row with an int8 KV cache (`cache_dtype=jnp.int8`, one f32 scale per position and head);
- chunk: TTFT again with the whole prompt in one dispatch (max_seqs 1, token budget >= the prompt).
Each decode figure is also a % of its bandwidth roofline: bytes per step = every weight byte + every
live KV byte (B x mean context x 2 x L x K x H x itemsize), at the datasheet bandwidth of the device
(H100 3.35 TB/s, H200 4.8 TB/s, from `device_kind`). Peak device memory from `memory_stats()`.
A markdown table at the end; JSON to --json (default $OUT/gpu.json), rewritten after each section.

Time on the device: each engine compiles only what its runs reach (no `warmup()`): one mixed-step
and one decode-only executable per engine (and LoRA on/off on the LoRA engine), beside each
engine's small cache init: 15 step executables with `--batches 1,32`, 4 more for batches 8 and 64
(`compiles` in the JSON: each engine's count after its warm-up); the persistent compilation cache
(`--compile-cache`) serves identical programs again (the prefix-off engine, reruns on a warm
machine). `--deadline S`: no section (or batch) starts after S seconds from the start (the anchor's
time included), so a bounded device call still ends with its table and JSON; sections run in the
order above, most wanted first. The JSON is rewritten after each section: a killed run keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, datasheet HBM bandwidth
SECTIONS = ("decode", "lora", "ctx", "ttft", "prefix", "int8", "kv8", "chunk")  # the order they run in


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", "--smoke", action="store_true",
                   help="CPU smoke run: a shrunk 7B shape (2 layers), short lengths, no anchor")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--ctx-prompt", type=int, default=1024, help="prompt of the 1k-context decode row")
    p.add_argument("--ctx-batch", type=int, default=32)
    p.add_argument("--ttft-prompt", type=int, default=1512)
    p.add_argument("--ttft-runs", type=int, default=5, help="timed TTFT runs (median)")
    p.add_argument("--max-seqs", type=int, default=8, help="the serving-shape engine of ttft / prefix")
    p.add_argument("--prefix-system", type=int, default=1000, help="shared system prompt, tokens")
    p.add_argument("--prefix-tail", type=int, default=24, help="each request's own tail, tokens")
    p.add_argument("--prefix-requests", type=int, default=4, help="requests per system prompt (first + later)")
    p.add_argument("--lora-batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="decode steps per dispatch (default: the engine's)")
    p.add_argument("--budget", type=int, default=None, help="a mixed step's token budget (default: the engine's)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention", default="xla", help="paged attention impl (paged_kernels.IMPLS; serve runs xla)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up run (median)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="start no section or batch after this many seconds from the start (0: none)")
    p.add_argument("--anchor", default=None, help="transformers' anchor script (default: ../shared/bench/"
                   "anchor_hf.py beside the checkout, else shared/bench/anchor_hf.py inside it)")
    p.add_argument("--no-anchor", action="store_true")
    p.add_argument("--anchor-timeout", type=int, default=360)
    p.add_argument("--anchor-skip-eager", action="store_true", help="SKIP_EAGER=1 for the anchor (faster)")
    p.add_argument("--compile-cache", default="/tmp/gemma-jax-gpu-bench-xla-cache",
                   help="JAX persistent compilation cache directory ('' for none)")
    p.add_argument("--json", "--out", dest="json", default=None,
                   help="where to write the figures (default $OUT/gpu.json, else /tmp/gpu.json)")
    args = p.parse_args(argv)
    if args.small:  # every code path on a CPU in a minute or two
        args.batches, args.prompt, args.new, args.ctx_prompt, args.ctx_batch = "1,2", 16, 16, 96, 2
        args.ttft_prompt, args.ttft_runs, args.max_seqs = 60, 2, 4
        args.prefix_system, args.prefix_tail, args.prefix_requests = 100, 8, 3
        args.lora_batch, args.adapters, args.lora_rank, args.steps = 4, 2, 4, 4
        args.repeats, args.dtype = 1, "float32"
        args.no_anchor = args.no_anchor or args.anchor is None  # the anchor is the 7B shape on CUDA
    return args


# -- the anchor -----------------------------------------------------------------------------------
def run_anchor(args) -> dict | None:
    """Run transformers' anchor script in a subprocess, echo its output, return its last JSON line."""
    candidates = [args.anchor] if args.anchor else [os.path.join(ROOT, "..", "shared", "bench", "anchor_hf.py"),
                                                    os.path.join(ROOT, "shared", "bench", "anchor_hf.py")]
    path = next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), os.path.abspath(candidates[0]))
    if not os.path.isfile(path):
        print(f"[anchor] {path} not found: skipped")
        return None
    env = dict(os.environ, **({"SKIP_EAGER": "1"} if args.anchor_skip_eager else {}))
    print(f"[anchor] python {path}{' (SKIP_EAGER=1)' if args.anchor_skip_eager else ''}", flush=True)
    t = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True,
                              timeout=args.anchor_timeout)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        # (captured output comes as bytes here even with text=True)
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rc = f"timeout after {args.anchor_timeout} s"
    tail = out.strip().splitlines()[-40:]
    print("\n".join(f"[anchor] {line}" for line in tail))
    print(f"[anchor] exit {rc}, {time.perf_counter() - t:.0f} s", flush=True)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


# -- our side -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    what: str
    batch: int
    tok_s: float | None = None
    ms: float | None = None  # time to first token
    fed: int | None = None  # prompt tokens the engine computed (stats()["tokens_fed"])
    roofline_pct: float | None = None
    note: str = ""

    def __str__(self) -> str:
        figure = f"{self.tok_s:,.1f} tok/s" if self.tok_s is not None else (
            f"{self.ms:.1f} ms" if self.ms is not None else "-")
        fed = "" if self.fed is None else f", {self.fed} prompt tokens computed"
        pct = "" if self.roofline_pct is None else f", {self.roofline_pct:.0f}% of roofline"
        return f"  {self.what}, batch {self.batch}: {figure}{fed}{pct}{'; ' + self.note if self.note else ''}"


class Bench:
    def __init__(self, args, started: float):
        import jax
        import jax.numpy as jnp

        from gemma_jax import compilation_cache
        from gemma_jax import config as config_lib
        from gemma_jax import params as params_lib
        from gemma_jax.engine.api import SamplingParams

        self.args, self.jax, self.jnp, self.started = args, jax, jnp, started
        if args.compile_cache:
            compilation_cache.enable(args.compile_cache)
        cfg = config_lib.gemma_7b()
        if args.small:
            cfg = cfg.replace(num_layers=2, embed_dim=256, hidden_dim=512, num_heads=4, num_kv_heads=4,
                              head_dim=64, vocab_size=4096,
                              limits=config_lib.Limits(max_input_tokens=240, max_total_tokens=256,
                                                       max_batch_prefill_tokens=256))
        # Never stop early: every sequence draws exactly its max_tokens. Limits: the config's (Workers
        # AI's 1512 in / 2048 total), so the engine's history and page tables are serving's.
        self.config = cfg.replace(eos_id=-1, end_of_turn_id=-1)
        self.greedy = SamplingParams(temperature=0.0)
        self.dtype = jnp.dtype(args.dtype)
        self.device = jax.devices()[0]
        t = time.perf_counter()
        self.params = random_params(self.config, self.dtype)
        jax.block_until_ready(self.params)
        self.load_s = time.perf_counter() - t
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.params))
        self.n_params = params_lib.count_params(self.config)
        self.kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        self.max_pages = -(-cfg.limits.max_total_tokens // args.page_size)
        kind = self.device.device_kind
        self.bandwidth = next((bw for name, bw in BANDWIDTH.items() if name in kind), None)
        self.compile_s: dict[str, float] = {}
        self.compiles: dict[str, int] = {}  # executables an engine had compiled after its warm-up
        self.section_s: dict[str, float] = {}
        self.shape = ""  # the engine's decode steps / budget, from the first engine built
        self.rng = np.random.default_rng(0)
        self._serving = {}

    # -- engines and loads ------------------------------------------------------------------------
    def engine(self, max_seqs: int, length: int | None = None, params=None, **kw):
        """`build_engine` with max_seqs sequences; pages for each to reach `length` tokens (plus a
        dispatch's steps) and one full-length sequence more (None: max_seqs + 1 full-length ones)."""
        from gemma_jax.engine.build import build_engine

        gc.collect()  # the previous engine's pools: freed before this one allocates
        a = self.args
        per = self.max_pages if length is None else -(-(length + (a.steps or 16)) // a.page_size)
        kw = {"adapter_slots": 0, "page_size": a.page_size, "attention_impl": a.attention,
              "num_pages": max_seqs * per + self.max_pages + 2, **kw}
        if a.steps:
            kw["decode_steps"] = a.steps
        if a.budget:
            kw["token_budget"] = a.budget
        engine = build_engine(self.config, self.params if params is None else params, max_seqs=max_seqs, **kw)
        if not self.shape:
            self.shape = (f"{engine.decode_steps} decode steps per dispatch, token budget {engine.budget}, "
                          f"page size {engine.page_size}, attention {engine.attention_impl}")
            print(f"# engine: {self.shape}", flush=True)
        return engine

    def prompt(self, length: int) -> list[int]:
        return [self.config.bos_id] + self.rng.integers(10, self.config.vocab_size, length - 1).tolist()

    def generate(self, engine, batch: int, length: int, new: int, adapters=None) -> dict:
        """`batch` fresh prompts of `length` tokens, `new` tokens each: seconds until every sequence
        drew its first token, seconds after, and the tokens drawn in each part."""
        ids = {engine.add(self.prompt(length), new, self.greedy, adapter=adapters[i] if adapters else 0)
               for i in range(batch)}
        pending, drawn = set(ids), 0
        t0 = time.perf_counter()
        while pending:
            for event in engine.step():
                pending.discard(event.seq)
                drawn += len(event.tokens)
        t1, first = time.perf_counter(), drawn
        while engine.busy():
            drawn += sum(len(event.tokens) for event in engine.step())
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": drawn - first, "tokens": drawn}

    def rate(self, label: str, engine, batch: int, length: int, new: int, adapters=None) -> tuple[float, str]:
        """(median decode tok/s, a note with the end-to-end rate) over `--repeats` runs after a warm-up."""
        t = time.perf_counter()
        self.generate(engine, batch, length, new, adapters)
        self.compile_s[label] = time.perf_counter() - t
        self.compiles[label] = sum(engine.compile_counts().values())
        runs = [self.generate(engine, batch, length, new, adapters) for _ in range(self.args.repeats)]
        tok_s = statistics.median(r["decode_tokens"] / r["decode_s"] for r in runs)
        e2e = statistics.median(r["tokens"] / (r["prefill_s"] + r["decode_s"]) for r in runs)
        note = f"end to end {e2e:,.1f} tok/s (prefill incl.)"
        if any(r["tokens"] != batch * new for r in runs):
            note += f"; drew {[r['tokens'] for r in runs]} tokens, not {batch * new}"
        if engine.stats()["preemptions"]:
            note += f"; {engine.stats()['preemptions']} preemptions"
        return tok_s, note

    def first_token(self, engine, prompt: list[int]) -> dict:
        """Seconds from `add` to the first token's event on an idle engine; prompt tokens computed,
        prefix-cache hits (pages) and dispatches it took."""
        before = engine.stats()
        t = time.perf_counter()
        seq = engine.add(prompt, 1, self.greedy)
        while not any(event.seq == seq for event in engine.step()):
            pass
        seconds = time.perf_counter() - t
        while engine.busy():
            engine.step()
        after = engine.stats()
        return {"s": seconds, **{k: after[k] - before[k] for k in ("tokens_fed", "prefix_hits", "steps")}}

    def serving_engine(self, prefix_caching: bool = True):
        """The serving shape (max_seqs `--max-seqs`, the default budget), kept for ttft and prefix."""
        if prefix_caching not in self._serving:
            self._serving[prefix_caching] = self.engine(self.args.max_seqs, prefix_caching=prefix_caching)
        return self._serving[prefix_caching]

    def roofline_pct(self, tok_s: float, batch: int, mean_context: float, extra_bytes: float = 0.0) -> float | None:
        if self.bandwidth is None:
            return None
        step_bytes = self.weight_bytes + extra_bytes + batch * mean_context * self.kv_per_token
        return 100.0 * tok_s / (batch * self.bandwidth / step_bytes)

    def late(self) -> bool:
        return bool(self.args.deadline) and time.perf_counter() - self.started > self.args.deadline

    # -- sections ---------------------------------------------------------------------------------
    def decode_rows(self) -> list[Row]:
        a, rows = self.args, []
        mean = a.prompt + a.new / 2
        for b in (int(x) for x in a.batches.split(",") if x.strip()):
            if b == a.lora_batch and "lora" not in self.skip:
                continue  # measured on the LoRA engine (same shapes, the bank unused): see lora_rows
            if self.late():
                rows.append(Row(f"decode {a.prompt} in / {a.new} out", b, note="skipped: past --deadline"))
                print(rows[-1], flush=True)
                continue
            engine = self.engine(b, a.prompt + a.new)
            r, note = self.rate(f"decode b{b}", engine, b, a.prompt, a.new)
            rows.append(Row(f"decode {a.prompt} in / {a.new} out", b, r, roofline_pct=self.roofline_pct(r, b, mean),
                            note=note))
            print(rows[-1], flush=True)
            del engine
        return rows

    def lora_rows(self) -> list[Row]:
        from gemma_jax import lora as lora_lib

        a = self.args
        b = a.lora_batch
        engine = self.engine(b, a.prompt + a.new, adapter_slots=a.adapters)
        ids = [engine.load_adapter(f"random{i}", random_adapter(self.config, a.lora_rank, self.dtype, seed=i))
               for i in range(a.adapters)]
        mean = a.prompt + a.new / 2
        base, base_note = self.rate(f"decode b{b} (bank engine, base)", engine, b, a.prompt, a.new)
        mixed_ids = [ids[i % len(ids)] for i in range(b)]
        mixed, mixed_note = self.rate(f"decode b{b} {a.adapters} adapters", engine, b, a.prompt, a.new, mixed_ids)
        used = lora_lib.bank_nbytes(self.config, a.adapters, a.lora_rank, self.dtype)  # the adapters a step reads
        rows = [Row(f"decode {a.prompt} in / {a.new} out", b, base, roofline_pct=self.roofline_pct(base, b, mean),
                    note=f"on the engine with the bank, no adapter in the batch (LoRA off); {base_note}"),
                Row(f"{a.adapters} adapters (rank {a.lora_rank}) mixed", b, mixed,
                    roofline_pct=self.roofline_pct(mixed, b, mean, used),
                    note=f"{100 * mixed / base:.0f}% of base (target >= 90%); {mixed_note}")]
        for row in rows:
            print(row, flush=True)
        return rows

    def ctx_rows(self, **kw) -> list[Row]:
        a, cfg = self.args, self.config
        int8 = "cache_dtype" in kw
        engine = self.engine(a.ctx_batch, a.ctx_prompt + a.new, **kw)
        label = f"decode b{a.ctx_batch} ctx {a.ctx_prompt}" + (" int8 kv" if int8 else "")
        r, note = self.rate(label, engine, a.ctx_batch, a.ctx_prompt, a.new)
        context = a.ctx_prompt + a.new / 2
        saved = 0.0
        if int8:
            kv8_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)  # int8 + f32 scale
            saved = a.ctx_batch * context * (self.kv_per_token - kv8_per_token)
        row = Row(f"decode {a.ctx_prompt} in / {a.new} out (1k context)" + (", int8 KV cache" if int8 else ""),
                  a.ctx_batch, r, roofline_pct=self.roofline_pct(r, a.ctx_batch, context, -saved), note=note)
        print(row, flush=True)
        return [row]

    def ttft_rows(self) -> list[Row]:
        a = self.args
        engine = self.serving_engine()
        row = self._ttft(engine, f"TTFT, {a.ttft_prompt}-token prompt, idle engine (max_seqs {a.max_seqs}, "
                                 f"budget {engine.budget})")
        return [row]

    def chunk_rows(self) -> list[Row]:
        a = self.args
        budget = -(-a.ttft_prompt // a.page_size) * a.page_size
        engine = self.engine(1, a.ttft_prompt + 1, token_budget=max(budget, a.budget or 0))
        return [self._ttft(engine, f"TTFT, {a.ttft_prompt}-token prompt in one dispatch (budget {engine.budget})")]

    def _ttft(self, engine, what: str) -> Row:
        a = self.args
        label = f"TTFT {a.ttft_prompt} max_seqs {engine.max_seqs} budget {engine.budget}"
        t = time.perf_counter()
        self.first_token(engine, self.prompt(a.ttft_prompt))
        self.compile_s[label] = time.perf_counter() - t
        self.compiles[label] = sum(engine.compile_counts().values())
        runs = [self.first_token(engine, self.prompt(a.ttft_prompt)) for _ in range(a.ttft_runs)]
        times = sorted(r["s"] for r in runs)
        row = Row(what, 1, ms=1e3 * statistics.median(times), fed=runs[0]["tokens_fed"],
                  note=f"min {1e3 * times[0]:.1f} ms, {runs[0]['steps']} dispatches")
        print(row, flush=True)
        return row

    def prefix_rows(self) -> list[Row]:
        """First request vs later ones sharing a system prompt, one at a time, cache on and off."""
        a, rows = self.args, []
        length = a.prefix_system + a.prefix_tail
        for caching in (True, False):
            engine = self.serving_engine(caching)
            t = time.perf_counter()
            self.first_token(engine, self.prompt(length))
            self.compile_s[f"prefix {'on' if caching else 'off'} warm-up"] = time.perf_counter() - t
            self.compiles[f"prefix {'on' if caching else 'off'}"] = sum(engine.compile_counts().values())
            first, later = [], []
            for _ in range(max(a.repeats, 1)):
                system = self.prompt(a.prefix_system)  # fresh: no earlier run's pages match it
                for j in range(a.prefix_requests):
                    tail = self.rng.integers(10, self.config.vocab_size, a.prefix_tail).tolist()
                    (later if j else first).append(self.first_token(engine, system + tail))
            on = "on" if caching else "off"
            ms = lambda runs: 1e3 * statistics.median(r["s"] for r in runs)
            fed = lambda runs: int(statistics.median(r["tokens_fed"] for r in runs))
            hits = lambda runs: int(statistics.median(r["prefix_hits"] for r in runs))
            rows.append(Row(f"prefix cache {on}: first request ({a.prefix_system} shared + {a.prefix_tail} own tokens)",
                            1, ms=ms(first), fed=fed(first),
                            note=f"{hits(first)} pages hit, {first[0]['steps']} dispatches"))
            rows.append(Row(f"prefix cache {on}: later requests (same system prompt, new tail)", 1, ms=ms(later),
                            fed=fed(later), note=f"{100 * ms(later) / ms(first):.0f}% of the first's TTFT "
                            f"(target <= 25%), {hits(later)} pages hit, {later[0]['steps']} dispatches"))
            for row in rows[-2:]:
                print(row, flush=True)
            self._serving.pop(caching, None)
            del engine
        return rows

    def int8_rows(self) -> list[Row]:
        a = self.args
        from gemma_jax.quantize import quantize_params

        qparams = quantize_params(self.params, self.config)
        qbytes = sum(x.nbytes for x in self.jax.tree.leaves(qparams))
        engine = self.engine(1, a.prompt + a.new, params=qparams)
        r, note = self.rate("decode b1 int8", engine, 1, a.prompt, a.new)
        pct = self.roofline_pct(r, 1, a.prompt + a.new / 2, qbytes - self.weight_bytes)
        row = Row(f"int8 decode {a.prompt} in / {a.new} out", 1, r, roofline_pct=pct,
                  note=f"weights {qbytes / 1e9:.2f} GB; {note}")
        print(row, flush=True)
        return [row]

    @property
    def skip(self) -> set[str]:
        return {s.strip() for s in self.args.skip.split(",") if s.strip()}

    def run(self, rows: list[Row], save) -> list[Row]:
        sections = {"decode": self.decode_rows, "lora": self.lora_rows, "ctx": self.ctx_rows,
                    "ttft": self.ttft_rows, "prefix": self.prefix_rows,
                    "kv8": lambda: self.ctx_rows(cache_dtype=self.jnp.int8), "int8": self.int8_rows,
                    "chunk": self.chunk_rows}
        for name in SECTIONS:
            if name in self.skip:
                continue
            if self.late():
                rows.append(Row(name, 0, note=f"skipped: past --deadline {self.args.deadline:.0f} s"))
                print(rows[-1], flush=True)
                continue
            t = time.perf_counter()
            try:
                rows += sections[name]()
            except Exception as e:  # report and go on: one broken section must not hide the others
                rows.append(Row(name, 0, note=f"FAILED: {type(e).__name__}: {str(e)[:300]}"))
                print(rows[-1], flush=True)
            self.section_s[name] = time.perf_counter() - t
            print(f"[{name}] {self.section_s[name]:.0f} s (at {time.perf_counter() - self.started:.0f} s)",
                  flush=True)
            if name == "prefix" or (name == "ttft" and "prefix" in self.skip):
                self._serving.clear()  # the serving-shape engines' pools
            save()
        self._serving.clear()
        return rows

    def peak_memory(self) -> str:
        stats = self.device.memory_stats() or {}
        if "peak_bytes_in_use" not in stats:
            return "n/a (no memory_stats on this device)"
        limit = stats.get("bytes_limit")
        return f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB" + (f" of {limit / 2**30:.1f} GiB" if limit else "")


def random_params(config, dtype):
    """Random weights in `dtype` (std 0.02), created on the device in one jit: a speed benchmark only."""
    import jax
    import jax.numpy as jnp

    from gemma_jax import params as params_lib
    from gemma_jax.sharding import make_mesh

    shapes = params_lib.param_shapes(config, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])

    def fill(key):
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
                                  if len(s.shape) < 2 else 0.02 * jax.random.normal(k, s.shape, s.dtype)
                                  for k, s in zip(keys, leaves)])

    return jax.jit(fill, out_shardings=params_lib.param_shardings(config, mesh))(jax.random.key(0, impl="unsafe_rbg"))


def random_adapter(config, rank: int, dtype, seed: int):
    """A random PEFT-layout LoRA adapter on all seven projections of every layer (torch shapes)."""
    from gemma_jax import lora as lora_lib

    d, f = config.embed_dim, config.hidden_dim
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    sizes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
             "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # (in, out)
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(config.num_layers):
        for target, (n_in, n_out) in sizes.items():
            a = rng.standard_normal((rank, n_in), np.float32) * 0.01
            b = rng.standard_normal((n_out, rank), np.float32) * 0.01
            weights[(layer, target)] = (a, b, 2.0)
    return lora_lib.adapter_from_torch(config, weights, dtype)


def format_table(rows: list[Row]) -> str:
    lines = ["| figure | batch | tok/s | TTFT ms | prompt tokens computed | % of roofline | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x, spec: "" if x is None else format(x, spec)
        lines.append(f"| {r.what} | {r.batch or ''} | {fmt(r.tok_s, ',.1f')} | {fmt(r.ms, '.1f')} | "
                     f"{fmt(r.fed, 'd')} | {fmt(r.roofline_pct, '.0f')} | {r.note} |")
    return "\n".join(lines)


ANCHOR_KEYS = ("copy_TBps_rw", "eager_b1_tok_s", "eager_b32_tok_s", "static_compiled_b1_tok_s",
               "static_compiled_b32_tok_s", "ttft_1512_b1_ms")


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    anchor = None if args.no_anchor else run_anchor(args)  # first: the GPU is still all its own
    bench = Bench(args, started)
    import jax

    print(f"# {'shrunk 7B shape (--small)' if args.small else 'gemma_7b shape'}: {bench.n_params:,} params "
          f"({bench.weight_bytes / 1e9:.2f} GB {args.dtype}, random), KV {bench.kv_per_token / 1024:.0f} KiB/token; "
          f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}; "
          f"bandwidth roofline {'n/a' if bench.bandwidth is None else f'{bench.bandwidth / 1e12:.2f} TB/s'}; "
          f"limits {bench.config.limits.max_input_tokens} in / {bench.config.limits.max_total_tokens} total; "
          f"weights made in {bench.load_s:.1f} s", flush=True)
    path = args.json or os.path.join(os.environ.get("OUT", "/tmp"), "gpu.json")
    rows: list[Row] = []

    def save() -> None:
        with open(path, "w") as f:
            json.dump({"rows": [dataclasses.asdict(r) for r in rows], "anchor": anchor,
                       "peak_memory": bench.peak_memory(), "engine": bench.shape, "compile_s": bench.compile_s,
                       "compiles": bench.compiles, "section_s": bench.section_s, "device": jax.devices()[0].device_kind,
                       "jax": jax.__version__, "elapsed_s": time.perf_counter() - started, "args": vars(args)},
                      f, indent=1)

    bench.run(rows, save)
    print(f"\n{format_table(rows)}\n")
    print(f"engine: {bench.shape}")
    print(f"peak device memory: {bench.peak_memory()}")
    print("warm-up runs (compiles included): " + ", ".join(f"{k} {v:.1f} s" for k, v in bench.compile_s.items()))
    if anchor:
        print("anchor (transformers, same call): " + ", ".join(
            f"{k} {anchor[k]:.4g}" for k in ANCHOR_KEYS if k in anchor))
    save()
    print(f"figures written to {path}; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
