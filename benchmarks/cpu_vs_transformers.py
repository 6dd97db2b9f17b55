"""The embedded Gemma 3 270M on this CPU: our engine's decode tok/s beside transformers', same run.

    python benchmarks/cpu_vs_transformers.py                    # batch 1 and 8, 128-token prompts, 128 new
    python benchmarks/cpu_vs_transformers.py --new-tokens 16    # a quick check that it runs

Both sides load the same file, the embedded GGUF (`embedded_gguf.gguf_path()`, Q4_K_M dequantized
to float32): ours through `embedded.load_embedded` (its converted checkpoint), transformers through
`Gemma3ForCausalLM.from_pretrained(dir, gguf_file=...)`. Both float32, greedy, the same prompts
(BOS + random ids), every row generating exactly `--new-tokens` (our stop ids are disabled,
transformers gets `min_new_tokens`).

Decode tok/s excludes prefill on both sides, measured the same way: the time to generate N new
tokens minus the time to generate 1 (the prefill and its first token), for B x (N - 1) tokens.
Ours (`--engine paged`, the default): the serving engine `build_engine` builds, every prompt
`add`ed, then `step` until all are done, as the scheduler does (`--steps` decode steps per
dispatch, default the engine's; the prefix cache off, so repeats recompute their prompts);
`--engine slot`: the slot engine's `prefill_prompts` + `insert`, then `generate` dispatches
pipelined; transformers: `model.generate` under `torch.inference_mode`
(`--hf-cache dynamic`, its default, and/or `static`). One untimed warm-up run of each shape first
(our compiles), then the median of `--repeats`. The greedy tokens of both are compared too (float32
on both sides, so they should agree for a long prefix).
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
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=None,
                   help="our decode steps per dispatch (default: the engine's, 1 on a CPU; slot engine 8)")
    p.add_argument("--engine", choices=("paged", "slot"), default="paged", help="our engine (default: what serve runs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-cache", default="dynamic", help="transformers cache implementation(s): dynamic,static")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    return p.parse_args(argv)


# -- ours --------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, steps: int | None, max_len: int, kind: str = "paged", max_seqs: int | None = None,
                 decode_buckets: tuple[int, ...] | None = None):
        """max_seqs: the paged engine's rows (None: each batch's size); decode_buckets: its option."""
        import jax.numpy as jnp

        from gemma_jax.embedded import load_embedded

        config, self.params, _ = load_embedded(dtype=jnp.float32)
        self.config = config.replace(eos_id=-1, end_of_turn_id=-1)  # never stop early
        self.steps, self.max_len, self.kind, self.engines = steps, max_len, kind, {}
        self.max_seqs, self.decode_buckets = max_seqs, decode_buckets

    def engine(self, batch: int):
        if batch not in self.engines:
            if self.kind == "paged":
                from gemma_jax.engine.build import build_engine

                self.engines[batch] = build_engine(self.config, self.params, max_seqs=max(batch, self.max_seqs or 0),
                                                   adapter_slots=0, decode_steps=self.steps, prefix_caching=False,
                                                   decode_buckets=self.decode_buckets)
            else:
                from gemma_jax.engine.engine import Engine

                self.engines[batch] = Engine(self.config, self.params, slots=batch, max_len=self.max_len,
                                             steps_per_call=self.steps or 8)
        return self.engines[batch]

    def describe(self) -> str:
        if self.kind == "slot":
            return f"slot engine, {self.steps or 8} steps/dispatch"
        e = next(iter(self.engines.values()), None)
        return "paged engine" + (f", {e.decode_steps} decode steps/dispatch, token budget {e.budget}, max_seqs "
                                 f"{e.max_seqs}, decode buckets {','.join(map(str, e.decode_buckets))}" if e else "")

    def generate(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        if self.kind == "paged":
            return self._generate_paged(prompts, new)
        return self._generate_slot(prompts, new)

    def _generate_paged(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        """(seconds from the first add to the last token on the host, tokens per prompt)."""
        from gemma_jax.sampling import SamplingParams

        engine = self.engine(len(prompts))
        greedy = SamplingParams(temperature=0.0)
        t0 = time.perf_counter()
        ids = [engine.add(p, new, greedy) for p in prompts]
        got = engine.run()
        elapsed = time.perf_counter() - t0
        return elapsed, [got[i][:new] for i in ids]

    def _generate_slot(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        """(seconds from the first prefill to the last token on the host, tokens per prompt)."""
        import jax

        from gemma_jax.sampling import SamplingParams

        engine = self.engine(len(prompts))
        greedy = SamplingParams(temperature=0.0)
        state = engine.init_state()
        jax.block_until_ready(state)
        out: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        prefix = engine.prefill_prompts(prompts, [greedy] * len(prompts), [new] * len(prompts))
        state = engine.insert(prefix, state, engine.pad_slots(range(len(prompts)), prefix))
        for i, tok in enumerate(np.asarray(prefix.tokens)[: len(prompts)]):
            out[i].append(int(tok))
        inflight = None
        for _ in range(-(-(new - 1) // engine.steps)):  # dispatch n + 1 before reading n
            state, tokens = engine.generate(state)
            if inflight is not None:
                _collect(out, inflight)
            inflight = tokens
        if inflight is not None:
            _collect(out, inflight)
        elapsed = time.perf_counter() - t0
        return elapsed, [o[:new] for o in out]


def _collect(out: list[list[int]], tokens) -> None:
    for row in np.asarray(tokens):  # [steps, B]
        for slot, tok in enumerate(row[: len(out)]):
            if tok >= 0:
                out[slot].append(int(tok))


# -- transformers ------------------------------------------------------------------------------------
class Theirs:
    def __init__(self, gguf_file, cache: str):
        import torch
        from transformers import Gemma3ForCausalLM

        self.torch = torch
        self.model = Gemma3ForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                       dtype=torch.float32).eval()
        self.cache = cache

    def generate(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, cache_implementation=self.cache)
            elapsed = time.perf_counter() - t0
        return elapsed, out[:, ids.shape[1]:].tolist()


def decode_rate(side, prompts, new: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Median decode tok/s: (time for `new` tokens - time for 1) over B x (new - 1) tokens."""
    side.generate(prompts, new)  # warm-up: compiles every shape used
    side.generate(prompts, 1)
    rates, tokens = [], None
    for _ in range(repeats):
        t_new, tokens = side.generate(prompts, new)
        t_one, _ = side.generate(prompts, 1)
        rates.append(len(prompts) * (new - 1) / max(t_new - t_one, 1e-9))
    return statistics.median(rates), tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Shortest common greedy prefix over the rows, and how many rows agree entirely."""
    prefixes = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s))) for r, s in zip(a, b)]
    whole = sum(p == len(r) for p, r in zip(prefixes, a))
    return f"{whole}/{len(a)} rows identical, shortest common prefix {min(prefixes)} tokens"


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import torch
    import transformers

    from gemma_jax.embedded_gguf import gguf_path

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    caches = [c.strip() for c in args.hf_cache.split(",") if c.strip()]
    gguf_file = gguf_path()
    t = time.perf_counter()
    ours = Ours(args.steps, max_len=max(2048, args.prompt_len + args.new_tokens), kind=args.engine)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = Theirs(gguf_file, caches[0])
    load_theirs = time.perf_counter() - t

    rng = np.random.default_rng(0)
    vocab, bos = ours.config.vocab_size, ours.config.bos_id
    print(f"# embedded Gemma 3 270M ({gguf_file.name}, float32), greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}; {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print(f"# jax {jax.__version__}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"load: ours {load_ours:.1f} s, transformers {load_theirs:.1f} s")
    rows = []
    for batch in batches:
        prompts = [[bos] + rng.integers(3, vocab, args.prompt_len - 1).tolist() for _ in range(batch)]
        ours_rate, ours_tokens = decode_rate(ours, prompts, args.new_tokens, args.repeats)
        for cache in caches:
            theirs.cache = cache
            their_rate, their_tokens = decode_rate(theirs, prompts, args.new_tokens, args.repeats)
            rows.append((batch, cache, ours_rate, their_rate, agreement(ours_tokens, their_tokens)))
    print(f"# ours: {ours.describe()}")
    print("\n| batch | ours tok/s | transformers tok/s (cache) | ours / transformers | greedy tokens |")
    print("|---|---|---|---|---|")
    for batch, cache, mine, hf, agree in rows:
        print(f"| {batch} | {mine:.1f} | {hf:.1f} ({cache}) | {mine / hf:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
