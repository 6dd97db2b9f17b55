"""Engine throughput and time to first token, for a config, batch and lengths (not a test).

    python benchmarks/engine.py --config gemma3_270m --random-weights --batch 8 \\
        --prompt-len 128 --new-tokens 128

Measures, after a warm-up that compiles every shape used (compile times are printed apart):
- TTFT: prefill of one `--prompt-len` prompt until its first token is on the host (batch 1), median;
- decode: `--batch` slots generating `--new-tokens` each, `--steps-per-call` steps per dispatch,
  pipelined as the scheduler does (dispatch n+1 before reading n); tokens/s over all slots;
- with `--scheduler`, the same load end to end through `Scheduler` (threads, queues, streams).
Stop tokens are disabled so every slot generates exactly `--new-tokens` (random weights would stop
at random). Weights: random (`--random-weights`, the default), a GGUF file (`--gguf PATH`) or the
embedded Gemma 3 270M (`--embedded`). `--kv-cache int8`: the engine's int8 KV cache
(`Engine(cache_dtype=jnp.int8)`) instead of one in `--dtype`. `--layers N`: the config with N layers
(random weights; e.g. the 7B shape on a CPU that cannot hold 28 of its layers). `--products`: the
XLA decode loop's form of its block products (`attention.PRODUCTS`; by default what
`attention.default_products` picks for this batch), set through `attention.REDUCE_MIN_BLOCK`
("reduce" applies to MHA configs only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gemma3_270m", help="a factory in gemma_jax.config (gemma3_270m, gemma_7b, tiny_gemma3, ...)")
    p.add_argument("--random-weights", action="store_true", help="random weights (default unless --gguf)")
    p.add_argument("--gguf", help="load weights (and config) from this GGUF file instead")
    p.add_argument("--embedded", action="store_true", help="the embedded Gemma 3 270M (embedded.load_embedded)")
    p.add_argument("--kv-cache", choices=["int8"], default=None, help="int8: an int8 KV cache (default: --dtype)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps-per-call", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: the config's total-token limit)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mesh", default=None, help="DATAxMODEL, e.g. 1x8 (default: one device)")
    p.add_argument("--scheduler", action="store_true", help="also measure end to end through the Scheduler")
    p.add_argument("--layers", type=int, default=None, help="override the config's number of layers (random weights)")
    p.add_argument("--products", choices=["auto", "dot", "reduce"], default="auto",
                   help="the XLA decode loop's form of its products (default: attention.default_products)")
    return p.parse_args(argv)


class _PlainIds:
    """What the scheduler's incremental decoder asks sentencepiece: no id is a control or a byte."""

    @staticmethod
    def IsControl(token_id) -> bool:  # noqa: N802 - sentencepiece's names
        return False

    @staticmethod
    def IsByte(token_id) -> bool:  # noqa: N802
        return False


