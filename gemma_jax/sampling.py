"""Per-row logits processors and the seeded draw, all jit-able with B (slots) and V (vocab) static.

Every decode slot carries its own sampling parameters (`SamplingRows`, device arrays resident in the
engine's decode state), so one compiled `sample` per mode (three at most, below) serves any mix of
requests: no recompiles when a request with other parameters joins, and no host round trip per step.

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
     0 means no filter.
  5. top_p (nucleus) over the distribution left after top_k: keep the smallest set of most likely
     tokens whose cumulative probability is >= top_p, always at least the top token (ties at the
     boundary value are kept). top_p >= 1 means no filter (Workers AI admits up to 2); top_p == 0
     means greedy, the limit of an ever smaller nucleus (Workers AI admits 0; a literal nucleus of
     probability 0 is just the top token).
  6. draw: Gumbel-max via `jax.random.categorical`, one key per row; greedy rows take the argmax.

Filtered logits are -inf (as in transformers); kept ones are always finite for every value Workers
AI's schema admits (temperature 0..5, top_p 0..2, top_k 1..50, penalties 0..2), so no NaN appears.
Greedy rows (temperature 0 or top_p 0) come out of `process_logits` with only their argmax kept,
so its output is exactly the distribution `sample` draws from, for every row.

Modes: `sample(..., mode)` has three static variants (`MODES`), so a dispatch has no data-dependent
control flow (no `lax.cond`, whose predicate a GPU copies to the host) and no sort over V (256000
on the 7B model). The host picks the least general mode serving every row with `mode_for`:
  - "greedy" (every row greedy): the penalised argmax; no temperature, top-k or noise at all.
  - "sampled" (no row with 0 < top_p < 1 or top_k > MAX_TOP_K): top-k from an exact two-stage
    top-50 (`_top_values`: chunk maxima, the 50 best chunks, then 50 of their values), the same
    threshold a full sort gives. Greedy rows in the batch select their argmax (no noise used).
  - "top_p" (any row): top-k and top-p over the N = MAX_TOP_P_CANDIDATES (1024) most likely tokens
    of each row, from the same two-stage selection. Identical to the full-vocabulary rule whenever
    top_k <= N and the nucleus has at most N tokens (always when V <= N); otherwise the result is
    capped at the N most likely (ties at the N-th value kept): a top_k above N acts as N, and a
    nucleus that would need more than N tokens is those N. The nucleus is normalised over every
    token top-k kept, not only the candidates, so the cap never shrinks a nucleus that fits.
    Each token the cap drops is no more likely than each of the N kept, so its probability is
    at most 1/N; Workers AI's top_k is <= 50, so the top_k cap is notebook use only.
A mode serves only rows `mode_for` allows it (e.g. "sampled" ignores top_p).

Seeds: a request's key is derived on the host from its whole seed (Workers AI seeds go up to
9_999_999_999 > 2**32) as the threefry key data [seed >> 32, seed & 0xffffffff]; that is what
`jax.random.key(seed)` gives for 64-bit seeds, and equals it for any seed < 2**31 with x64 off.
Token number `step` of a row is drawn with fold_in(row key, step), so a request with the same seed
and inputs gets the same tokens whatever other rows share the batch and whichever slot it sits in.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("greedy", "sampled", "top_p")  # static variants of `sample`, least general first
MAX_TOP_K = 50  # Workers AI's top_k maximum: the largest k "sampled" mode serves
MAX_TOP_P_CANDIDATES = 1024  # "top_p" mode's candidate set: top-k and top-p act on the N most likely
TOP_K_CHUNK = 64  # two-stage top-k chunk width: top 50 of V/64 chunk maxima, then 50 of 3200
TOP_P_CHUNK = 16  # top_p candidates' chunk width: top 1024 of V/16 maxima, then 1024 of 16384
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


_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_ROW_TOP_K = 2**31 - 1  # top_k lives in an int32 row
SEED_RANGE = (-(2**63), 2**64 - 1)  # a seed is taken modulo 2**64 (`seed_key_data`)


def check_params(params: SamplingParams) -> None:
    """ValueError naming the first field of `params` that a sampling row cannot hold.

    The rows are float32 / int32 arrays: floats must be finite in float32, temperature and top_p
    not negative, top_k None or an integer in [0, MAX_ROW_TOP_K], seed None or an integer in
    SEED_RANGE. Every value Workers AI's schema admits passes; anything that passes builds a row.
    """
    for name in _FLOAT_FIELDS:
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not (math.isfinite(x) and abs(x) <= _FLOAT32_MAX):
            raise ValueError(f"{name} must be a finite float32 number, got {value!r}")
    for name in ("temperature", "top_p"):
        if float(getattr(params, name)) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(params, name)!r}")
    for name, lo, hi in (("top_k", 0, MAX_ROW_TOP_K), ("seed", *SEED_RANGE)):
        value = getattr(params, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
            raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 [2] threefry key data for a seed of up to 64 bits: [seed >> 32, seed & 0xffffffff]."""
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return np.array([seed >> 32, seed & 0xFFFF_FFFF], dtype=np.uint32)


