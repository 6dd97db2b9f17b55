"""Sampling processors against numpy written by hand here (never calling gemma_jax.sampling's helpers).

The reference applies TGI's order: repetition penalty (transformers rule over `seen`), frequency and
presence penalties (OpenAI rule over `counts`), temperature, top-k, top-p over what top-k left, with
temperature 0 / top_p 0 meaning greedy and repetition_penalty 0 meaning off. The static modes
(greedy / sampled / top_p) are checked against each other and numpy, the two-stage top-k against a
numpy sort, the top_p mode's candidate cap against the documented rule by hand, and the compiled
HLO at the 7B vocabulary for conditionals and vocabulary-sized sorts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import sampling
from gemma_jax.engine import api
from gemma_jax.sampling import SamplingParams

SP = SamplingParams
NEUTRAL = dict(temperature=1.0, top_p=1.0, top_k=None, repetition_penalty=1.0, frequency_penalty=0.0,
               presence_penalty=0.0)
EPS = 1e-6  # the documented smallest divisor for temperature / repetition_penalty


def sp(**kw):
    return SP(**{**NEUTRAL, "seed": 7, **kw})


# ----------------------------------------------------------------------------- numpy reference


def np_penalise(x, p: SP, seen, counts):
    x = x.astype(np.float64).copy()
    rp = p.repetition_penalty
    if rp != 0 and rp != 1:
        rp = max(rp, EPS)
        for v in np.nonzero(seen)[0]:
            x[v] = x[v] / rp if x[v] > 0 else x[v] * rp
    for v in range(len(x)):
        if counts[v] > 0:
            x[v] -= counts[v] * p.frequency_penalty + p.presence_penalty
    return x


def np_process_row(x, p: SP, seen, counts):
    x = np_penalise(x, p, seen, counts)
    out = np.full_like(x, -np.inf)
    if p.temperature <= 0 or p.top_p <= 0:  # greedy: only the argmax survives
        best = int(np.argmax(x))
        out[best] = x[best]
        return out
    x = x / max(p.temperature, EPS)
    desc = np.sort(x)[::-1]
    if p.top_k:
        kth = desc[min(p.top_k, len(x)) - 1]
        x = np.where(x >= kth, x, -np.inf)
    if p.top_p < 1:
        e = np.exp(x - x.max())
        probs = e / e.sum()
        order = np.argsort(-x, kind="stable")
        total, n = 0.0, 0
        while True:  # smallest prefix of the most likely tokens with mass >= top_p
            total += probs[order[n]]
            n += 1
            if total >= p.top_p or n == len(x):
                break
        thr = x[order[n - 1]]
        x = np.where(x >= thr, x, -np.inf)
    return x


def np_process(logits, params, seen, counts):
    return np.stack([np_process_row(logits[b], p, seen[b], counts[b]) for b, p in enumerate(params)])


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_state(b, v, seed=0):
    r = np.random.default_rng(seed)
    logits = (r.standard_normal((b, v)) * 3).astype(np.float32)
    seen = r.random((b, v)) < 0.1
    counts = (r.random((b, v)) < 0.05) * r.integers(1, 5, (b, v))
    seen |= counts > 0  # generated tokens are also seen
    return logits, seen, counts.astype(np.int32)


def run_process(logits, params, seen, counts):
    rows = sampling.rows_from_params(params)
    out = jax.jit(sampling.process_logits)(jnp.asarray(logits), rows, jnp.asarray(seen), jnp.asarray(counts))
    return np.asarray(out)


def assert_same_processed(got, want):
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))  # identical kept sets
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=2e-5, atol=1e-4)
    assert (got[~kept] == -np.inf).all()


# ----------------------------------------------------------------------------- each processor alone


@pytest.mark.parametrize("name,values", [
    ("repetition_penalty", [0.0, 1.0, 2.0, 0.5, 1.3, 1e-30]),
    ("frequency_penalty", [0.0, 2.0, 0.7, 1.0, 0.0, 1.5]),
    ("presence_penalty", [0.0, 2.0, 0.3, 1.0, 2.0, 0.0]),
    ("temperature", [0.5, 1.0, 2.0, 5.0, 0.05, 1e-30]),
    ("top_k", [1, 2, 17, 50, None, 3]),
    ("top_p", [0.3, 0.9, 1.0, 2.0, 0.05, 0.999]),
])
def test_each_processor_alone_matches_numpy(name, values):
    logits, seen, counts = random_state(len(values), 1000, seed=len(name) + int(values[1] or 0))
    params = [sp(**{name: v}) for v in values]
    got, want = run_process(logits, params, seen, counts), np_process(logits, params, seen, counts)
    assert_same_processed(got, want)
    if name in ("repetition_penalty", "frequency_penalty", "presence_penalty", "temperature"):
        assert np.isfinite(got).all()  # these never filter


def test_top_k_one_and_fifty_keep_exactly_k():
    logits, seen, counts = random_state(2, 1000, seed=3)
    got = run_process(logits, [sp(top_k=1), sp(top_k=50)], seen, counts)
    assert np.isfinite(got).sum(-1).tolist() == [1, 50]
    assert np.argmax(got[0]) == np.argmax(logits[0])


def test_top_p_keeps_smallest_set_reaching_mass():
    logits, seen, counts = random_state(3, 1000, seed=4)
    params = [sp(top_p=q) for q in (0.2, 0.6, 0.95)]
    got = run_process(logits, params, seen, counts)
    for b, q in enumerate((0.2, 0.6, 0.95)):
        probs = np_softmax(logits[b].astype(np.float64))
        kept = np.isfinite(got[b])
        assert probs[kept].sum() >= q  # enough mass ...
        assert probs[kept].sum() - probs[kept].min() < q  # ... and the least likely one was needed
        assert probs[kept].min() >= probs[~kept].max()  # the most likely ones


def test_greedy_settings_keep_only_the_penalised_argmax():
    logits, seen, counts = random_state(3, 1000, seed=5)
    top = np.argmax(logits, -1)
    seen[:, :] = False
    seen[np.arange(3), top] = True  # the raw argmax is penalised away
    params = [sp(temperature=0.0, repetition_penalty=2.0), sp(top_p=0.0, repetition_penalty=2.0),
              sp(temperature=0.0, top_p=0.0, top_k=5, repetition_penalty=2.0)]
    got = run_process(logits, params, seen, counts)
    want = np_process(logits, params, seen, counts)
    assert_same_processed(got, want)
    assert (np.isfinite(got).sum(-1) == 1).all()
    assert (np.argmax(got, -1) != top).all()


# ----------------------------------------------------------------------------- the full chain


CHAIN = [
    sp(temperature=0.0, repetition_penalty=2.0, frequency_penalty=2.0, presence_penalty=2.0),
    sp(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
    sp(temperature=5.0, top_k=50, top_p=2.0, repetition_penalty=0.0, frequency_penalty=2.0),
    sp(temperature=1.2, top_k=1, top_p=0.5, repetition_penalty=0.5, presence_penalty=2.0),
    sp(temperature=0.3, top_p=0.0, repetition_penalty=1.0),
    sp(temperature=1.0, top_k=None, top_p=0.8, repetition_penalty=2.0, frequency_penalty=1.0),
    sp(temperature=2.0, top_k=5, top_p=1.0, repetition_penalty=1e-30, frequency_penalty=0.1),
    sp(temperature=1e-30, top_k=20, top_p=1e-9, presence_penalty=0.0),
]


def test_full_chain_sorted_path_matches_numpy():
    logits, seen, counts = random_state(len(CHAIN), 1000, seed=6)
    assert_same_processed(run_process(logits, CHAIN, seen, counts), np_process(logits, CHAIN, seen, counts))


def test_full_chain_fast_path_matches_numpy():
    """No row needs the full sort (every top_p >= 1, top_k <= 50): only lax.top_k runs."""
    params = [sp(**{**p.__dict__, "top_p": 1.0 if 0 < p.top_p < 1 else p.top_p}) for p in CHAIN]
    logits, seen, counts = random_state(len(params), 1000, seed=7)
    assert_same_processed(run_process(logits, params, seen, counts), np_process(logits, params, seen, counts))


def test_top_k_above_fifty_takes_the_sorted_path():
    params = [sp(top_k=100), sp(top_k=5000), sp(top_k=50)]
    logits, seen, counts = random_state(3, 1000, seed=8)
    got = run_process(logits, params, seen, counts)
    assert_same_processed(got, np_process(logits, params, seen, counts))
    assert np.isfinite(got).sum(-1).tolist() == [100, 1000, 50]


def test_schema_extremes_never_give_nan():
    """Every corner of Workers AI's ranges: temperature 0..5, top_p 0..2, top_k 1..50, penalties 0..2."""
    r = np.random.default_rng(9)
    params = [sp(temperature=t, top_p=q, top_k=k, repetition_penalty=rp, frequency_penalty=f, presence_penalty=pp)
              for t in (0.0, 1e-30, 5.0) for q in (0.0, 1e-9, 2.0) for k in (1, 50)
              for rp, f, pp in [tuple(r.choice([0.0, 1e-30, 2.0], 3))]]
    logits, seen, counts = random_state(len(params), 300, seed=10)
    logits[0, :] = 0.0  # an all-equal row
    got = run_process(logits, params, seen, counts)
    assert not np.isnan(got).any() and np.isfinite(got.max(-1)).all()
    assert_same_processed(got, np_process(logits, params, seen, counts))
    rows = sampling.rows_from_params(params)
    steps = jnp.zeros(len(params), jnp.int32)
    tok = np.asarray(jax.jit(sampling.sample)(jnp.asarray(logits), rows, jnp.asarray(seen), jnp.asarray(counts), steps))
    assert np.isfinite(got[np.arange(len(params)), tok]).all()


