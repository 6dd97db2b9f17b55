"""Per-step cost of LoRA in a mixed decode batch, grouped (today) vs the old one-hot / per-row paths.

    python benchmarks/lora.py                        # 270M shape, batch 8, 8 adapters of rank 8
    python benchmarks/lora.py --config tiny --dispatches 3   # a quick check that it runs

Random weights of the chosen shape (float32), `--batch` rows decoding greedily through the engine's
device functions (`prefill_step`, `insert_step`, `generate_steps`, `--steps` per dispatch, a cache of
`--kv-len` positions per row). Each variant is compiled (and run once) first; then `--dispatches`
rounds, each timing one dispatch of every variant in turn (so a load spike on a shared machine hits
them alike); printed: the best and the median dispatch, divided by `--steps`: milliseconds per
decode step. Variants:

- base: `use_lora=False` (what the engine runs when no row has an adapter: no bank read at all);
- today's `layers.lora_delta` on a bank in buckets 8 / 16 / 32 (the engine's default on a GPU or
  TPU), every row id 0, then 8 adapters of rank 8, one per row; and on one rank-32 bucket (every
  adapter padded to 32, as before the buckets; the engine's default on a CPU). On a CPU that is the dense one-hot form per bucket (`layers._dense_delta`);
  the grouped form a GPU or TPU runs (rows sorted by adapter, `lax.ragged_dot`) is measured forced;
- the old path, a verbatim copy of `lora_delta` at commit 4032343 (below), on one rank-32 bank:
  one-hot over all slots (the bank read once, a mask keeps each row's own), and per-row gather (a
  copy of each row's A and B). The old code chose between them by slots vs rows; here each is forced.

The variants on the same adapters should draw the same tokens: their agreement is printed.
On a CPU, `lax.ragged_dot` lowers to a dense masked matmul over every group (XLA's CPU backend has
no grouped kernel), so its CPU figure says nothing about a GPU or TPU, where it is one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="270m", choices=["270m", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    p.add_argument("--kv-len", type=int, default=128, help="cache positions per row")
    p.add_argument("--steps", type=int, default=8, help="decode steps per dispatch")
    p.add_argument("--dispatches", type=int, default=5, help="timed dispatches per variant")
    return p.parse_args(argv)


# -- the old lora_delta (git show 4032343:gemma_jax/layers.py), verbatim but for the forced strategy --
def old_lora_delta(lora, target, x, eqn_in, eqn_out, *, strategy):
    import jax
    import jax.numpy as jnp

    if lora is None:
        return None
    bank, ids = lora
    weights = bank.get(target)
    if weights is None:
        return None
    slots, batch = weights.a.shape[0], ids.shape[0]

    if strategy == "per-row":  # was: slots > batch
        a = jnp.take(weights.a, ids, axis=0).astype(x.dtype)  # [B, *in, R]
        b = jnp.take(weights.b, ids, axis=0).astype(x.dtype)  # [B, R, *out]
        out = jnp.einsum(eqn_out, jnp.einsum(eqn_in, x, a), b)
        scale = jnp.take(weights.scale, ids, axis=0).astype(x.dtype)  # [B]
        return out * scale.reshape((-1,) + (1,) * (out.ndim - 1))

    (x_in, a_in), r_out = _split(eqn_in)  # e.g. BTD, BDR -> BTR
    (r_in, b_in), out = _split(eqn_out)  # e.g. BTR, BRD -> BTD
    mask = jax.nn.one_hot(ids, slots, dtype=x.dtype) * weights.scale.astype(x.dtype)[None]  # [B, A]
    xa = jnp.einsum(f"{x_in},A{a_in[1:]}->{r_out[:-1]}AR", x, weights.a.astype(x.dtype))  # [B, T, A, R]
    xa = xa * mask.reshape((batch,) + (1,) * (xa.ndim - 3) + (slots, 1))
    return jnp.einsum(f"{r_in[:-1]}AR,A{b_in[1:]}->{out}", xa, weights.b.astype(x.dtype))


def _split(eqn):
    inputs, output = eqn.split("->")
    first, second = inputs.split(",")
    return (first, second), output


def _old(strategy):
    """The old function on a one-bucket bank, with today's call signature (model.py's)."""
    from gemma_jax import projections

    def delta(lora, target, x):
        layer, ids = lora
        single = {t: ws[0] for t, ws in layer.items()}  # one rank bucket: the old bank layout
        return old_lora_delta((single, ids), target, x, *old_equations(projections.TARGETS[target]),
                              strategy=strategy)
    return delta


def old_equations(t):
    """The per-row equations the old code took (`Target.lora_equations` at 4032343, since removed),
    derived here from the target's logical axes: x with one row's A [B, *ins, R], then with its B
    [B, R, *outs]."""
    from gemma_jax.projections import LETTERS

    i, o = ("".join(LETTERS[a] for a in axes) for axes in (t.ins, t.outs))
    return f"BT{i},B{i}R->BTR", f"BTR,BR{o}->BT{o}"


def _forced_ragged(lora, target, x):
    """Today's lora_delta with the grouped `lax.ragged_dot` form on any platform (CPU included)."""
    from gemma_jax import layers

    dense = layers._dense_delta
    layers._dense_delta = layers._ragged_delta  # read when lora_delta is traced
    try:
        return layers.lora_delta(lora, target, x)
    finally:
        layers._dense_delta = dense


