"""Per-row logits processors and the seeded draw, all jit-able with B (slots) and V (vocab) static.

Every decode slot carries its own sampling parameters (`SamplingRows`, device arrays resident in the
engine's decode state), so one compiled `sample` serves any mix of requests: no recompiles when a
request with other parameters joins, and no host round trip per step.

Shape legend: B rows (decode slots), V vocabulary, P prompts, T padded prompt length.

Order of the processors (TGI's, which is transformers' logits-processor chain):
  1. repetition_penalty over every token in `seen` (prompt + generated), transformers' rule:
     logit > 0 -> logit / p, else logit * p. 1 is off; 0 is treated as off (Workers AI admits 0 and
     dividing by it would give inf/NaN). Tiny positive p is clamped to `MIN_DIVISOR` so the division
     stays finite.
  2. frequency_penalty and presence_penalty over generated tokens only (`counts`), OpenAI's rule:
     logit - counts * frequency - (counts > 0) * presence.
  3. temperature: logits / t. t == 0 means greedy (argmax of the penalised logits); a positive t is
     clamped to `MIN_DIVISOR` for the same reason as above (JSON admits 1e-40).
  4. top_k: keep logits >= the k-th largest (ties at the k-th value are kept, as transformers does).
     0 means no filter. Up to `MAX_TOP_K` (Workers AI's maximum, 50) the threshold comes from one
     `lax.top_k(logits, 50)`; a larger k (notebook use) takes the full-sort path below.
  5. top_p (nucleus) over the distribution left after top_k: keep the smallest set of most likely
     tokens whose cumulative probability is >= top_p, always at least the top token (ties at the
     boundary value are kept). top_p >= 1 means no filter (Workers AI admits up to 2); top_p == 0
     means greedy, the limit of an ever smaller nucleus (Workers AI admits 0; a literal nucleus of
     probability 0 is just the top token).
  6. draw: Gumbel-max via `jax.random.categorical`, one key per row.

Filtered logits are -inf (as in transformers); kept ones are always finite for every value Workers
AI's schema admits (temperature 0..5, top_p 0..2, top_k 1..50, penalties 0..2), so no NaN appears.
Greedy rows (temperature 0 or top_p 0) come out of `process_logits` with only their argmax kept,
so its output is exactly the distribution `sample` draws from, for every row.

The full-vocabulary sort that top_p needs (V = 256000 on the 7B model) sits under a `lax.cond` and
runs only when some non-greedy row has 0 < top_p < 1 or top_k > MAX_TOP_K. (Under `vmap` a cond
becomes a select and both branches run; the engine does not vmap `sample`.)

Seeds: a request's key is derived on the host from its whole seed (Workers AI seeds go up to
9_999_999_999 > 2**32) as the threefry key data [seed >> 32, seed & 0xffffffff]; that is what
`jax.random.key(seed)` gives for 64-bit seeds, and equals it for any seed < 2**31 with x64 off.
Token number `step` of a row is drawn with fold_in(row key, step), so a request with the same seed
and inputs gets the same tokens whatever other rows share the batch and whichever slot it sits in.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_K = 50  # Workers AI's top_k maximum; the fast top-k path is one lax.top_k(logits, 50)
MIN_DIVISOR = 1e-6  # smallest temperature / repetition_penalty we divide by (keeps logits finite)
KEY_IMPL = "threefry2x32"  # raw key data is uint32 [2]
_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with Workers AI's ranges (validated by the server's schema).

    temperature 0 means greedy. top_p >= 1 means no nucleus filter and top_p 0 means greedy (the
    smallest nucleus); top_k None means none.
    repetition_penalty follows transformers/TGI over prompt + generated tokens (1 = off; 0 is treated
    as off rather than divided by). frequency/presence penalties follow OpenAI over generated tokens.
    seed None: the engine draws one. The same seed and inputs give the same tokens whatever else is
    in the batch.
    """

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@flax.struct.dataclass
class SamplingRows:
    """Per-row (per decode slot) sampling parameters as device arrays; a pytree."""

    temperature: jax.Array  # f32 [B]; 0 = greedy
    top_k: jax.Array  # i32 [B]; 0 = no top-k filter
    top_p: jax.Array  # f32 [B]; >= 1 no filter, 0 greedy
    repetition_penalty: jax.Array  # f32 [B]; 1 (or 0) = off
    frequency_penalty: jax.Array  # f32 [B]
    presence_penalty: jax.Array  # f32 [B]
    key: jax.Array  # uint32 [B, 2] raw threefry key data


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 [2] threefry key data for a seed of up to 64 bits: [seed >> 32, seed & 0xffffffff]."""
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return np.array([seed >> 32, seed & 0xFFFF_FFFF], dtype=np.uint32)


def rows_from_params(params: Sequence[SamplingParams], rng: np.random.Generator | None = None) -> SamplingRows:
    """Host side: one row per request. A seed of None is drawn from `rng` (fresh OS entropy if None)."""
    if rng is None:
        rng = np.random.default_rng()
    seeds = [p.seed if p.seed is not None else int(rng.integers(0, 2**63)) for p in params]
    f32 = lambda name: jnp.asarray(np.array([float(getattr(p, name)) for p in params], np.float32))
    return SamplingRows(
        temperature=f32("temperature"),
        top_k=jnp.asarray(np.array([p.top_k or 0 for p in params], np.int32)),
        top_p=f32("top_p"),
        repetition_penalty=f32("repetition_penalty"),
        frequency_penalty=f32("frequency_penalty"),
        presence_penalty=f32("presence_penalty"),
        key=jnp.asarray(np.array([seed_key_data(s) for s in seeds], np.uint32).reshape(len(params), 2)),
    )


def empty_rows(batch: int) -> SamplingRows:
    """Neutral rows for unused slots: greedy, no filters, no penalties, key 0."""
    return SamplingRows(
        temperature=jnp.zeros((batch,), jnp.float32),
        top_k=jnp.zeros((batch,), jnp.int32),
        top_p=jnp.ones((batch,), jnp.float32),
        repetition_penalty=jnp.ones((batch,), jnp.float32),
        frequency_penalty=jnp.zeros((batch,), jnp.float32),
        presence_penalty=jnp.zeros((batch,), jnp.float32),
        key=jnp.zeros((batch, 2), jnp.uint32),
    )


def update_penalty_state(seen: jax.Array, counts: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Record the tokens just generated. seen bool [B, V], counts i32 [B, V], tokens i32 [B].

    A token id outside [0, V) (e.g. -1 for an idle slot) is ignored.
    """
    batch, vocab = seen.shape
    rows = jnp.arange(batch)
    idx = jnp.where((tokens >= 0) & (tokens < vocab), tokens, vocab)  # out of range -> dropped
    seen = seen.at[rows, idx].set(True, mode="drop")
    counts = counts.at[rows, idx].add(1, mode="drop")
    return seen, counts