# ----------------------------------------------------------------------------- draws


@jax.jit
def _draws(logits, rows, seen, counts, steps, offsets):
    """Tokens [S, B]: row b draws its token number offsets[b] + s for every s in steps [S]."""
    return jax.vmap(lambda s: sampling.sample(logits, rows, seen, counts, offsets + s))(steps)


def draw(logits, params, seen, counts, steps, offsets=None):
    rows = sampling.rows_from_params(params)
    offsets = np.zeros(len(params)) if offsets is None else offsets
    out = _draws(jnp.asarray(logits), rows, jnp.asarray(seen), jnp.asarray(counts), jnp.asarray(steps, jnp.int32),
                 jnp.asarray(offsets, jnp.int32))
    return np.asarray(out)


def test_greedy_rows_equal_argmax():
    logits, seen, counts = random_state(4, 1000, seed=11)
    top = np.argmax(logits, -1)
    seen[1, top[1]], counts[2, top[2]] = True, 1  # penalise the raw argmax of rows 1 and 2
    params = [sp(temperature=0.0), sp(temperature=0.0, repetition_penalty=2.0, frequency_penalty=2.0),
              sp(top_p=0.0, temperature=3.0, presence_penalty=2.0), sp(temperature=0.0, top_k=50, top_p=0.5)]
    toks = draw(jnp.asarray(logits), params, jnp.asarray(seen), jnp.asarray(counts), np.arange(16))
    want = [np.argmax(np_penalise(logits[b], p, seen[b], counts[b])) for b, p in enumerate(params)]
    assert (toks == np.array(want)[None, :]).all()
    assert want[1] != top[1] and want[2] != top[2]  # the penalties mattered


