"""The embedded Gemma 3 270M on this CPU: our engine's decode tok/s and time to first token beside llama.cpp's.

    python benchmarks/cpu_vs_llamacpp.py             # batch 1 and 8, 128-token prompts, 128 new, median of 3
    python benchmarks/cpu_vs_llamacpp.py --quick     # a check that it runs (16-token prompts, 8 new, 1 repeat)

Needs llama-cpp-python (an optional benchmark dependency, `pip install -e .[bench-llamacpp]`, which
builds llama.cpp from source): without it the script says so and exits 2.

Weights. Ours (`--formats`): "float32", the embedded checkpoint (`embedded.load_embedded`: the GGUF's
Q4_K_M dequantized to float32), "w8a8-embedding" (that tree with only the embedding quantized,
`quantize.quantize_params(..., method="w8a8-embedding")`), "w8a8" (every weight) and "q8_0" (`serve`'s
CPU default: every weight int8 with a scale per block of 32, multiplied by `cpu_kernel.py`).
llama.cpp (`--llama-files`): "q4_k_m", the GGUF as shipped (`embedded_gguf.gguf_path()`), and "f32", the same file requantized to F32 by llama.cpp's
`llama_model_quantize` (LLAMA_FTYPE_ALL_F32, allow_requantize), written once to
`<gemma-jax cache>/bench/` and reused: the float32 weights ours runs, so the greedy tokens of the two
should agree for a long prefix.

Work. Per batch B (`--batches`), B prompts of `--prompt-len` tokens (BOS + ids drawn with `--seed`
from [3, vocab)), the same on both sides; greedy; every row generates exactly `--new-tokens` (our
stop ids disabled; llama.cpp's EOS ignored: the next token is the argmax, whatever it is).
Ours: the paged engine `build_engine` builds (max_seqs max(B, `--max-seqs`), by default 8 as
`gemma-jax serve` runs it, so a batch of 1 runs as a lone request on a server does; prefix cache
off, so repeats recompute their prompts), every prompt `add`ed then `run`
(`cpu_vs_transformers.Ours`). llama.cpp: a
`llama_cpp.Llama` (n_batch 512, `--threads` for both thread counts) whose context serves batch 1,
and for B > 1 a second context on the same model (n_seq_max B, n_ctx B x (prompt + new)); both
driven through the low-level API: the prompts go into the KV cache in `llama_batch`es of up to
n_batch tokens, row r under sequence id r, with logits for each prompt's last token only; then each
step is one `llama_decode` of a batch of B tokens (one per sequence), each row's next token the
argmax of `llama_get_logits_ith`. The KV cache is cleared before each run, outside the clock.

Timings, per (engine, weights, batch), from the first prompt token submitted to the last token on
the host: decode tok/s = B x (N - 1) / (time for N new tokens - time for 1), so prefill is excluded;
TTFT = time for 1 new token (the batch's prefill and its first token). One untimed warm-up of every
configuration first (our compiles), then `--repeats` rounds, each running every configuration once
in turn (so a load change hits all alike); the median is reported. The greedy tokens of each row
are compared with ours float32's (common prefix length per row).

The table goes to stdout, then the goals: ours (best format) at batch 1 >= 1.0x llama.cpp F32 and
>= 0.8x llama.cpp Q4_K_M; at batch 8 >= 1.5x llama.cpp (best file); TTFT ours <= llama.cpp's.
`--out FILE.json` writes the raw results.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMATS = ("float32", "w8a8-embedding", "w8a8", "q8_0")
LLAMA_FILES = {"q4_k_m": "Q4_K_M", "f32": "F32"}
N_BATCH = 512
GOALS = {"batch1_f32": 1.0, "batch1_q4_k_m": 0.8, "batch8": 1.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS), help="ours: " + ",".join(FORMATS))
    p.add_argument("--llama-files", default=",".join(LLAMA_FILES), help="llama.cpp: q4_k_m,f32")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 8)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--quick", action="store_true", help="small defaults, to check that it runs")
    p.add_argument("--seed", type=int, default=0, help="the prompts' random ids")
    p.add_argument("--steps", type=int, default=None, help="our decode steps per dispatch (default: the engine's)")
    p.add_argument("--max-seqs", type=int, default=8, help="our engine's rows, at least the batch (default 8: serve's)")
    p.add_argument("--decode-buckets", default=None,
                   help="our engine's decode_buckets, comma-separated (default: the engine's: 1 and max_seqs on a CPU)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="llama.cpp n_threads and n_threads_batch (default: the CPUs this process may use)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (default off, as Llama's)")
    p.add_argument("--out", default=None, help="write the raw results to this JSON file")
    args = p.parse_args(argv)
    for name, full, quick in (("prompt_len", 128, 16), ("new_tokens", 128, 8), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.formats = _choices(args.formats, FORMATS, "--formats")
    args.llama_files = _choices(args.llama_files, tuple(LLAMA_FILES), "--llama-files")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.decode_buckets = tuple(int(b) for b in args.decode_buckets.split(",")) if args.decode_buckets else None
    if args.prompt_len < 2 or args.new_tokens < 2:
        p.error("--prompt-len and --new-tokens must be at least 2 (decode tok/s subtracts a 1-token run)")
    return args


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(got) - set(allowed)
    if unknown or not got:
        raise SystemExit(f"{flag}: expected some of {','.join(allowed)}, got {text!r}")
    return got


# -- ours --------------------------------------------------------------------------------------------
def our_sides(formats: list[str], steps: int | None, max_len: int, max_seqs: int | None = None,
              decode_buckets: tuple[int, ...] | None = None) -> dict:
    """format -> a `cpu_vs_transformers.Ours` over those weights (one float32 load shared)."""
    from benchmarks.cpu_vs_transformers import Ours
    from gemma_jax.quantize import quantize_params

    base = Ours(steps, max_len, max_seqs=max_seqs, decode_buckets=decode_buckets)
    sides = {}
    for fmt in formats:
        side = copy.copy(base)
        side.engines = {}
        if fmt != "float32":
            side.params = quantize_params(base.params, base.config, method=fmt)
        sides[fmt] = side
    return sides


# -- llama.cpp ---------------------------------------------------------------------------------------
def f32_gguf(src: Path) -> Path:
    """`src` requantized to F32 by llama.cpp, written once under the gemma-jax cache."""
    import llama_cpp

    from gemma_jax.embedded_gguf import cache_dir

    target = cache_dir() / "bench" / f"{src.stem}-f32.gguf"  # F32 of the Q4_K_M values
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    print(f"llama.cpp: requantizing {src.name} to F32 (once) into {target}", file=sys.stderr, flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class LlamaCpp:
    """One GGUF in llama.cpp: a `Llama` whose context serves batch 1, and per batch B > 1 a context
    of B sequences on the same model; `generate` as ours (module docstring)."""

    def __init__(self, path: Path, max_len: int, threads: int, flash_attn: bool = False):
        import llama_cpp

        self.lib, self.max_len = llama_cpp, max_len
        self.llm = llama_cpp.Llama(str(path), n_ctx=max_len, n_batch=N_BATCH, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))
        self.contexts = {1: self.llm.ctx}
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def context(self, batch: int):
        if batch not in self.contexts:
            params = self.lib.llama_context_params.from_buffer_copy(self.llm.context_params)
            params.n_ctx, params.n_seq_max = batch * self.max_len, batch
            params.n_batch = params.n_ubatch = min(N_BATCH, batch * self.max_len)
            ctx = self.lib.llama_init_from_model(self.llm.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp: no context for {batch} sequences")
            self.contexts[batch] = ctx
        return self.contexts[batch]

    def close(self) -> None:
        for batch, ctx in self.contexts.items():
            if batch != 1:
                self.lib.llama_free(ctx)
        self.lib.llama_batch_free(self.batch)
        self.llm.close()

    def _decode(self, ctx, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, logits?) items."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, ctx, i: int) -> int:
        """The greedy token after the last batch's i-th token (one with logits)."""
        return int(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, i), shape=(self.vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        """(seconds from the first prompt token submitted to the last token read, tokens per prompt)."""
        ctx = self.context(len(prompts))
        n_batch = self.lib.llama_n_batch(ctx)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)
        items = [(tok, pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, tok in enumerate(p)]
        out: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        for start in range(0, len(items), n_batch):  # prefill; a chunk's outputs are read before the next
            chunk = items[start:start + n_batch]
            self._decode(ctx, chunk)
            for i, (_, _, row, logits) in enumerate(chunk):
                if logits:
                    out[row].append(self._argmax(ctx, i))
        for step in range(new - 1):  # decode: one token per sequence, one llama_decode
            self._decode(ctx, [(o[-1], len(p) + step, row, True) for row, (p, o) in enumerate(zip(prompts, out))])
            for row, o in enumerate(out):
                o.append(self._argmax(ctx, row))
        return time.perf_counter() - t0, out


# -- the runs ----------------------------------------------------------------------------------------
def common_prefixes(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per row, how many leading tokens a and b share."""
    return [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s))) for r, s in zip(a, b)]


def measure(configs: list[dict], prompts: dict[int, list[list[int]]], new: int, repeats: int) -> None:
    """Warm up every configuration, then `repeats` interleaved rounds; fills each config's
    "decode" (tok/s per round), "ttft" (seconds per round) and "tokens" (the last round's)."""
    for c in configs:
        c["side"].generate(prompts[c["batch"]], new)
        c["side"].generate(prompts[c["batch"]], 1)
        c["decode"], c["ttft"] = [], []
    for _ in range(repeats):
        for c in configs:
            batch = prompts[c["batch"]]
            t_new, c["tokens"] = c["side"].generate(batch, new)
            t_one, _ = c["side"].generate(batch, 1)
            c["decode"].append(len(batch) * (new - 1) / max(t_new - t_one, 1e-9))
            c["ttft"].append(t_one)


def goal_lines(configs: list[dict]) -> list[str]:
    """The goals (module docstring), each as ratio, what it compares and whether it is met."""
    def best(engine, batch, key, weights=None, low=False):
        rows = [c for c in configs if c["engine"] == engine and c["batch"] == batch
                and (weights is None or c["weights"] == weights)]
        pick = min if low else max
        return pick(rows, key=lambda c: c[key]) if rows else None

    def line(name, ours, theirs, key, goal, unit, low=False):
        if ours is None or theirs is None:
            return f"{name}: n/a (not measured)"
        a, b = ours[key], theirs[key]
        ratio = b / a if low else a / b
        met = "met" if ratio >= goal else "NOT met"
        return (f"{name}: {ratio:.2f}x (ours {ours['weights']} {a * (1e3 if low else 1):.1f} vs llama.cpp "
                f"{theirs['weights']} {b * (1e3 if low else 1):.1f} {unit}; goal >= {goal}x: {met})")

    out = [line("decode, batch 1, ours vs llama.cpp F32", best("ours", 1, "decode_median"),
                best("llama.cpp", 1, "decode_median", "F32"), "decode_median", GOALS["batch1_f32"], "tok/s"),
           line("decode, batch 1, ours vs llama.cpp Q4_K_M", best("ours", 1, "decode_median"),
                best("llama.cpp", 1, "decode_median", "Q4_K_M"), "decode_median", GOALS["batch1_q4_k_m"], "tok/s"),
           line("decode, batch 8, ours vs llama.cpp", best("ours", 8, "decode_median"),
                best("llama.cpp", 8, "decode_median"), "decode_median", GOALS["batch8"], "tok/s")]
    for batch in sorted({c["batch"] for c in configs}):
        out.append(line(f"TTFT, batch {batch}, llama.cpp / ours (ours <= llama.cpp)",
                        best("ours", batch, "ttft_median", low=True), best("llama.cpp", batch, "ttft_median", low=True),
                        "ttft_median", 1.0, "ms", low=True))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]  # before our own loading adds to it
    try:
        import llama_cpp
    except ImportError as error:
        print(f"cpu_vs_llamacpp: llama-cpp-python is not installed ({error}); it is an optional benchmark "
              f"dependency: pip install llama-cpp-python", file=sys.stderr)
        sys.exit(2)
    import logging

    import jax

    from gemma_jax.embedded_gguf import gguf_path

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load and quantize logs
    max_len = args.prompt_len + args.new_tokens
    gguf_file = gguf_path()
    t = time.perf_counter()
    ours = our_sides(args.formats, args.steps, max_len, args.max_seqs, args.decode_buckets)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    files = {"q4_k_m": gguf_file, "f32": f32_gguf(gguf_file) if "f32" in args.llama_files else None}
    theirs = {LLAMA_FILES[f]: LlamaCpp(files[f], max_len, args.threads, args.flash_attn) for f in args.llama_files}
    load_theirs = time.perf_counter() - t

    config = next(iter(ours.values())).config
    rng = np.random.default_rng(args.seed)
    prompts = {b: [[config.bos_id] + rng.integers(3, config.vocab_size, args.prompt_len - 1).tolist()
                   for _ in range(b)] for b in args.batches}
    configs = [dict(engine=engine, weights=weights, batch=b, side=side) for b in args.batches
               for engine, sides in (("ours", ours), ("llama.cpp", theirs)) for weights, side in sides.items()]

    print(f"# embedded Gemma 3 270M ({gguf_file.name}), greedy, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, median of {args.repeats}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {load_average:.1f} at start (llama.cpp's threads spin: any other load slows it most)")
    print(f"# jax {jax.__version__}; llama-cpp-python {llama_cpp.__version__} (threads {args.threads}, n_batch "
          f"{N_BATCH}, flash attention {'on' if args.flash_attn else 'off'}); load: ours {load_ours:.1f} s, "
          f"llama.cpp {load_theirs:.1f} s")
    measure(configs, prompts, args.new_tokens, args.repeats)
    for c in configs:
        c["decode_median"], c["ttft_median"] = statistics.median(c["decode"]), statistics.median(c["ttft"])
    reference = {c["batch"]: c["tokens"] for c in configs if c["engine"] == "ours" and c["weights"] == "float32"}
    for c in configs:
        ref = reference.get(c["batch"])
        c["prefix"] = None if ref is None else common_prefixes(ref, c["tokens"])

    print(f"# ours: {next(iter(ours.values())).describe()}; llama.cpp: low-level llama_decode, batch B = B sequences")
    print("\n| engine | weights | batch | decode tok/s | TTFT ms | tokens vs ours float32 (common prefix per row) |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        if c["engine"] == "ours" and c["weights"] == "float32":
            agree = "(reference)"
        elif c["prefix"] is None:
            agree = "n/a"
        else:
            agree = " ".join(map(str, c["prefix"])) + f" of {args.new_tokens}"
        print(f"| {c['engine']} | {c['weights']} | {c['batch']} | {c['decode_median']:.1f} | "
              f"{c['ttft_median'] * 1e3:.0f} | {agree} |")
    print()
    for line in goal_lines(configs):
        print(line)

    if args.out:
        raw = dict(args={k: v for k, v in vars(args).items()}, gguf=gguf_file.name, cpus=os.cpu_count(),
                   processor=platform.processor() or platform.machine(), jax=jax.__version__,
                   llama_cpp=llama_cpp.__version__, load_s=dict(ours=load_ours, llama_cpp=load_theirs),
                   system_info=llama_cpp.llama_print_system_info().decode(), prompts=prompts,
                   results=[{k: v for k, v in c.items() if k != "side"} for c in configs])
        Path(args.out).write_text(json.dumps(raw, indent=1))
        print(f"\n# raw results: {args.out}")
    for side in theirs.values():
        side.close()


if __name__ == "__main__":
    main()
