"""int8 weight-only quality on the real embedded Gemma 3 270M: float32 vs int8 (and bf16 for scale).

    python benchmarks/quantize_quality.py                    # 8 prompts for logits, 4 x 128 greedy tokens
    python benchmarks/quantize_quality.py --new-tokens 16    # a quick check that it runs

The float32 weights are the embedded checkpoint (`embedded.load_embedded`, the GGUF's Q4_K_M
dequantized); int8 is `quantize.quantize_params` of them (float32 scales, float32 compute). bf16 is the
same weights cast to bfloat16, computing in bfloat16: a yardstick for how far int8 moves the model.

Measured, each variant against float32:
- logit cosine similarity at every position of the prompts (full forward, no cache): mean and min;
  top-1 agreement of the next-token argmax at those positions.
- greedy continuations (`--new-tokens` per prompt, BOS + the text: the 270M is a base model; stop
  ids ignored, KV cache, one jitted step per token): the first position where a variant's greedy token differs from float32's, and the
  fraction of positions equal before that first divergence (the tokens after it continue a different
  text, so they are not compared). Also teacher-forced top-1 agreement: the variant reads float32's
  continuation and we count where its argmax equals float32's next token (no divergence cascade).
- the weight bytes of each tree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "The three laws of thermodynamics state that",
    "Translate to German: The weather is nice today.",
    "A haiku about the ocean:\n",
    "In 1969, the Apollo 11 mission",
]
GREEDY_PROMPTS = [
    "The robot had never held a brush before. On the first morning of spring, it",
    "A hash table stores key-value pairs. To look up a key, it",
    "The main causes of the French Revolution were",
    "To make a vegetarian lasagna, start by",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 yardstick")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from gemma_jax import quantize as Q
    from gemma_jax.embedded import load_embedded
    from gemma_jax.model import forward, init_cache

    config, params, tokenizer = load_embedded(dtype=jnp.float32)
    variants = {"float32": params, "int8": Q.quantize_params(params, config)}
    if not args.no_bf16:
        variants["bf16"] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    int8_bf16 = Q.quantize_params(params, config, jnp.bfloat16)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Gemma 3 270M, {config.num_layers} layers, "
          f"vocab {config.vocab_size}")
    print("\nweight bytes:")
    sizes = {"float32": Q.tree_bytes(params), "bf16": Q.tree_bytes(params) // 2,
             "int8 (f32 scales)": Q.tree_bytes(variants["int8"]), "int8 (bf16 scales)": Q.tree_bytes(int8_bf16)}
    for name, n in sizes.items():
        print(f"  {name:20s} {n / 1e6:9.1f} MB  ({n / sizes['float32']:.3f} of float32)")

    # -- logits over the prompts ---------------------------------------------------------------------
    full = jax.jit(lambda p, t: forward(p, t, jnp.arange(t.shape[1])[None], None, config=config)[0][0])
    print(f"\nlogits at every prompt position ({len(LOGIT_PROMPTS)} prompts):")
    ref_logits = [np.asarray(full(params, jnp.asarray([tokenizer.encode(s)], jnp.int32)), np.float64)
                  for s in LOGIT_PROMPTS]
    for name, p in variants.items():
        if name == "float32":
            continue
        cos, agree, n = [], 0, 0
        for s, ref in zip(LOGIT_PROMPTS, ref_logits):
            got = np.asarray(full(p, jnp.asarray([tokenizer.encode(s)], jnp.int32)), np.float64)
            cos += list((got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            n += len(ref)
        print(f"  {name:8s} cosine vs float32: mean {np.mean(cos):.6f}  min {np.min(cos):.6f}  "
              f"({n} positions); next-token top-1 agreement {agree}/{n}")

    # -- greedy continuations ------------------------------------------------------------------------
    new = args.new_tokens
    prompts = [tokenizer.encode(s) for s in GREEDY_PROMPTS]
    pad = max(len(t) for t in prompts)
    max_len = pad + new + 1

    @jax.jit
    def step(p, token, pos, cache):  # one token [1, 1] at position pos [1, 1]
        logits, cache = forward(p, token, pos, cache, config=config)
        return jnp.argmax(logits[0, -1]), cache

    @jax.jit
    def prefill(p, tokens, n, cache):  # tokens [1, pad], the first n real: one compile for every prompt
        positions = jnp.where(jnp.arange(pad) < n, jnp.arange(pad), max_len)[None]  # padding writes nothing
        logits, cache = forward(p, tokens, positions, cache, config=config, logits_at=jnp.asarray([n - 1]))
        return jnp.argmax(logits[0, -1]), cache

    def greedy(p, prompt, forced=None, steps=new):
        """Greedy tokens after `prompt`; with `forced`, feed those tokens instead and return the argmaxes."""
        cache = init_cache(config, 1, max_len, p["embedder"]["input_embedding"].dtype)
        tokens = np.zeros((1, pad), np.int32)
        tokens[0, :len(prompt)] = prompt
        top, cache = prefill(p, tokens, len(prompt), cache)
        out = []
        for i in range(steps):
            out.append(int(top))
            token = out[-1] if forced is None else forced[i]
            if i + 1 < steps:
                top, cache = step(p, jnp.asarray([[token]], jnp.int32), jnp.asarray([[len(prompt) + i]]), cache)
        return out

    def timed(p, prompts, forced=None):
        """Run one untimed prompt first (the compiles), then all; seconds per generated token."""
        greedy(p, prompts[0], steps=2)
        t0 = time.perf_counter()
        out = [greedy(p, t, None if forced is None else f) for t, f in zip(prompts, forced or prompts)]
        return out, (time.perf_counter() - t0) / (len(prompts) * new)

    print(f"\ngreedy continuations ({len(prompts)} prompts x {new} tokens, stop ids ignored; "
          "ms/token on this shared CPU, batch 1, prefill included):")
    ref, per_token = timed(params, prompts)
    print(f"  float32  {per_token * 1e3:.0f} ms/token")
    for name, p in variants.items():
        if name == "float32":
            continue
        got, per_token = timed(p, prompts)
        forced, _ = timed(p, prompts, ref)
        firsts = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), new) for g, r in zip(got, ref)]
        same = sum(sum(a == b for a, b in zip(g, r)) for g, r in zip(got, ref))
        tf = sum(sum(a == b for a, b in zip(f, r)) for f, r in zip(forced, ref))
        total = len(prompts) * new
        print(f"  {name:8s} first divergence at {firsts} (of {new}); identical before it: "
              f"{sum(firsts)}/{total} = {sum(firsts) / total:.3f}; same token at the same position anywhere: "
              f"{same}/{total}; teacher-forced top-1 agreement {tf}/{total} = {tf / total:.3f} "
              f"({per_token * 1e3:.0f} ms/token)")
    text = tokenizer.decode(ref[0][:40]).replace("\n", " ")
    print(f"\nfloat32's first continuation begins: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