class _IdTokenizer:
    """Decodes ids to their decimal text: enough for the scheduler's streams."""

    sp = _PlainIds()

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from gemma_jax import attention
    from gemma_jax import config as config_lib
    from gemma_jax.engine.api import Request, SamplingParams
    from gemma_jax.engine.engine import Engine, decode_products
    from gemma_jax.model import kv_cache_dtype
    from gemma_jax.params import count_params, init_params
    from gemma_jax.sharding import make_mesh

    dtype = jnp.dtype(args.dtype)
    mesh = None
    if args.mesh:
        data, model = (int(x) for x in args.mesh.lower().split("x"))
        mesh = make_mesh(data, model)
    t0 = time.perf_counter()
    if args.embedded:
        from gemma_jax.embedded import load_embedded

        config, params, _ = load_embedded(dtype=dtype)
        source = "embedded weights"
    elif args.gguf:
        from gemma_jax.weights.gguf import load_gguf

        config, params = load_gguf(args.gguf, dtype=dtype, mesh=mesh, progress=False)
        source = f"GGUF {os.path.basename(args.gguf)}"
    else:
        config = getattr(config_lib, args.config)()
        config = config.replace(num_layers=args.layers or config.num_layers)
        params = init_params(config, jax.random.key(0, impl="unsafe_rbg"), dtype, mesh)
        source = "random weights"
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    config = config.replace(eos_id=-1, end_of_turn_id=-1)  # never stop early
    total = args.prompt_len + args.new_tokens
    max_len = args.max_len or max(config.limits.max_total_tokens, total)
    config = config.replace(limits=config_lib.Limits(
        max_input_tokens=max(args.prompt_len, config.limits.max_input_tokens), max_total_tokens=max_len,
        max_batch_prefill_tokens=max(config.limits.max_batch_prefill_tokens, args.prompt_len)))
    if args.products != "auto":  # the threshold attention.default_products compares with
        attention.REDUCE_MIN_BLOCK = 0 if args.products == "reduce" else float("inf")
    products = decode_products(config, args.batch)
    engine = Engine(config, params, slots=args.batch, max_len=max_len, mesh=mesh,
                    steps_per_call=args.steps_per_call, prefill_batches=(1,),
                    cache_dtype=kv_cache_dtype(args.kv_cache))
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    prompts = [[config.bos_id] + rng.integers(3, config.vocab_size, args.prompt_len - 1).tolist()
               for _ in range(args.batch)]
    steps = -(-(args.new_tokens - 1) // engine.steps)  # dispatches after the prefill's first token

    def fill():
        state = engine.init_state()
        for slot, p in enumerate(prompts):
            prefix = engine.prefill_prompts([p], [greedy], [args.new_tokens])
            state = engine.insert(prefix, state, engine.pad_slots([slot], prefix))
        return state

    def decode(state):
        inflight, n = None, 0
        for _ in range(steps):
            state, tokens = engine.generate(state)
            if inflight is not None:
                n += int((np.asarray(inflight) >= 0).sum())
            inflight = tokens
        n += int((np.asarray(inflight) >= 0).sum())
        return state, n

    def ttft():
        t = time.perf_counter()
        prefix = engine.prefill_prompts([prompts[0]], [greedy], [args.new_tokens])
        np.asarray(prefix.tokens)
        return time.perf_counter() - t

    # Warm-up: compile every shape used.
    t0 = time.perf_counter()
    ttft()
    state, _ = decode(fill())
    jax.block_until_ready(state)
    del state
    compile_s = time.perf_counter() - t0

    ttfts = sorted(ttft() for _ in range(max(args.repeats, 3)))
    rates = []
    for _ in range(args.repeats):
        state = fill()
        jax.block_until_ready(state)
        t = time.perf_counter()
        state, n = decode(state)
        rates.append(n / (time.perf_counter() - t))
        del state
    device = jax.devices()[0]
    name = "gemma3_270m" if args.embedded else "gguf" if args.gguf else args.config
    print(f"# {name} ({source}, {count_params(config):,} params, {args.dtype}) "
          f"on {len(jax.devices())} x {device.device_kind} ({device.platform}); jax {jax.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"load {load_s:.1f} s, warm-up (compiles) {compile_s:.1f} s, compiles {engine.compile_counts()}")
    print(f"batch {args.batch}, prompt {args.prompt_len}, new {args.new_tokens}, steps/dispatch {engine.steps}, "
          f"attention {engine.attention_impl} ({products} products), KV cache {engine.cache_dtype}")
    print(f"TTFT (prompt {args.prompt_len}, batch 1): median {statistics.median(ttfts) * 1e3:.1f} ms "
          f"(min {ttfts[0] * 1e3:.1f})")
    print(f"decode: {statistics.median(rates):.1f} tok/s median over {args.repeats} runs "
          f"({statistics.median(rates) / args.batch:.1f} tok/s per sequence; runs {[round(r, 1) for r in rates]})")

    if args.scheduler:
        from gemma_jax.engine.scheduler import Scheduler

        with Scheduler(engine, _IdTokenizer(), max_queue=4 * args.batch) as scheduler:
            for _ in range(2):  # the first round warms up anything the direct loop did not compile
                t = time.perf_counter()
                handles = [scheduler.submit(Request(tuple(p), max_tokens=args.new_tokens, sampling=greedy))
                           for p in prompts]
                n = sum(h.result().completion_tokens for h in handles)
                wall = time.perf_counter() - t
        print(f"scheduler end to end: {n / wall:.1f} tok/s ({n} tokens in {wall:.2f} s, prefill included)")


if __name__ == "__main__":
    main()