def test_same_seed_same_tokens_whatever_the_neighbours_and_slot():
    v = 1000
    r = np.random.default_rng(12)
    mine = sp(temperature=1.5, top_k=50, top_p=0.95, seed=9_876_543_210)
    my_logits = (r.standard_normal(v) * 2).astype(np.float32)
    my_seen = r.random(v) < 0.1
    others, o_logits = [sp(seed=s, temperature=1.0) for s in (1, 2, 3, 4)], r.standard_normal((4, v)).astype(np.float32)

    def batch(slot, n_other, step_offsets):
        params = others[:n_other]
        params = params[:slot] + [mine] + params[slot:]
        lg = np.insert(o_logits[:n_other], slot, my_logits, axis=0)
        seen = np.insert(np.zeros((n_other, v), bool), slot, my_seen, axis=0)
        offs = np.insert(np.array(step_offsets[:n_other]), slot, 0)
        return draw(lg, params, seen, np.zeros(seen.shape, np.int32), np.arange(200), offs)[:, slot]

    a = batch(0, 4, [5, 9, 100, 2])
    b = batch(2, 4, [0, 77, 3, 1])
    c = batch(1, 2, [1, 1])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert len(set(a.tolist())) > 5  # it really samples


def test_different_seeds_give_different_sequences():
    v = 1000
    seeds = [1, 2, 2**32 + 1, 2**32 + 2, 9_999_999_999]
    params = [sp(seed=s, temperature=1.0) for s in seeds]
    z = jnp.zeros((len(seeds), v), jnp.float32)  # uniform distribution
    toks = draw(z, params, jnp.zeros(z.shape, bool), jnp.zeros(z.shape, jnp.int32), np.arange(32))
    seqs = {tuple(toks[:, b].tolist()) for b in range(len(seeds))}
    assert len(seqs) == len(seeds)
    again = draw(z, params, jnp.zeros(z.shape, bool), jnp.zeros(z.shape, jnp.int32), np.arange(32))
    np.testing.assert_array_equal(toks, again)


