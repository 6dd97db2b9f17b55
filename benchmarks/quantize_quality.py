"""int8 quality on the real embedded Gemma 3 270M: int8, w8a8, w8a8-embedding and q8_0 weights vs float32
(and bf16 for scale), and an int8 KV cache vs a float32 one.

    python benchmarks/quantize_quality.py                    # 8 prompts for logits, 5 x 205 greedy tokens,
                                                             # then the KV cache over 4 x 256 tokens
    python benchmarks/quantize_quality.py --methods w8a8 --weights-only   # one method, no KV section
    python benchmarks/quantize_quality.py --new-tokens 16 --kv-new-tokens 16   # a quick check that it runs
    python benchmarks/quantize_quality.py --kv-only          # only the KV cache section

The float32 weights are the embedded checkpoint (`embedded.load_embedded`, the GGUF's Q4_K_M
dequantized); int8, w8a8, w8a8-embedding and q8_0 are `quantize.quantize_params` of them (`--methods`;
float32 scales, float32 compute; w8a8 also rounds each product's activation rows to int8; w8a8-embedding
is w8a8 for the tied embedding alone; q8_0 a scale per block of 32 weights, `serve`'s CPU default). bf16 is the
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

int8 KV cache (`model.init_cache(..., jnp.int8)`: int8 K/V, a float32 scale per (kv head, position)),
float32 weights and compute, against the float32 cache. As the engine does, each prompt is prefilled
with float K/V, which are then quantized into the cache (`model.quantize_layer_cache`); every later
token is quantized as decode writes it. Measured over `--kv-new-tokens` decode steps per greedy
prompt: the caches are fed float32's greedy tokens in lockstep (teacher-forced), giving the logit
cosine at every decode position (mean, min) and the top-1 agreement, for the int8 cache and, as a
yardstick, a bfloat16 cache (the float32 prefill cast); then the int8 cache decodes on its own and
we report where its greedy tokens first differ from float32's. Also the cache bytes per token.
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
    "Dear hiring manager, I am writing to apply for",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=205, help="greedy tokens per prompt (5 x 205: 1,025 steps)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 yardstick")
    p.add_argument("--methods", default="int8,w8a8,w8a8-embedding,q8_0", help="quantization methods to measure (quantize.METHODS; "
                   "int8 weight-only decodes ~10x slower than float32 on a CPU)")
    p.add_argument("--kv-new-tokens", type=int, default=256, help="decode steps per prompt for the KV cache section")
    p.add_argument("--kv-only", action="store_true", help="only the int8 KV cache section")
    p.add_argument("--weights-only", action="store_true", help="skip the int8 KV cache section")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from gemma_jax.embedded import load_embedded

    config, params, tokenizer = load_embedded(dtype=jnp.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Gemma 3 270M, {config.num_layers} layers, "
          f"vocab {config.vocab_size}")
    if not args.kv_only:
        weights_quality(args, config, params, tokenizer)
    if not args.weights_only:
        kv_quality(args, config, params, tokenizer)
    return 0


def weights_quality(args, config, params, tokenizer) -> None:
    import jax
    import jax.numpy as jnp

    from gemma_jax import quantize as Q
    from gemma_jax.model import forward, init_cache

    variants = {"float32": params}
    variants |= {m: Q.quantize_params(params, config, method=m) for m in args.methods.split(",") if m}
    if not args.no_bf16:
        variants["bf16"] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    int8_bf16 = Q.quantize_params(params, config, jnp.bfloat16)
    print("\nweight bytes:")
    sizes = {"float32": Q.tree_bytes(params), "bf16": Q.tree_bytes(params) // 2,
             "int8 (f32 scales)": Q.tree_bytes(Q.quantize_params(params, config)),
             "int8 (bf16 scales)": Q.tree_bytes(int8_bf16),
             "w8a8-embedding": Q.tree_bytes(Q.quantize_params(params, config, method="w8a8-embedding")),
             "q8_0 (f32 block scales)": Q.tree_bytes(Q.quantize_params(params, config, method="q8_0"))}
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
        print(f"  {name:14s} cosine vs float32: mean {np.mean(cos):.6f}  min {np.min(cos):.6f}  "
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
    print(f"  float32        {per_token * 1e3:.0f} ms/token")
    for name, p in variants.items():
        if name == "float32":
            continue
        got, per_token = timed(p, prompts)
        forced, _ = timed(p, prompts, ref)
        firsts = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), new) for g, r in zip(got, ref)]
        same = sum(sum(a == b for a, b in zip(g, r)) for g, r in zip(got, ref))
        tf = sum(sum(a == b for a, b in zip(f, r)) for f, r in zip(forced, ref))
        total = len(prompts) * new
        print(f"  {name:14s} first divergence at {firsts} (of {new}); identical before it: "
              f"{sum(firsts)}/{total} = {sum(firsts) / total:.3f}; same token at the same position anywhere: "
              f"{same}/{total}; teacher-forced top-1 agreement {tf}/{total} = {tf / total:.3f} "
              f"({per_token * 1e3:.0f} ms/token)")
    text = tokenizer.decode(ref[0][:40]).replace("\n", " ")
    print(f"\nfloat32's first continuation begins: {text!r}")


def kv_quality(args, config, params, tokenizer) -> None:
    """The int8 KV cache against the float32 cache (see the module docstring)."""
    import functools

    import jax
    import jax.numpy as jnp

    from gemma_jax.model import forward, init_cache, quantize_layer_cache

    new = args.kv_new_tokens
    prompts = [tokenizer.encode(s) for s in GREEDY_PROMPTS]
    pad = max(len(t) for t in prompts)
    max_len = pad + new + 1

    @jax.jit
    def prefill(p, tokens, n):  # float K/V, as the engine's prefill; -> (first token, float cache)
        positions = jnp.where(jnp.arange(pad) < n, jnp.arange(pad), max_len)[None]
        logits, cache = forward(p, tokens, positions, init_cache(config, 1, max_len), config=config,
                                logits_at=jnp.asarray([n - 1]))
        return jnp.argmax(logits[0, -1]).astype(jnp.int32), cache

    quantize = jax.jit(lambda cache: {name: quantize_layer_cache(layer) for name, layer in cache.items()})

    @functools.partial(jax.jit, donate_argnums=(3, 4))
    def lockstep(p, token, pos, cf, others):  # the same token into every cache: argmaxes, logit cosines
        lf, cf = forward(p, token, pos, cf, config=config)
        lf, tops, cosines, new = lf[0, 0], [], [], []
        for cache in others:
            lq, cache = forward(p, token, pos, cache, config=config)
            lq = lq[0, 0]
            tops.append(jnp.argmax(lq))
            cosines.append((lf * lq).sum() / (jnp.linalg.norm(lf) * jnp.linalg.norm(lq)))
            new.append(cache)
        return jnp.argmax(lf), jnp.stack(tops), jnp.stack(cosines), cf, new

    @functools.partial(jax.jit, donate_argnums=(3,))
    def step(p, token, pos, cache):
        logits, cache = forward(p, token, pos, cache, config=config)
        return jnp.argmax(logits[0, 0]), cache

    def start(prompt):
        tokens = np.zeros((1, pad), np.int32)
        tokens[0, :len(prompt)] = prompt
        first, cache = prefill(params, tokens, len(prompt))
        return int(first), cache

    cosines, agree, firsts, t_lock, t_free = [], np.zeros(2, int), [], 0.0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        first, cf = start(prompt)
        others = [quantize(jax.tree.map(jnp.copy, cf)), jax.tree.map(lambda x: x.astype(jnp.bfloat16), cf)]
        ref, token = [first], first
        for i in range(new):  # decode steps: float32's greedy token fed to every cache
            pos = jnp.asarray([[len(prompt) + i]])
            top_f, tops, cos, cf, others = lockstep(params, jnp.asarray([[token]], jnp.int32), pos, cf, others)
            token = int(top_f)
            agree += np.asarray(tops) == token
            cosines.append(np.asarray(cos))
            ref.append(token)
        t_lock += time.perf_counter() - t0
        t0 = time.perf_counter()
        first, cf = start(prompt)
        cache, got, token = quantize(cf), [first], first
        for i in range(new):  # the int8 cache on its own
            top, cache = step(params, jnp.asarray([[token]], jnp.int32), jnp.asarray([[len(prompt) + i]]), cache)
            token = int(top)
            got.append(token)
        t_free += time.perf_counter() - t0
        firsts.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref)))
    total = len(prompts) * new
    per_token = lambda dtype: 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    f_bytes = per_token(jnp.float32)
    q_bytes = per_token(jnp.int8) + 2 * config.num_layers * config.num_kv_heads * 4  # + the float32 scales
    print(f"\nint8 KV cache vs float32 KV cache (float32 weights and compute; {len(prompts)} prompts x {new} "
          f"decode steps, stop ids ignored; {t_lock + t_free:.0f} s on this shared CPU):")
    print(f"  cache bytes per token: float32 {f_bytes}, int8 + scales {q_bytes} ({q_bytes / f_bytes:.3f} of float32, "
          f"{q_bytes / (f_bytes / 2):.3f} of bf16)")
    cosines = np.stack(cosines)
    for j, name in enumerate(("int8", "bf16")):
        print(f"  {name} cache, teacher-forced (float32's tokens fed to every cache): logit cosine mean "
              f"{cosines[:, j].mean():.6f} min {cosines[:, j].min():.6f}; top-1 agreement {agree[j]}/{total} = "
              f"{agree[j] / total:.4f}")
    lengths = [new + 1] * len(prompts)  # the prefill's first token + `new` decode steps
    print(f"  int8 cache, free-running greedy: first divergence at {firsts} (of {lengths}); identical before it: "
          f"{sum(firsts)}/{sum(lengths)} = {sum(firsts) / sum(lengths):.3f}")


if __name__ == "__main__":
    sys.exit(main())