def prompt_seen(prompt_ids: jax.Array, length: jax.Array, vocab: int) -> jax.Array:
    """bool [P, V]: which tokens occur in each prompt's first `length` ids. prompt_ids [P, T], length [P]."""
    n, t = prompt_ids.shape
    valid = jnp.arange(t)[None, :] < length[:, None]  # [P, T]
    idx = jnp.where(valid & (prompt_ids >= 0) & (prompt_ids < vocab), prompt_ids, vocab)
    return jnp.zeros((n, vocab), bool).at[jnp.arange(n)[:, None], idx].set(True, mode="drop")


def _greedy(rows: SamplingRows) -> jax.Array:
    return (rows.temperature <= 0) | (rows.top_p <= 0)  # [B]


def _penalise(logits: jax.Array, rows: SamplingRows, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """Steps 1-2: repetition penalty over `seen`, then frequency/presence over `counts`. [B, V]."""
    p = rows.repetition_penalty[:, None]  # [B, 1]
    p = jnp.where(p > 0, jnp.maximum(p, MIN_DIVISOR), 1.0)
    rep = jnp.where(logits > 0, logits / p, logits * p)
    x = jnp.where(seen, rep, logits)
    c = counts.astype(jnp.float32)
    return x - c * rows.frequency_penalty[:, None] - (c > 0) * rows.presence_penalty[:, None]


def _top_k_fast(x: jax.Array, top_k: jax.Array) -> jax.Array:
    """Top-k for k <= MAX_TOP_K from one lax.top_k; rows with k == 0 (or k > MAX_TOP_K) untouched."""
    kmax = min(MAX_TOP_K, x.shape[-1])
    vals = jax.lax.top_k(x, kmax)[0]  # [B, kmax] descending
    kth = jnp.take_along_axis(vals, jnp.clip(top_k, 1, kmax)[:, None] - 1, axis=-1)  # [B, 1]
    on = ((top_k > 0) & (top_k <= kmax))[:, None]
    return jnp.where(on & (x < kth), _NEG_INF, x)


def _top_k_top_p_sorted(x: jax.Array, top_k: jax.Array, top_p: jax.Array, p_on: jax.Array) -> jax.Array:
    """Top-k (any k) then top-p for rows with p_on, from one full descending sort of each row."""
    vocab = x.shape[-1]
    srt = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(srt, k[:, None] - 1, axis=-1)  # [B, 1]
    x = jnp.where(x < kth, _NEG_INF, x)
    srt = jnp.where(srt < kth, _NEG_INF, srt)
    probs = jax.nn.softmax(srt, axis=-1)  # [B, V]
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)  # [B]; a prefix of srt
    thr = jnp.take_along_axis(srt, n_keep[:, None] - 1, axis=-1)  # [B, 1] smallest kept value
    return jnp.where(p_on[:, None] & (x < thr), _NEG_INF, x)