def test_empirical_draws_stay_in_the_allowed_set_and_follow_the_filtered_softmax():
    v, n = 200, 8000
    params = [sp(top_k=1, seed=1), sp(top_k=5, temperature=2.0, seed=2), sp(top_p=0.5, seed=3),
              sp(top_k=50, top_p=0.8, temperature=0.8, seed=4, repetition_penalty=1.5, frequency_penalty=0.3),
              sp(top_k=12, top_p=2.0, temperature=5.0, seed=5, presence_penalty=2.0),
              sp(top_p=0.7, temperature=1.0, seed=6, repetition_penalty=0.0)]
    logits, seen, counts = random_state(len(params), v, seed=13)
    want = np_softmax(np_process(logits, params, seen, counts))  # [B, V], 0 outside the allowed set
    toks = draw(jnp.asarray(logits), params, jnp.asarray(seen), jnp.asarray(counts), np.arange(n))
    for b in range(len(params)):
        freq = np.bincount(toks[:, b], minlength=v) / n
        assert (freq[want[b] == 0] == 0).all(), f"row {b} left its allowed set"
        tv = 0.5 * np.abs(freq - want[b]).sum()
        assert tv < 0.05, (b, tv, int((want[b] > 0).sum()))


# ----------------------------------------------------------------------------- host rows and penalty state


def test_rows_from_params_and_keys():
    rows = sampling.rows_from_params([sp(seed=5, top_k=None), sp(seed=2**31 - 1, top_k=7), sp(seed=9_999_999_999)])
    assert np.asarray(rows.top_k).tolist() == [0, 7, 0]
    keys = np.asarray(rows.key)
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.key(5, impl="threefry2x32")))
    np.testing.assert_array_equal(keys[1], jax.random.key_data(jax.random.key(2**31 - 1, impl="threefry2x32")))
    np.testing.assert_array_equal(keys[2], [9_999_999_999 >> 32, 9_999_999_999 % 2**32])
    a = sampling.rows_from_params([sp(seed=None)] * 2, rng=np.random.default_rng(0))
    b = sampling.rows_from_params([sp(seed=None)] * 2, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a.key, b.key)
    assert not (np.asarray(a.key)[0] == np.asarray(a.key)[1]).all()
    e = sampling.empty_rows(3)
    assert np.asarray(e.temperature).tolist() == [0, 0, 0] and np.asarray(e.key).shape == (3, 2)
    toks = jax.jit(sampling.sample)(jnp.asarray(np.eye(3, 10, 4, dtype=np.float32)), e, jnp.zeros((3, 10), bool),
                                    jnp.zeros((3, 10), jnp.int32), jnp.zeros(3, jnp.int32))
    assert np.asarray(toks).tolist() == [4, 5, 6]