# -- the harness ---------------------------------------------------------------------------------------
def random_adapter(config, rank, seed):
    from gemma_jax import lora, projections

    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(config.num_layers):
        for name, t in projections.TARGETS.items():
            a = rng.normal(0, 0.05, (rank, t.in_features(config))).astype(np.float32)
            b = rng.normal(0, 0.05, (t.out_features(config), rank)).astype(np.float32)
            weights[(layer, name)] = (a, b, 2.0)
    return lora.adapter_from_torch(config, weights)


def bank_with(config, adapters, capacity, rank_buckets):
    """A bank of `capacity` slots per bucket holding `adapters` (each in the smallest bucket): (bank, ids)."""
    from gemma_jax import lora

    bank = lora.make_bank(config, capacity, 32, rank_buckets=rank_buckets)
    free = [list(bank.bucket_ids(k)) for k in range(len(bank.ranks))]
    ids = []
    for adapter in adapters:
        ids.append(free[bank.bucket_for(adapter.rank)].pop(0))
        bank = lora.bank_add(bank, ids[-1], adapter)
    return bank, ids


class Variant:
    """One variant, compiled with `delta_fn` as the model's lora_delta, its rows prefilled and decoding."""

    def __init__(self, args, config, params, bank, ids, use_lora, delta_fn):
        import jax
        import jax.numpy as jnp

        from gemma_jax import model
        from gemma_jax.engine.engine import generate_steps, insert_step, prefill_step
        from gemma_jax.engine.state import init_decode_state
        from gemma_jax.sampling import SamplingParams, rows_from_params

        b = args.batch
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, config.vocab_size, (b, args.prompt)).astype(np.int32)
        lengths = np.full((b,), args.prompt, np.int32)
        rows = rows_from_params([SamplingParams(temperature=0.0)] * b, rng)
        limit = np.full((b,), 10_000, np.int32)
        kw = dict(config=config, use_lora=use_lora, mode="greedy")

        # Fresh functions per variant: jit would otherwise reuse another variant's trace of the same
        # function (same shapes, same static arguments), whatever lora_delta is patched in.
        def prefill(params, bank, tokens, lengths, rows, limit, ids):
            return prefill_step(params, bank, tokens, lengths, rows, limit, ids, cache_dtype=jnp.float32, **kw)

        def generate(params, bank, state):
            return generate_steps(params, bank, state, steps=args.steps, **kw)

        self.params, self.bank = params, bank
        self._generate = jax.jit(generate, donate_argnums=(2,))
        original = model.lora_delta
        model.lora_delta = delta_fn
        try:
            state = jax.jit(init_decode_state, static_argnums=(0, 1, 2))(config, b, args.kv_len)  # fresh buffers
            prefix = jax.jit(prefill)(params, bank, tokens, lengths, rows, limit, np.asarray(ids, np.int32))
            self.state = jax.jit(insert_step, donate_argnums=(1,))(prefix, state, np.arange(b, dtype=np.int32))
            self.drawn = [np.asarray(self.dispatch())]  # compiles
        finally:
            model.lora_delta = original
        self.times: list[float] = []

    def dispatch(self):
        self.state, out = self._generate(self.params, self.bank, self.state)
        return out

    def timed(self) -> None:
        t0 = time.perf_counter()
        self.drawn.append(np.asarray(self.dispatch()))  # waits for the dispatch
        self.times.append(time.perf_counter() - t0)


