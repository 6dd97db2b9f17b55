"""Issue 9 on the accelerator, one command: the Gemma-7B shape (random bf16 weights) on our engine,
beside `shared/bench/anchor_hf.py` (transformers) in the same call.

    python benchmarks/gpu.py                       # on the GPU machine (H100 / H200)
    python benchmarks/gpu.py --small               # dry run on a CPU: a shrunk shape, every code path

Prints, after the anchor's own JSON lines (run first, in a subprocess, while our process has not
touched the GPU yet, so each side has the memory to itself):
- decode tok/s at batch 1, 8, 32, 64 (`--prompt` 128 in, `--new` 256 out), and at batch 32 with a
  1k context (`--ctx-prompt` 1024 in, 256 out); tokens over all slots, from the first decode
  dispatch to the last tokens on the host, prefill excluded, pipelined as the scheduler does
  (dispatch n + 1 before reading n); every slot draws exactly `--new` tokens (stop ids off);
- TTFT at a 1512-token prompt, batch 1: prefill until the first token is on the host (median);
- 8 adapters mixed in a batch of 32 (random LoRA, `--lora-rank`) vs the base model on the same engine;
- int8 weight-only decode at batch 1 (`gemma_jax.quantize.quantize_params`);
- the 1k-context decode again with an int8 KV cache (`Engine(cache_dtype=jnp.int8)`: int8 keys and
  values, one float32 scale per position and kv head; decoded by the XLA attention loop, since
  neither Pallas kernel reads our scales);
- peak device memory (`memory_stats()`), and each decode figure as a % of its bandwidth roofline:
  bytes per step = every weight byte + every live KV byte (B x mean context x 2 x L x K x H x 2 bytes),
  at the datasheet bandwidth of the device (H100 3.35 TB/s, H200 4.8 TB/s, from `device_kind`).
Figures go to stdout as a table and to $OUT/gpu.json (or --json). Compile times are printed apart.

Time on the device: one compile per (engine, shape) used, no `Engine.warmup()` (it compiles every
bucket); the persistent compilation cache (`--compile-cache`) shares identical programs between the
engines of different batch sizes (a prefill does not depend on the slot count) and across reruns on
a warm machine. `--batches`, `--skip` and `--no-anchor` cut the run down.
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
SECTIONS = ("decode", "ctx", "kv8", "ttft", "lora", "int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU dry run: a shrunk 7B shape, short lengths")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--ctx-prompt", type=int, default=1024, help="prompt of the 1k-context decode row")
    p.add_argument("--ctx-batch", type=int, default=32)
    p.add_argument("--ttft-prompt", type=int, default=1512)
    p.add_argument("--lora-batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="decode steps per dispatch (default: the engine's)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up run (median)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    p.add_argument("--anchor", default=None, help="transformers' anchor script (default: ../shared/bench/"
                   "anchor_hf.py beside the checkout, else shared/bench/anchor_hf.py inside it)")
    p.add_argument("--no-anchor", action="store_true")
    p.add_argument("--anchor-timeout", type=int, default=420)
    p.add_argument("--anchor-skip-eager", action="store_true", help="SKIP_EAGER=1 for the anchor (faster)")
    p.add_argument("--compile-cache", default="/tmp/gemma-jax-gpu-bench-xla-cache",
                   help="JAX persistent compilation cache directory ('' for none)")
    p.add_argument("--json", default=None, help="where to write the figures (default $OUT/gpu.json)")
    args = p.parse_args(argv)
    if args.small:  # every code path on a CPU in a minute or two
        args.batches, args.prompt, args.new, args.ctx_prompt, args.ctx_batch = "1,2", 16, 16, 96, 2
        args.ttft_prompt, args.lora_batch, args.adapters, args.lora_rank, args.steps = 60, 4, 2, 4, 4
        args.max_len, args.repeats, args.dtype = 128, 1, "float32"
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
    ms: float | None = None  # TTFT
    roofline_pct: float | None = None
    note: str = ""

    def __str__(self) -> str:
        figure = f"{self.tok_s:,.1f} tok/s" if self.tok_s is not None else (
            f"{self.ms:.1f} ms" if self.ms is not None else "-")
        pct = "" if self.roofline_pct is None else f", {self.roofline_pct:.0f}% of roofline"
        return f"  {self.what}, batch {self.batch}: {figure}{pct}{'; ' + self.note if self.note else ''}"


class Bench:
    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        from gemma_jax import config as config_lib
        from gemma_jax import params as params_lib

        self.args, self.jax, self.jnp = args, jax, jnp
        if args.compile_cache:
            os.makedirs(args.compile_cache, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        cfg = config_lib.gemma_7b()
        if args.small:
            cfg = cfg.replace(num_layers=2, embed_dim=256, hidden_dim=512, num_heads=4, num_kv_heads=4,
                              head_dim=64, vocab_size=4096)
        # Never stop early: every slot draws exactly --new tokens. Limits: the config's (Workers AI's
        # 1512 in / 2048 total, 2048-token prefill batches), so the prompt buckets are serving's.
        self.config = cfg.replace(eos_id=-1, end_of_turn_id=-1)
        self.dtype = jnp.dtype(args.dtype)
        self.device = jax.devices()[0]
        t = time.perf_counter()
        self.params = random_params(self.config, self.dtype)
        jax.block_until_ready(self.params)
        self.load_s = time.perf_counter() - t
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.params))
        self.n_params = params_lib.count_params(self.config)
        self.kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        kind = self.device.device_kind
        self.bandwidth = next((bw for name, bw in BANDWIDTH.items() if name in kind), None)
        self.compile_s: dict[str, float] = {}
        self.rng = np.random.default_rng(0)

    def engine(self, batch: int, params=None, **kw):
        from gemma_jax.engine.engine import Engine

        gc.collect()  # the previous engine's decode states: freed before this one allocates
        if self.args.steps:
            kw["steps_per_call"] = self.args.steps
        return Engine(self.config, self.params if params is None else params, slots=batch,
                      max_len=self.args.max_len, **kw)

    def prompts(self, batch: int, length: int) -> list[list[int]]:
        vocab, bos = self.config.vocab_size, self.config.bos_id
        return [[bos] + self.rng.integers(10, vocab, length - 1).tolist() for _ in range(batch)]

    def fill(self, engine, prompts, new: int, adapter_ids=None):
        """A decode state with every prompt prefilled into its own slot (first token drawn)."""
        from gemma_jax.sampling import SamplingParams

        greedy = SamplingParams(temperature=0.0)
        state, start, n = engine.init_state(), 0, len(prompts)
        while start < n:
            count = engine.plan_prefill([len(p) for p in prompts[start:]], n - start)
            ids = None if adapter_ids is None else adapter_ids[start:start + count]
            prefix = engine.prefill_prompts(prompts[start:start + count], [greedy] * count, [new] * count, ids)
            state = engine.insert(prefix, state, engine.pad_slots(range(start, start + count), prefix))
            start += count
        return self.jax.block_until_ready(state)

    def decode(self, engine, prompts, new: int, adapter_ids=None) -> tuple[float, int]:
        """(seconds, tokens drawn) for the decode of `new` - 1 tokens per slot after prefill."""
        state = self.fill(engine, prompts, new, adapter_ids)
        inflight, n = None, 0
        t = time.perf_counter()
        for _ in range(-(-(new - 1) // engine.steps)):
            state, tokens = engine.generate(state)
            if inflight is not None:
                n += int((np.asarray(inflight) >= 0).sum())
            inflight = tokens
        n += int((np.asarray(inflight) >= 0).sum())
        elapsed = time.perf_counter() - t
        del state
        return elapsed, n

    def rate(self, label: str, engine, prompts, new: int, adapter_ids=None) -> float:
        """Median decode tok/s over `--repeats` runs after one warm-up run (compiles, timed apart)."""
        t = time.perf_counter()
        self.decode(engine, prompts, new, adapter_ids)
        self.compile_s[label] = time.perf_counter() - t
        rates = []
        for _ in range(self.args.repeats):
            seconds, n = self.decode(engine, prompts, new, adapter_ids)
            rates.append(n / seconds)
        return statistics.median(rates)

    def roofline_pct(self, tok_s: float, batch: int, mean_context: float, extra_bytes: float = 0.0) -> float | None:
        if self.bandwidth is None:
            return None
        step_bytes = self.weight_bytes + extra_bytes + batch * mean_context * self.kv_per_token
        return 100.0 * tok_s / (batch * self.bandwidth / step_bytes)

    # -- sections ---------------------------------------------------------------------------------
    def decode_rows(self, batches) -> list[Row]:
        a, rows = self.args, []
        mean = a.prompt + a.new / 2
        for b in batches:
            if b == a.lora_batch and "lora" not in self.skip:
                continue  # measured on the LoRA engine (same shapes, the bank unused): see lora_rows
            engine = self.engine(b)
            r = self.rate(f"decode b{b}", engine, self.prompts(b, a.prompt), a.new)
            rows.append(Row(f"decode {a.prompt} in / {a.new} out", b, r, roofline_pct=self.roofline_pct(r, b, mean)))
            print(rows[-1], flush=True)
            del engine
        return rows

    def lora_rows(self) -> list[Row]:
        from gemma_jax import lora as lora_lib

        a = self.args
        b = a.lora_batch
        engine = self.engine(b, adapter_slots=a.adapters, adapter_rank=a.lora_rank)
        ids = [engine.load_adapter(f"random{i}", random_adapter(self.config, a.lora_rank, self.dtype, seed=i))
               for i in range(a.adapters)]
        prompts, mean = self.prompts(b, a.prompt), a.prompt + a.new / 2
        base = self.rate(f"decode b{b} (bank engine, base)", engine, prompts, a.new)
        mixed_ids = [ids[i % len(ids)] for i in range(b)]
        mixed = self.rate(f"decode b{b} {a.adapters} adapters", engine, prompts, a.new, mixed_ids)
        bank = lora_lib.bank_nbytes(self.config, a.adapters, a.lora_rank, self.dtype)
        rows = [Row(f"decode {a.prompt} in / {a.new} out", b, base, roofline_pct=self.roofline_pct(base, b, mean),
                    note="on the engine with the bank, no adapter in the batch (LoRA off)"),
                Row(f"{a.adapters} adapters (rank {a.lora_rank}) mixed", b, mixed,
                    roofline_pct=self.roofline_pct(mixed, b, mean, bank),
                    note=f"{100 * mixed / base:.0f}% of base (target >= 90%)")]
        for row in rows:
            print(row, flush=True)
        del engine
        return rows

    def ctx_row(self) -> Row:
        a = self.args
        engine = self.engine(a.ctx_batch)
        r = self.rate(f"decode b{a.ctx_batch} ctx {a.ctx_prompt}", engine, self.prompts(a.ctx_batch, a.ctx_prompt), a.new)
        row = Row(f"decode {a.ctx_prompt} in / {a.new} out (1k context)", a.ctx_batch, r,
                  roofline_pct=self.roofline_pct(r, a.ctx_batch, a.ctx_prompt + a.new / 2))
        print(row, flush=True)
        return row

    def kv8_row(self) -> Row:
        a, cfg, jnp = self.args, self.config, self.jnp
        engine = self.engine(a.ctx_batch, cache_dtype=jnp.int8)
        r = self.rate(f"decode b{a.ctx_batch} ctx {a.ctx_prompt} int8 kv", engine,
                      self.prompts(a.ctx_batch, a.ctx_prompt), a.new)
        kv8_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)  # int8 + f32 scale
        context = a.ctx_prompt + a.new / 2
        saved = a.ctx_batch * context * (self.kv_per_token - kv8_per_token)
        row = Row(f"decode {a.ctx_prompt} in / {a.new} out (1k context), int8 KV cache", a.ctx_batch, r,
                  roofline_pct=self.roofline_pct(r, a.ctx_batch, context, -saved),
                  note=f"attention {engine.attention_impl}")
        print(row, flush=True)
        return row

    def ttft_row(self) -> Row:
        from gemma_jax.sampling import SamplingParams

        a = self.args
        engine = self.engine(1)
        prompt, greedy = self.prompts(1, a.ttft_prompt), SamplingParams(temperature=0.0)

        def once() -> float:
            t = time.perf_counter()
            prefix = engine.prefill_prompts(prompt, [greedy], [a.new])
            np.asarray(prefix.tokens)
            return time.perf_counter() - t

        self.compile_s[f"prefill {a.ttft_prompt}"] = once()
        times = sorted(once() for _ in range(5))
        row = Row(f"TTFT, {a.ttft_prompt}-token prompt (bucket {engine.prompt_bucket(a.ttft_prompt)})", 1,
                  ms=1e3 * statistics.median(times), note=f"min {1e3 * times[0]:.1f} ms")
        print(row, flush=True)
        return row

    def int8_row(self) -> Row:
        a = self.args
        from gemma_jax.quantize import quantize_params

        qparams = quantize_params(self.params, self.config)
        engine = self.engine(1, params=qparams)
        qbytes = sum(x.nbytes for x in self.jax.tree.leaves(qparams))
        r = self.rate("decode b1 int8", engine, self.prompts(1, a.prompt), a.new)
        pct = self.roofline_pct(r, 1, a.prompt + a.new / 2, qbytes - self.weight_bytes)
        row = Row(f"int8 decode {a.prompt} in / {a.new} out", 1, r, roofline_pct=pct,
                  note=f"weights {qbytes / 1e9:.1f} GB")
        print(row, flush=True)
        return row

    @property
    def skip(self) -> set[str]:
        return {s.strip() for s in self.args.skip.split(",") if s.strip()}

    def run(self) -> list[Row]:
        rows: list[Row] = []
        batches = [int(b) for b in self.args.batches.split(",") if b.strip()]
        sections = [("decode", lambda: self.decode_rows(batches)), ("lora", self.lora_rows),
                    ("ctx", lambda: [self.ctx_row()]), ("kv8", lambda: [self.kv8_row()]),
                    ("ttft", lambda: [self.ttft_row()]),
                    ("int8", lambda: [self.int8_row()])]
        for name, fn in sections:
            if name in self.skip:
                continue
            t = time.perf_counter()
            try:
                rows += fn()
            except Exception as e:  # report and go on: one broken section must not hide the others
                rows.append(Row(name, 0, note=f"FAILED: {type(e).__name__}: {str(e)[:300]}"))
                print(rows[-1], flush=True)
            print(f"[{name}] {time.perf_counter() - t:.0f} s", flush=True)
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
    lines = ["| figure | batch | tok/s | TTFT ms | % of roofline | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x, spec: "" if x is None else format(x, spec)
        lines.append(f"| {r.what} | {r.batch or ''} | {fmt(r.tok_s, ',.1f')} | {fmt(r.ms, '.1f')} | "
                     f"{fmt(r.roofline_pct, '.0f')} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    anchor = None if args.no_anchor else run_anchor(args)  # first: the GPU is still all its own
    bench = Bench(args)
    import jax

    print(f"# {'shrunk 7B shape (--small)' if args.small else 'gemma_7b shape'}: {bench.n_params:,} params "
          f"({bench.weight_bytes / 1e9:.2f} GB {args.dtype}, random), KV {bench.kv_per_token / 1024:.0f} KiB/token; "
          f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}; "
          f"bandwidth roofline {'n/a' if bench.bandwidth is None else f'{bench.bandwidth / 1e12:.2f} TB/s'}; "
          f"{args.steps or 'engine default'} steps/dispatch, max_len {args.max_len}; weights made in "
          f"{bench.load_s:.1f} s", flush=True)
    rows = bench.run()
    print(f"\n{format_table(rows)}\n")
    print(f"peak device memory: {bench.peak_memory()}")
    print("warm-up runs (compiles included): " + ", ".join(f"{k} {v:.1f} s" for k, v in bench.compile_s.items()))
    if anchor:
        keys = ("copy_TBps_rw", "eager_b1_tok_s", "eager_b32_tok_s", "static_compiled_b1_tok_s",
                "static_compiled_b32_tok_s", "ttft_1512_b1_ms")
        print("anchor (transformers, same call): " + ", ".join(f"{k} {anchor[k]:.4g}" for k in keys if k in anchor))
    path = args.json or os.path.join(os.environ.get("OUT", "/tmp"), "gpu.json")
    with open(path, "w") as f:
        json.dump({"rows": [dataclasses.asdict(r) for r in rows], "anchor": anchor, "peak_memory": bench.peak_memory(),
                   "compile_s": bench.compile_s, "device": jax.devices()[0].device_kind, "args": vars(args)}, f, indent=1)
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