def test_update_penalty_state_matches_numpy():
    b, v = 5, 50
    r = np.random.default_rng(14)
    seen_np, counts_np = r.random((b, v)) < 0.2, np.zeros((b, v), np.int32)
    seen, counts = jnp.asarray(seen_np), jnp.asarray(counts_np)
    update = jax.jit(sampling.update_penalty_state)
    for _ in range(30):
        tokens = r.integers(0, 8, b)
        tokens[r.random(b) < 0.2] = -1  # idle slot: ignored
        seen, counts = update(seen, counts, jnp.asarray(tokens, jnp.int32))
        for i, t in enumerate(tokens):
            if t >= 0:
                seen_np[i, t] = True
                counts_np[i, t] += 1
    np.testing.assert_array_equal(np.asarray(seen), seen_np)
    np.testing.assert_array_equal(np.asarray(counts), counts_np)


def test_prompt_seen_matches_numpy():
    p, t, v = 4, 12, 40
    r = np.random.default_rng(15)
    ids, length = r.integers(0, v, (p, t)), np.array([12, 5, 1, 0])
    want = np.zeros((p, v), bool)
    for i in range(p):
        for j in range(length[i]):
            want[i, ids[i, j]] = True
    got = jax.jit(sampling.prompt_seen, static_argnums=2)(jnp.asarray(ids, jnp.int32), jnp.asarray(length), v)
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- static modes


def test_mode_for_picks_the_least_general_mode_serving_every_row():
    greedy = [sp(temperature=0.0), sp(top_p=0.0, top_k=500), sp(temperature=0.0, top_p=0.5)]
    assert sampling.mode_for(greedy) == "greedy"
    assert sampling.mode_for(greedy + [sp(top_k=50, top_p=1.0)]) == "sampled"
    assert sampling.mode_for([sp(top_k=None, top_p=2.0), sp(top_k=1)]) == "sampled"
    assert sampling.mode_for(greedy + [sp(top_p=0.99)]) == "top_p"
    assert sampling.mode_for([sp(top_k=51)]) == "top_p"
    assert sampling.MODES == ("greedy", "sampled", "top_p")
    assert api.SamplingParams is SamplingParams  # the engine boundary re-exports it


def tied_state(b, v, seed):
    """Logits on a 0.5 grid (many ties, including at top-k / top-p boundaries) with -inf entries."""
    logits, seen, counts = random_state(b, v, seed=seed)
    logits = np.round(logits * 2) / 2
    r = np.random.default_rng(seed + 100)
    logits[r.random((b, v)) < 0.02] = -np.inf
    return logits, seen, counts


MODE_ROWS = {
    "greedy": [sp(temperature=0.0), sp(top_p=0.0, temperature=2.0, repetition_penalty=2.0),
               sp(temperature=0.0, top_k=7, frequency_penalty=1.0),
               sp(temperature=0.0, top_p=0.3, presence_penalty=2.0)],
    "sampled": [sp(temperature=0.0, repetition_penalty=1.5), sp(top_k=50, temperature=0.7), sp(top_k=1),
                sp(top_k=13, top_p=2.0, frequency_penalty=0.5), sp(top_k=None, temperature=1.3)],
    "top_p": [sp(top_p=0.9), sp(top_k=40, top_p=0.8, temperature=0.6), sp(top_k=100), sp(top_k=900, temperature=2.0),
              sp(temperature=0.0), sp(top_k=50), sp(top_p=0.5, repetition_penalty=1.3), sp(top_k=5000, top_p=0.95)],
}