def main(argv=None):
    args = parse_args(argv)
    import jax

    from gemma_jax import config as C
    from gemma_jax import layers
    from gemma_jax.params import init_params

    config = C.gemma3_270m() if args.config == "270m" else C.tiny_gqa()
    config = config.replace(eos_id=-1, end_of_turn_id=-1)  # never stop early
    need = args.prompt + args.steps * (args.dispatches + 1)
    if need > args.kv_len:
        raise SystemExit(f"--kv-len {args.kv_len} < prompt + decoded tokens ({need})")
    params = init_params(config, jax.random.key(0))
    adapters = [random_adapter(config, args.rank, seed) for seed in range(args.adapters)]
    capacity = args.adapters + 1
    bucketed, bucketed_ids = bank_with(config, adapters, capacity, (8, 16))
    single, single_ids = bank_with(config, adapters, capacity, ())
    rows = lambda ids: [ids[i % len(ids)] for i in range(args.batch)]
    zeros = [0] * args.batch
    variants = [
        ("base (lora=None)", None, zeros, False, layers.lora_delta),
        ("today (CPU: dense), buckets 8/16/32, all rows id 0", bucketed, zeros, True, layers.lora_delta),
        (f"today (CPU: dense), buckets 8/16/32, {args.adapters} x rank {args.rank}", bucketed,
         rows(bucketed_ids), True, layers.lora_delta),
        (f"today (CPU: dense), one rank-32 bucket (the CPU default), {args.adapters} x rank {args.rank}", single,
         rows(single_ids), True, layers.lora_delta),
        (f"grouped ragged_dot (forced), buckets 8/16/32, {args.adapters} x rank {args.rank}", bucketed,
         rows(bucketed_ids), True, _forced_ragged),
        ("old one-hot, rank-32 bank, all rows id 0", single, zeros, True, _old("one-hot")),
        (f"old one-hot, rank-32 bank, {args.adapters} x rank {args.rank}", single, rows(single_ids), True,
         _old("one-hot")),
        (f"old per-row gather, rank-32 bank, {args.adapters} x rank {args.rank}", single, rows(single_ids), True,
         _old("per-row")),
    ]
    print(f"# {args.config} shape ({config.num_layers} layers, D={config.embed_dim}), float32, batch {args.batch}, "
          f"cache {args.kv_len}, {args.steps} steps/dispatch, {args.dispatches} rounds; "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}", flush=True)
    built = {}
    for name, bank, ids, use_lora, fn in variants:
        built[name] = Variant(args, config, params, bank, ids, use_lora, fn)
        print(f"  compiled: {name}", flush=True)
    for _ in range(args.dispatches):  # interleaved: a load spike hits every variant alike
        for v in built.values():
            v.timed()
    results = {name: (1000 * min(v.times) / args.steps, 1000 * statistics.median(v.times) / args.steps,
                      np.concatenate(v.drawn)) for name, v in built.items()}
    base_ms, _, base_tokens = results[variants[0][0]]
    mixed = [n for n, _, ids, _, _ in variants if any(ids)]
    print("\n| variant | ms / decode step, best | median | best vs base |\n|---|---|---|---|")
    for name, (ms, median, _) in results.items():
        print(f"| {name} | {ms:.1f} | {median:.1f} | {ms / base_ms:.2f}x |")
    zero_rows = [n for n, _, ids, lora_on, _ in variants if lora_on and not any(ids)]
    agree = lambda a, b: float(np.mean(a == b))
    print("\ntokens drawn, agreement: all-id-0 variants vs base "
          + ", ".join(f"{agree(results[n][2], base_tokens):.0%}" for n in zero_rows)
          + f"; mixed variants vs '{mixed[0]}' "
          + ", ".join(f"{agree(results[n][2], results[mixed[0]][2]):.0%}" for n in mixed[1:])
          + f"; load average now {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