def process_logits(logits: jax.Array, rows: SamplingRows, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """Penalties, temperature, top-k, top-p in TGI's order. f32 [B, V] -> f32 [B, V] (filtered = -inf).

    Greedy rows keep only the argmax of their penalised logits, so the result is, for every row,
    the logits of the distribution `sample` draws from.
    """
    logits = logits.astype(jnp.float32)  # [B, V]
    vocab = logits.shape[-1]
    pen = _penalise(logits, rows, seen, counts)  # [B, V]
    greedy = _greedy(rows)  # [B]
    t = jnp.where(greedy, 1.0, jnp.maximum(rows.temperature, MIN_DIVISOR))
    x = pen / t[:, None]
    p_on = ~greedy & (rows.top_p < 1)
    big_k = ~greedy & (rows.top_k > min(MAX_TOP_K, vocab))
    x = jax.lax.cond(
        jnp.any(p_on | big_k),
        lambda x: _top_k_top_p_sorted(x, rows.top_k, rows.top_p, p_on),
        lambda x: _top_k_fast(x, rows.top_k),
        x,
    )
    best = jnp.arange(vocab)[None, :] == jnp.argmax(pen, axis=-1)[:, None]  # [B, V]
    return jnp.where(greedy[:, None], jnp.where(best, pen, _NEG_INF), x)


def row_keys(rows: SamplingRows, step: jax.Array) -> jax.Array:
    """Typed PRNG keys [B]: each row's key folded with the index of the token it is drawing."""
    fold = lambda data, s: jax.random.fold_in(jax.random.wrap_key_data(data, impl=KEY_IMPL), s)
    return jax.vmap(fold)(rows.key, step)


def sample(logits: jax.Array, rows: SamplingRows, seen: jax.Array, counts: jax.Array, step: jax.Array) -> jax.Array:
    """Draw one token per row. logits f32 [B, V], step i32 [B] (token index within its request) -> i32 [B]."""
    x = process_logits(logits, rows, seen, counts)  # [B, V]
    drawn = jax.vmap(jax.random.categorical)(row_keys(rows, step), x)  # [B]
    return jnp.where(_greedy(rows), jnp.argmax(x, axis=-1), drawn).astype(jnp.int32)