@pytest.mark.parametrize("mode", sampling.MODES)
def test_each_mode_equals_the_general_path_on_rows_it_serves(mode):
    """V = 3001 > MAX_TOP_P_CANDIDATES and not a multiple of any chunk; ties and -inf in the logits.

    Every mode at least as general as mode_for(rows) gives the same processed logits (bit for bit)
    and the same draws, and they equal numpy's full-vocabulary rule (every nucleus here fits in 1024).
    """
    params = MODE_ROWS[mode]
    assert sampling.mode_for(params) == mode
    logits, seen, counts = tied_state(len(params), 3001, seed=20 + len(mode))
    rows = sampling.rows_from_params(params)
    args = (jnp.asarray(logits), rows, jnp.asarray(seen), jnp.asarray(counts))
    process = jax.jit(sampling.process_logits, static_argnames="mode")
    general = np.asarray(process(*args, mode="top_p"))
    assert_same_processed(general, np_process(logits, params, seen, counts))
    steps = jnp.arange(24, dtype=jnp.int32)
    zero = jnp.zeros(len(params), jnp.int32)
    draws = jax.jit(lambda m: jax.vmap(lambda s: sampling.sample(*args, zero + s, mode=m))(steps), static_argnums=0)
    want = np.asarray(draws("top_p"))
    for m in sampling.MODES[sampling.MODES.index(mode):]:
        np.testing.assert_array_equal(np.asarray(process(*args, mode=m)), general)
        np.testing.assert_array_equal(np.asarray(draws(m)), want)
    assert np.isfinite(general[np.arange(len(params))[None, :], want]).all()  # every draw is a kept token


@pytest.mark.parametrize("vocab,n,chunk", [
    (1, 1, 16), (7, 3, 16), (63, 50, 64), (64, 50, 64), (65, 50, 64), (1000, 50, 64), (3001, 50, 64),
    (4097, 1024, 16), (3001, 1024, 16), (1000, 1024, 16), (5000, 17, 7), (129, 128, 1), (300, 5, 300),
])
def test_two_stage_top_values_equal_a_full_numpy_sort(vocab, n, chunk):
    r = np.random.default_rng(vocab * 7 + n)
    x = (r.standard_normal((6, vocab)) * 2).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2] = np.arange(vocab, dtype=np.float32)  # the largest values all in the last chunks
    x[3] = 0.0  # all equal
    x[4, r.random(vocab) < 0.5] = -np.inf  # -inf, possibly more of them than n
    x[5, : vocab // 2] = np.float32(np.finfo(np.float32).max)  # top values crowded into the first chunks
    got = jax.jit(sampling._top_values, static_argnums=(1, 2))(jnp.asarray(x), n, chunk)
    want = np.sort(x, axis=-1)[:, ::-1][:, :min(n, vocab)]
    np.testing.assert_array_equal(np.asarray(got), want)


def np_top_p_mode_row(x, p: SP, seen, counts, n_cand):
    """"top_p" mode's documented rule by hand: the full rule with top_k' = min(top_k, N) (for top_k < V),
    and when 0 < top_p < 1 only tokens >= the N-th largest (after temperature) survive."""
    vocab = len(x)
    if p.top_k and p.top_k < vocab:
        p = SP(**{**p.__dict__, "top_k": min(p.top_k, n_cand)})
    out = np_process_row(x, p, seen, counts)
    if p.temperature > 0 and 0 < p.top_p < 1:
        t = np_penalise(x, p, seen, counts) / max(p.temperature, EPS)
        out = np.where(t >= np.sort(t)[::-1][n_cand - 1], out, -np.inf)
    return out


def test_top_p_mode_caps_at_the_candidate_set_as_documented():
    """V = 20000 > N = 1024: a flat nucleus or a top_k above N is capped at N; a nucleus that fits is exact."""
    n_cand, vocab = sampling.MAX_TOP_P_CANDIDATES, 20000
    assert n_cand == 1024
    r = np.random.default_rng(30)
    scale = np.array([0.1, 0.1, 3.0, 3.0, 0.1, 5.0, 3.0, 0.3])[:, None]  # flat rows need a huge nucleus
    logits = (r.standard_normal((8, vocab)) * scale).astype(np.float32)
    seen, counts = r.random((8, vocab)) < 0.01, np.zeros((8, vocab), np.int32)
    params = [sp(top_p=0.9), sp(top_k=3000), sp(top_p=0.9), sp(top_k=3000, top_p=0.95, temperature=1.5),
              sp(top_k=600, top_p=0.99), sp(top_p=0.6, repetition_penalty=1.5), sp(top_k=30000, top_p=0.8),
              sp(temperature=0.0)]
    got = run_process(logits, params, seen, counts)
    want = np.stack([np_top_p_mode_row(logits[b], p, seen[b], counts[b], n_cand) for b, p in enumerate(params)])
    assert_same_processed(got, want)
    full = np_process(logits, params, seen, counts)  # the uncapped full-vocabulary rule
    kept, kept_full = np.isfinite(got).sum(-1), np.isfinite(full).sum(-1)
    assert kept[0] == n_cand and kept_full[0] > 10 * n_cand  # flat nucleus capped
    assert kept[2] == n_cand and kept_full[2] > n_cand  # so is a slightly larger one
    assert kept[1] == n_cand and kept_full[1] == 3000  # top_k above N acts as N
    assert 500 < kept[4] < 600  # top_k <= N first, then a nucleus inside it
    for b in (4, 5, 6, 7):  # nucleus fits in N (top_k >= V is no filter): exactly the full rule
        assert kept[b] < n_cand
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(full[b]))


