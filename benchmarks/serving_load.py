"""The serving engine's shape, measured from outside: start, shared prefixes, long prompts (issue 17).

    python benchmarks/serving_load.py                       # embedded Gemma 3 270M, every phase
    python benchmarks/serving_load.py --random-weights tiny_gemma3_short --requests 8 --quick

Each phase runs the real `gemma-jax serve` process on 127.0.0.1 (benchmarks/load.py's `server`) and
prints one line of figures; `--out FILE` also writes them, with every greedy output, as JSON (so a
later engine's outputs can be compared token for token with this one's).

1. cold start of the default serve configuration (`--max-batch 8`, `--lora-slots 8`): a fresh cache
   directory (the embedded model's one-time conversion and its GGUF are linked in, so only JAX's
   compilation cache is empty): seconds from launch to the readiness line, and the engine's
   compiled executables (`/health` scheduler `compiles`).
2. chat: `--requests` chat requests (default 64) with one shared system prompt of about
   `--system-tokens` tokens (1000) and a short user question each, arriving as a Poisson process
   (`--rate` per second), streamed, greedy, `--chat-tokens` tokens each: time to first token of the
   first request and of the later ones (p50 / p90), completion tokens per second over the phase.
3. long prompt: 8 streams decode (`--stream-tokens` tokens each); once each has its first tokens, a
   prompt of about `--long-tokens` tokens (1500) is sent; the gaps between consecutive events of the
   8 streams that overlap [sent, its first token] (p50, p99, max; and p50 before it was sent) say
   whether its prefill stalls them. The server sends one event per dispatch (a few tokens).
4. warm start: the default configuration started again with the cache that phase 1 filled.

`--compare-with FILE` (an earlier run's JSON) counts the chat and stream outputs equal, text for text,
to that run's: e.g. this engine with its prefix cache against the slot engine, which had none; and
`--no-prefix-cache` runs the workload server without one.

Phases 2 and 3 run on a server with `--max-batch 9` (8 streams and the long prompt at once; set by
`--max-batch`), otherwise the default configuration, started on the same cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import MODEL, run_url, server  # noqa: E402

WORDS = ("river", "lantern", "copper", "meadow", "signal", "harbor", "quartz", "ember", "willow", "orbit")


def text_of_tokens(tokenizer, n: int, seed: int) -> str:
    """Deterministic prose of about `n` tokens (counted with the served model's tokenizer)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while True:
        words.append(f"{WORDS[rng.integers(len(WORDS))]} {int(rng.integers(1000))}.")
        if len(tokenizer.encode(" ".join(words), add_bos=False)) >= n:
            return " ".join(words)


def stream(base: str, body: dict, events: list, started: threading.Event | None = None) -> None:
    """POST a streaming run request; append (monotonic time, text) for every data event."""
    with requests.post(run_url(base), json={**body, "stream": True}, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                piece = json.loads(line[6:]).get("response", "")
                if piece:
                    events.append((time.monotonic(), piece))
                    if started is not None:
                        started.set()


def compiles(base: str) -> int:
    return int(requests.get(f"{base}/health", timeout=30).json()["scheduler"]["compiles"])


def fresh_cache(user_cache: Path) -> Path:
    """A new cache directory with the user's converted model and GGUF linked in, no jax-cache."""
    fresh = Path(tempfile.mkdtemp(prefix="gemma-jax-cold-"))
    for entry in user_cache.iterdir():
        if entry.name != "jax-cache":
            (fresh / entry.name).symlink_to(entry.resolve())
    return fresh


def started_server(flags, log_path, cache: Path):
    t = time.monotonic()
    ctx = server(flags, log_path=log_path, ready_timeout=7200, env={"GEMMA_JAX_CACHE": str(cache)})
    base = ctx.__enter__()
    return ctx, base, time.monotonic() - t


def chat_phase(base: str, args, tokenizer) -> dict:
    system = text_of_tokens(tokenizer, args.system_tokens, seed=1)
    rng = np.random.default_rng(2)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, args.requests))
    arrivals -= arrivals[0]
    results: list[dict] = [{} for _ in range(args.requests)]

    def one(i: int, at: float) -> None:
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Question {i}: which word comes after the number {i}?"}],
                "max_tokens": args.chat_tokens, "temperature": 0}
        events: list = []
        sent = time.monotonic()
        stream(base, body, events)
        results[i] = {"sent": sent - at0, "ttft": events[0][0] - sent if events else None,
                      "text": "".join(p for _, p in events), "done": time.monotonic() - at0}

    at0 = time.monotonic()
    threads = []
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, at0 + at - time.monotonic()))
        threads.append(threading.Thread(target=one, args=(i, at)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = max(r["done"] for r in results)
    ttft = [r["ttft"] for r in results]
    later = np.asarray(ttft[1:])
    tokens = sum(len(tokenizer.encode(r["text"], add_bos=False)) for r in results)
    return {"requests": args.requests, "system_tokens": len(tokenizer.encode(system, add_bos=False)),
            "rate_per_s": args.rate, "first_ttft_s": ttft[0], "later_ttft_p50_s": float(np.median(later)),
            "later_ttft_p90_s": float(np.percentile(later, 90)), "wall_s": wall,
            "completion_tokens_per_s": tokens / wall, "outputs": [r["text"] for r in results]}


def long_prompt_phase(base: str, args, tokenizer) -> dict:
    streams = [[] for _ in range(8)]
    firsts = [threading.Event() for _ in range(8)]
    threads = [threading.Thread(target=stream, args=(base, {"prompt": f"Tell a long story number {i}.",
                                                           "max_tokens": args.stream_tokens, "temperature": 0},
                                                     streams[i], firsts[i])) for i in range(8)]
    for t in threads:
        t.start()
    for e in firsts:
        e.wait(600)
    time.sleep(1.0)  # steady decoding before the long prompt
    long_events: list = []
    sent = time.monotonic()
    long_body = {"prompt": text_of_tokens(tokenizer, args.long_tokens, seed=3), "raw": True, "max_tokens": 4,
                 "temperature": 0}
    stream(base, long_body, long_events)
    first = long_events[0][0] if long_events else time.monotonic()
    for t in threads:
        t.join()
    # every gap between two events of a stream that overlaps [long prompt sent, its first token]
    gaps = np.asarray([b - a for s in streams for (a, _), (b, _) in zip(s, s[1:]) if b > sent and a < first])
    before = np.asarray([b - a for s in streams for (a, _), (b, _) in zip(s, s[1:]) if b < sent])
    return {"long_prompt_tokens": len(tokenizer.encode(long_body["prompt"])), "long_ttft_s": first - sent,
            "gaps_while_admitting": len(gaps), "gap_p50_s": float(np.median(gaps)) if len(gaps) else None,
            "gap_p99_s": float(np.percentile(gaps, 99)) if len(gaps) else None,
            "gap_max_s": float(gaps.max()) if len(gaps) else None,
            "gap_p50_before_s": float(np.median(before)) if len(before) else None,
            "outputs": ["".join(p for _, p in s) for s in streams]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-weights", help="serve this named config with random weights instead of the embedded model")
    p.add_argument("--max-batch", type=int, default=9)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.2, help="chat arrivals per second (Poisson)")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--chat-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--stream-tokens", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="skip the warm start (phase 4)")
    p.add_argument("--only-starts", action="store_true", help="phases 1 and 4 only")
    p.add_argument("--out", help="write the figures and outputs as JSON here")
    p.add_argument("--compare-with", help="an earlier run's JSON: count the outputs equal to its outputs")
    p.add_argument("--no-prefix-cache", action="store_true", help="the workload server without the prefix cache")
    p.add_argument("--quantize", default="auto", help="serve's --quantize (default auto, serve's own default; none: float32)")
    p.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "gemma-jax-serving-load.log"))
    args = p.parse_args(argv)

    from gemma_jax.embedded_gguf import cache_dir, gguf_path
    from gemma_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(str(gguf_path()))
    flags = ["--max-queue", "256", "--threads", "128", "--no-stream-padding",
             "--data-dir", tempfile.mkdtemp(prefix="gemma-jax-load-data-"), "--quantize", args.quantize]
    if args.random_weights:
        flags += ["--random-weights", args.random_weights]
    else:
        from gemma_jax.embedded import read_embedded_config

        read_embedded_config()  # the one-time conversion, outside the timed start
    out: dict = {"flags": flags, "date": time.strftime("%Y-%m-%d")}
    cache = fresh_cache(cache_dir())
    try:
        ctx, base, out["cold_start_s"] = started_server(flags, args.server_log, cache)
        out["executables"] = compiles(base)
        ctx.__exit__(None, None, None)
        print(f"cold start: ready in {out['cold_start_s']:.1f} s, {out['executables']} executables", flush=True)
        if not args.quick:
            ctx, base, out["warm_start_s"] = started_server(flags, args.server_log, cache)
            ctx.__exit__(None, None, None)
            print(f"warm start: ready in {out['warm_start_s']:.1f} s", flush=True)
        if args.only_starts:
            return _write(out, args)
        workload = flags + ["--max-batch", str(args.max_batch)] + (["--no-prefix-cache"] if args.no_prefix_cache else [])
        ctx, base, out["workload_start_s"] = started_server(workload, args.server_log, cache)
        try:
            out["workload_executables"] = compiles(base)
            print(f"workload server (--max-batch {args.max_batch}): ready in {out['workload_start_s']:.1f} s, "
                  f"{out['workload_executables']} executables", flush=True)
            out["chat"] = chat_phase(base, args, tokenizer)
            c = out["chat"]
            print(f"chat: {c['requests']} requests, system prompt {c['system_tokens']} tokens, {c['rate_per_s']}/s: "
                  f"TTFT first {c['first_ttft_s']:.2f} s, later p50 {c['later_ttft_p50_s']:.2f} s / p90 "
                  f"{c['later_ttft_p90_s']:.2f} s; {c['completion_tokens_per_s']:.1f} completion tok/s over "
                  f"{c['wall_s']:.1f} s", flush=True)
            out["long_prompt"] = lp = long_prompt_phase(base, args, tokenizer)
            print(f"long prompt: {lp['long_prompt_tokens']} tokens, TTFT {lp['long_ttft_s']:.2f} s; 8 streams' gaps "
                  f"meanwhile p50 {lp['gap_p50_s']} s, p99 {lp['gap_p99_s']} s, max {lp['gap_max_s']} s "
                  f"({lp['gaps_while_admitting']} gaps; p50 before it {lp['gap_p50_before_s']} s)", flush=True)
            out["engine"] = requests.get(f"{base}/health", timeout=30).json()["scheduler"]
        finally:
            ctx.__exit__(None, None, None)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.compare_with:
        out["compared_with"] = compare(out, json.loads(Path(args.compare_with).read_text()))
        print(f"outputs equal to {args.compare_with}: {out['compared_with']}", flush=True)
    return _write(out, args)


def compare(out: dict, earlier: dict) -> dict:
    """How many chat and stream outputs equal the earlier run's, text for text."""
    result = {}
    for phase in ("chat", "long_prompt"):
        mine, theirs = out.get(phase, {}).get("outputs", []), earlier.get(phase, {}).get("outputs", [])
        result[phase] = {"equal": sum(a == b for a, b in zip(mine, theirs)), "of": min(len(mine), len(theirs))}
    return result


def _write(out: dict, args) -> int:
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