def rows_from_params(params: Sequence[SamplingParams], rng: np.random.Generator | None = None) -> SamplingRows:
    """Host side: one row per request. A seed of None is drawn from `rng` (fresh OS entropy if None).
    ValueError (`check_params`) if a row cannot hold some request's parameters."""
    for p in params:
        check_params(p)
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


def _top_values(x: jax.Array, n: int, chunk: int) -> jax.Array:
    """The n largest values of each row, descending, exactly (as a full sort would give). [B, V] -> [B, n].

    Two stages, no sort over V: the row is cut into chunks of `chunk` (padded with -inf to a
    multiple), each chunk reduced to its maximum, and the n chunks with the largest maxima gathered
    [B, n, chunk]; the n largest of those candidates are the answer. Exact, ties included: let v be
    the n-th largest value and g < n the number above it. The chunks whose maximum is above v are at
    most g, rank first and are all gathered, with every value above v. The next ranked have maximum
    v, one value v each: either n - g of them are gathered, or all of them are (then every value v
    is in a gathered chunk). So the candidates hold every value above v and at least n values >= v.
    Selections: n of the V/chunk maxima, then n of the n * chunk candidates.
    """
    batch, vocab = x.shape
    n = min(n, vocab)
    n_chunks = -(-vocab // chunk)
    xc = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - vocab)), constant_values=_NEG_INF)
    xc = xc.reshape(batch, n_chunks, chunk)  # [B, V/C, C]
    take = min(n, n_chunks)
    idx = jax.lax.top_k(jnp.max(xc, axis=-1), take)[1]  # [B, take] chunks with the largest maxima
    cand = jnp.take_along_axis(xc, idx[:, :, None], axis=1).reshape(batch, take * chunk)
    return jax.lax.top_k(cand, n)[0]  # [B, n]


def _kth(vals: jax.Array, k: jax.Array) -> jax.Array:
    """[B, 1]: the k-th value of each descending row of vals [B, n], k clipped to 1..n."""
    return jnp.take_along_axis(vals, jnp.clip(k, 1, vals.shape[-1])[:, None] - 1, axis=-1)


def _top_k_small(x: jax.Array, top_k: jax.Array) -> jax.Array:
    """"sampled" mode's top-k, k <= MAX_TOP_K; rows with k == 0 (or k > min(MAX_TOP_K, V)) untouched."""
    vals = _top_values(x, MAX_TOP_K, TOP_K_CHUNK)  # [B, min(50, V)] descending
    on = ((top_k > 0) & (top_k <= vals.shape[-1]))[:, None]
    return jnp.where(on & (x < _kth(vals, top_k)), _NEG_INF, x)