def lowered_sample(mode, batch=8, vocab=256000):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    rows = sampling.SamplingRows(
        temperature=f32(batch), top_k=jax.ShapeDtypeStruct((batch,), jnp.int32), top_p=f32(batch),
        repetition_penalty=f32(batch), frequency_penalty=f32(batch), presence_penalty=f32(batch),
        key=jax.ShapeDtypeStruct((batch, 2), jnp.uint32))
    args = (f32(batch, vocab), rows, jax.ShapeDtypeStruct((batch, vocab), bool),
            jax.ShapeDtypeStruct((batch, vocab), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    return jax.jit(sampling.sample, static_argnames="mode").lower(*args, mode=mode)


@pytest.mark.parametrize("mode", sampling.MODES)
def test_compiled_sample_has_no_conditional_and_no_vocabulary_sort(mode):
    """The 7B vocabulary (V = 256000), batch 8, lowered on CPU from shapes: no conditional anywhere,
    every sort / top-k operand far smaller than V, and the greedy variant draws no random numbers."""
    vocab = 256000
    lowered = lowered_sample(mode, vocab=vocab)
    shlo = lowered.as_text()
    hlo = lowered.compile().as_text()
    assert not re.search(r"stablehlo\.(case|if)\b", shlo)
    assert not re.search(r"\bconditional\(", hlo)
    assert "stablehlo.sort" not in shlo  # only the two-stage top_k calls select values
    selections = re.findall(r"chlo\.top_k\(.*?:\s*tensor<([0-9x]+)x[a-z0-9]+>", shlo)
    assert len(selections) == {"greedy": 0, "sampled": 2, "top_p": 2}[mode]
    for dims in selections:
        assert max(int(d) for d in dims.split("x")) < vocab // 10, dims
    # compiled: a sort's output has its operand's shape; a TopK custom call's operand is looked up by name
    shapes = dict(re.findall(r"(%[\w.-]+) = \w+\[([0-9,]*)\]", hlo))
    for line in hlo.splitlines():
        if re.search(r"\bsort\(", line):
            dims = re.search(r"= \(?\w+\[([0-9,]*)\]", line).group(1)
            assert max(int(d) for d in dims.split(",")) < vocab // 10, line
        if 'custom_call_target="TopK"' in line:
            operand = re.search(r"custom-call\((%[\w.-]+)", line).group(1)
            assert max(int(d) for d in shapes[operand].split(",")) < vocab // 10, line
    if mode == "greedy":  # no Gumbel noise, no top-k
        assert "threefry" not in shlo and "rng" not in hlo and "TopK" not in hlo
