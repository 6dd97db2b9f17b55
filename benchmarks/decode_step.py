"""One decode dispatch at a given context, in each form of the XLA decode loop's products (not a test).

    python benchmarks/decode_step.py --config gemma_7b --layers 2 --batch 32 --context 1024

Random weights, and a decode state whose every slot is live with `--context` positions of random K/V
already in its cache (no prefill: a 7B-shaped prefill of 32 x 1024 tokens takes minutes on a small
CPU). For each form in `--products` (`attention.PRODUCTS`, chosen through the threshold that
`attention.default_products` compares with, `attention.REDUCE_MIN_BLOCK`), `engine.generate_steps`
is jitted as the Engine jits it (the state donated, `engine.decode_compiler_options`), run once to
compile, then `--repeats` dispatches of `--steps` greedy steps each, every form from the same state.
Prints ms per step and tokens/s (median), and whether the forms drew the same tokens (random
weights have near-ties, so a difference in the last digits of a logit may change a token).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gemma_7b", help="a factory in gemma_jax.config")
    p.add_argument("--layers", type=int, default=None, help="override the config's number of layers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1024, help="live positions in every slot's cache")
    p.add_argument("--steps", type=int, default=8, help="decode steps per dispatch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--products", default="dot,reduce", help="comma-separated forms to time")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma_jax import attention
    from gemma_jax import config as config_lib
    from gemma_jax.engine import engine as engine_lib
    from gemma_jax.engine.state import init_decode_state
    from gemma_jax.model import LayerCache
    from gemma_jax.params import count_params, init_params

    config = getattr(config_lib, args.config)()
    config = config.replace(num_layers=args.layers or config.num_layers, eos_id=-1, end_of_turn_id=-1)
    max_len = args.context + args.steps * (args.repeats + 1)
    b = args.batch
    params = init_params(config, jax.random.key(0, impl="unsafe_rbg"), jnp.float32)

    @jax.jit
    def live_state(key):
        """Every slot live at `--context` positions of random K/V, never done."""
        state = init_decode_state(config, b, max_len)
        keys = jax.random.split(key, 2 * config.num_layers)
        shape = (b, config.num_kv_heads, max_len, config.head_dim)
        cache = {f"layer_{i}": LayerCache(jax.random.normal(keys[2 * i], shape), jax.random.normal(keys[2 * i + 1], shape))
                 for i in range(config.num_layers)}
        full = lambda x: jnp.full((b,), x, jnp.int32)
        return state.replace(cache=cache, lengths=full(args.context), tokens=full(config.bos_id + 1),
                             limit=full(1 << 30), active=jnp.ones((b,), bool), done=jnp.zeros((b,), bool))

    device = jax.devices()[0]
    print(f"# {args.config} shape, {config.num_layers} layers ({count_params(config):,} params, float32, random), "
          f"batch {b}, context {args.context}, {args.steps} steps/dispatch; jax {jax.__version__} on "
          f"{device.device_kind} ({device.platform}), python {platform.python_version()}, {os.cpu_count()} CPUs")
    groups = config.num_heads // config.num_kv_heads
    default = engine_lib.decode_products(config, b)
    print(f"# default form at this batch: {default} (engine.decode_products)")
    threshold, tokens = attention.REDUCE_MIN_BLOCK, {}
    try:
        for products in [p.strip() for p in args.products.split(",") if p.strip()]:
            attention.REDUCE_MIN_BLOCK = 0 if products == "reduce" else float("inf")
            if engine_lib.decode_products(config, b) != products:
                print(f"{products}: not available for this config (G = {groups})")
                continue
            options = engine_lib.decode_compiler_options(config, b)
            generate = jax.jit(lambda p, s: engine_lib.generate_steps(p, None, s, config=config, steps=args.steps,
                                                                      use_lora=False, mode="greedy"),
                               donate_argnums=(1,), compiler_options=options)
            state = live_state(jax.random.key(1))
            t0 = time.perf_counter()
            state, drawn = generate(params, state)
            first = np.asarray(drawn)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                state, drawn = generate(params, state)
                jax.block_until_ready(drawn)
                times.append(time.perf_counter() - t)
            tokens[products] = first
            ms = statistics.median(times) / args.steps * 1e3
            print(f"{products:6}: {ms:8.1f} ms/step, {b * 1e3 / ms:7.1f} tok/s (median of {args.repeats}; runs "
                  f"{[round(t / args.steps * 1e3, 1) for t in times]} ms/step; first dispatch (compile, state fill) {compile_s:.1f} s; "
                  f"compiler options {options or 'none'})")
            del state
    finally:
        attention.REDUCE_MIN_BLOCK = threshold
    if len(tokens) == 2:
        a, c = tokens.values()
        print(f"same greedy tokens in the first dispatch: {int((a == c).sum())} of {a.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