def _top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array, p_on: jax.Array) -> jax.Array:
    """"top_p" mode: top-k (any k, capped at N) then top-p for rows with p_on, over the top N candidates.

    N = min(MAX_TOP_P_CANDIDATES, V). The rule, exactly: k' = min(top_k, N) (0 or k >= V: no top-k);
    keep x >= the k'-th largest value; over what is left, the nucleus is the smallest prefix of the
    descending candidates whose probability (normalised over every token kept, not only candidates)
    reaches top_p, capped at the N candidates; keep x >= its smallest value (ties kept).
    """
    vocab = x.shape[-1]
    vals = _top_values(x, MAX_TOP_P_CANDIDATES, TOP_P_CHUNK)  # [B, N] descending
    k_on = ((top_k > 0) & (top_k < vocab))[:, None]
    kth = jnp.where(k_on, _kth(vals, top_k), _NEG_INF)  # [B, 1]
    x = jnp.where(x < kth, _NEG_INF, x)
    vals = jnp.where(vals < kth, _NEG_INF, vals)
    top = vals[:, :1]  # [B, 1] the row maximum
    total = jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True)  # [B, 1] softmax normaliser over V
    probs = jnp.exp(vals - top) / total  # [B, N]
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely candidates
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)  # [B]; <= N
    thr = _kth(vals, n_keep)  # [B, 1] smallest kept value
    return jnp.where(p_on[:, None] & (x < thr), _NEG_INF, x)


def mode_for(params: Sequence[SamplingParams]) -> str:
    """Host side: the least general of MODES whose compiled `sample` serves every row of `params`."""
    sampled = [p for p in params if not (p.temperature <= 0 or p.top_p <= 0)]
    if not sampled:
        return "greedy"
    if any(p.top_p < 1 or (p.top_k or 0) > MAX_TOP_K for p in sampled):
        return "top_p"
    return "sampled"


def process_logits(logits: jax.Array, rows: SamplingRows, seen: jax.Array, counts: jax.Array,
                   mode: str = "top_p") -> jax.Array:
    """Penalties, temperature, top-k, top-p in TGI's order. f32 [B, V] -> f32 [B, V] (filtered = -inf).

    Greedy rows keep only the argmax of their penalised logits, so the result is, for every row,
    the logits of the distribution `sample` draws from. `mode` (static, one of MODES) must serve
    every row (see `mode_for`); "greedy" treats every row as greedy.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    logits = logits.astype(jnp.float32)  # [B, V]
    vocab = logits.shape[-1]
    pen = _penalise(logits, rows, seen, counts)  # [B, V]
    best = jnp.arange(vocab)[None, :] == jnp.argmax(pen, axis=-1)[:, None]  # [B, V]
    only_best = jnp.where(best, pen, _NEG_INF)
    if mode == "greedy":
        return only_best
    greedy = _greedy(rows)  # [B]
    t = jnp.where(greedy, 1.0, jnp.maximum(rows.temperature, MIN_DIVISOR))
    x = pen / t[:, None]
    if mode == "sampled":
        x = _top_k_small(x, rows.top_k)
    else:
        x = _top_k_top_p(x, rows.top_k, rows.top_p, ~greedy & (rows.top_p < 1))
    return jnp.where(greedy[:, None], only_best, x)


def row_keys(rows: SamplingRows, step: jax.Array) -> jax.Array:
    """Typed PRNG keys [B]: each row's key folded with the index of the token it is drawing."""
    fold = lambda data, s: jax.random.fold_in(jax.random.wrap_key_data(data, impl=KEY_IMPL), s)
    return jax.vmap(fold)(rows.key, step)


def sample(logits: jax.Array, rows: SamplingRows, seen: jax.Array, counts: jax.Array, step: jax.Array,
           mode: str = "top_p") -> jax.Array:
    """Draw one token per row. logits f32 [B, V], step i32 [B] (token index within its request) -> i32 [B].

    `mode` is static (one of MODES, see `mode_for`): "greedy" is the penalised argmax of every row,
    with no noise drawn; the other modes draw the non-greedy rows and select argmax for greedy ones.
    """
    if mode == "greedy":
        return jnp.argmax(_penalise(logits.astype(jnp.float32), rows, seen, counts), axis=-1).astype(jnp.int32)
    x = process_logits(logits, rows, seen, counts, mode)  # [B, V]
    best = jnp.argmax(x, axis=-1)  # [B]
    drawn = jax.vmap(jax.random.categorical)(row_keys(rows, step), x)  # [B]
    return jnp.where(_greedy(rows), best, drawn).astype(jnp.int32)
