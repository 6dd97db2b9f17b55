"""The serving engine: one compiled step over a paged KV cache, chunked prefill, prefix caching.

    engine = PagedEngine(config, params, max_seqs=8, page_size=16, token_budget=64)
    a = engine.add(prompt_ids, max_tokens=32, sampling=SamplingParams(temperature=0.0))
    while engine.busy(): events = engine.step()   # [StepEvent(seq, tokens, finish)], or engine.run()

Device side: `paged_step(params, bank, cache, inputs) -> (cache, drawn [steps, R], finish [R])`.
`inputs` (`StepInputs`) is a flat batch of T tokens (decode tokens and prompt chunks of up to R
sequences, padded), where each token's K/V goes in the page pools and what it reads
(`model.PagedBatch`), and R sampling rows: the token each row samples from, its sampling
parameters, its history (prompt + generated: the penalties' state and the draw's index) and its
limit. On a CPU a mixed step projects onto the vocabulary and samples only the rows it must: none
when no row samples (a prompt chunk that is not its prompt's last), one alone when one does, else
all R (a `lax.switch` on the live count). The device says why a row finished (`FINISH_STOP` on a
stop token, `FINISH_LENGTH` at its limit); the host takes that as given. A decode-only batch (T = R,
row r's token at index r) may run `inputs.steps` decode steps in one dispatch (a `while_loop`
bounded by the device-side step count, ending early once every row finished: no conditional, no
recompile): each step feeds each live row the token it drew, at the next position, on the pages the
host allocated ahead; a finished row stops writing and drawing (-1).

Shapes never change: a mixed step (decode tokens first, then prompt chunks) has T =
`token_budget` and R = `max_seqs`; a decode-only step (up to `decode_steps` steps per dispatch) has
T = R = the smallest of `decode_buckets` that holds its sequences, which the host packs into rows
0 .. n-1. On a CPU the buckets are 1 and `max_seqs`: a step's cost grows with its rows there (and a
lone row's products run as matrix-vector products), so one request alone on a `max_seqs` 8 server
decodes as fast as on an engine sized for one (BENCHMARKS.md); an accelerator's step barely grows
with its rows, and it keeps one bucket, `max_seqs`.
A decode-only step of a bucket below `max_seqs` picks its sampling mode at run time
(`sampling_switch`: a `lax.switch` over `sampling.MODES`, which runs only the chosen one) rather
than compiling one executable per mode; the `max_seqs` bucket keeps one per mode (there the
switch measured slower: BENCHMARKS.md). So the engine compiles one executable per (T, sampling
mode, LoRA on/off), all of them in `warmup`, plus the pools' initialization: (3 + 2) x 2 = 10 at
most with one bucket (a mixed step samples in two modes), (3 + 1 + 2) x 2 = 12 on a CPU.

Host side (`PagedEngine`): the page tables, the free list, reference counts and the prefix cache
(`pages.PagePool`). Each step plans decode tokens first (oldest sequence first), then prompt chunks
within what is left of the budget (a long prompt enters over several steps while running streams
keep getting a token every step). A sequence starting (or restarting) takes every leading full page
of its tokens the prefix cache holds (keyed by the tokens and the adapter's load: a reloaded id
never sees its predecessor's pages) and computes only the rest. Pages are allocated as positions
are reached; when none is left, the youngest other running sequence is preempted: its full pages
stay cached, the rest go back, and it restarts later from its tokens (prompt + what it drew, so
with the cache mostly a hit), keeping its sampling key and draw index: its output is what it would
have been. A request whose prompt + max_tokens cannot fit the whole pool is refused by `check`.

Sampling is the slot engine's (`sampling.sample`, per-row parameters, penalties over prompt +
generated tokens, key folded with the draw's index), so a seeded request draws what it draws there,
whatever its neighbours.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax import attention
from gemma_jax import lora as lora_lib
from gemma_jax import model as model_lib
from gemma_jax import params as params_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.adapters import AdapterSlots
from gemma_jax.engine.api import SamplingParams, check_limits
from gemma_jax.engine.pages import NULL_PAGE, PagePool
from gemma_jax.sampling import MODES, SamplingRows, check_params, mode_for, prompt_seen, rows_from_params, sample
from gemma_jax.sharding import make_mesh

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}
# One request per sampling mode, for `warmup` (checked against `mode_for` there).
_MODE_EXAMPLES = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                  SamplingParams(temperature=1.0, top_p=0.5))
_GREEDY = SamplingParams(temperature=0.0)
ANY_MODE = "any"  # `paged_step`'s static mode that samples in MODES[inputs.mode], chosen at run time


@flax.struct.dataclass
class StepInputs:
    """One step's flat batch (T tokens) and sampling rows (R), all built on the host."""

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, -1 for padding
    adapter_ids: jax.Array  # [T] int32 bank ids (0 = base model)
    batch: model_lib.PagedBatch  # pages / offsets [T], tables [R, M], seq_ids [T]
    logits_rows: jax.Array  # [R] int32: the token each row samples from
    live: jax.Array  # [R] bool: the row samples this step
    rows: SamplingRows  # [R]
    history: jax.Array  # [R, L] int32: prompt + generated tokens
    history_len: jax.Array  # [R] int32: how many of them
    prompt_len: jax.Array  # [R] int32: the first prompt_len are the prompt
    limit: jax.Array  # [R] int32: most tokens the row's request draws
    steps: jax.Array  # [] int32: decode steps to run (> 1 only for a decode-only batch, T = R)
    mode: jax.Array  # [] int32: index in MODES of the rows' sampling mode (read under mode ANY_MODE)


def paged_step(params, bank, cache: model_lib.PagedCache, x: StepInputs, *, config: GemmaConfig, mode: str,
               use_lora: bool, max_steps: int = 1, attn_impl: str = "xla", mixed_switch: bool = False):
    """The step (module docstring). mode: one of MODES, or ANY_MODE (a `lax.switch` over them on
    x.mode). mixed_switch: a mixed step (T > R) unembeds and samples no row, its one live row, or
    all R, by a `lax.switch` on the live count (else always all R: no conditional, for backends
    where one costs a host round trip). Returns (cache, drawn [max_steps, R] int32 (-1: nothing
    drawn), finish [R] int32: FINISH_NONE, FINISH_STOP or FINISH_LENGTH)."""
    vocab, r = config.vocab_size, x.live.shape[0]
    stop = jnp.asarray(config.stop_ids, jnp.int32)
    lora = (bank, x.adapter_ids) if use_lora else None
    rows_r = jnp.arange(r)

    def one(cache, tokens, positions, batch, live, history, history_len):
        hidden, cache = model_lib.forward_paged(params, tokens, positions, cache, batch, config=config, lora=lora,
                                                logits_rows=x.logits_rows, attn_impl=attn_impl, unembed=False)

        def draw(mode, sel, logits):  # rows sel [n] (None: all R), their logits [n, V] -> [n]
            pick = (lambda a: a) if sel is None else (lambda a: a[sel])
            hist, hist_len, prompt_len = pick(history), pick(history_len), pick(x.prompt_len)
            seen = prompt_seen(hist, hist_len, vocab)  # [n, V] prompt + generated
            index = jnp.arange(hist.shape[1])[None, :]
            generated = (index >= prompt_len[:, None]) & (index < hist_len[:, None])
            n = hist.shape[0]
            tokens_seen = jnp.where(generated, hist, vocab)  # [n, L], vocab: not a generated token
            counts = jnp.zeros((n, vocab), jnp.int32).at[jnp.arange(n)[:, None], tokens_seen].add(1, mode="drop")
            return sample(logits, jax.tree.map(pick, x.rows), seen, counts, hist_len - prompt_len, mode=mode)

        none_drawn = jnp.full((r,), -1, jnp.int32)

        def sampled(sel, hidden):  # the rows sel [n] (None: all R) of hidden [R, D] -> drawn [R] (-1 elsewhere)
            logits = model_lib.logits_from_hidden(params, hidden if sel is None else hidden[sel], config=config)
            if mode == ANY_MODE:  # the penalties' state is built inside each branch, as in a compiled mode
                drawn = jax.lax.switch(x.mode, [functools.partial(draw, m, sel) for m in MODES], logits)
            else:
                drawn = draw(mode, sel, logits)
            return drawn if sel is None else none_drawn.at[sel].set(drawn)

        if mixed_switch and tokens.shape[0] > r:  # a mixed step: most draw for no row, or for one
            lone = lambda h: sampled(jnp.argmax(live)[None], h)  # noqa: E731 - the one live row alone
            nothing = lambda h: none_drawn  # noqa: E731
            drawn = jax.lax.switch(jnp.minimum(jnp.sum(live), 2), [nothing, lone, functools.partial(sampled, None)],
                                   hidden)
        else:
            drawn = sampled(None, hidden)
        drawn = jnp.where(live, drawn, -1)
        n = history_len - x.prompt_len + 1  # tokens drawn, this one included
        finish = jnp.where(~live, FINISH_NONE, jnp.where(jnp.isin(drawn, stop), FINISH_STOP,
                                                         jnp.where(n >= x.limit, FINISH_LENGTH, FINISH_NONE)))
        history = history.at[rows_r, jnp.where(live, history_len, history.shape[1])].set(drawn, mode="drop")
        return cache, drawn, finish, history, history_len + live

    cache, drawn, finish, history, history_len = one(cache, x.tokens, x.positions, x.batch, x.live, x.history,
                                                     x.history_len)
    out = jnp.full((max_steps, r), -1, jnp.int32).at[0].set(drawn)
    if max_steps == 1:
        return cache, out, finish
    page_size, width = next(iter(cache.values())).k.shape[2], x.batch.tables.shape[1]

    def body(carry):  # decode-only: row r's token is token r
        i, cache, last, positions, live, finish, history, history_len, out = carry
        live = live & (finish == FINISH_NONE)
        positions = jnp.where(live, positions + 1, -1)
        column = jnp.clip(positions // page_size, 0, width - 1)
        batch = model_lib.PagedBatch(pages=jnp.where(live, x.batch.tables[rows_r, column], NULL_PAGE),
                                     offsets=jnp.where(live, positions % page_size, 0), tables=x.batch.tables,
                                     seq_ids=rows_r)
        cache, drawn, now, history, history_len = one(cache, last, positions, batch, live, history, history_len)
        finish = jnp.where(finish == FINISH_NONE, now, finish)
        return (i + 1, cache, jnp.where(live, drawn, last), positions, live, finish, history, history_len,
                out.at[i].set(drawn))

    def more(carry):  # steps left, and a row still running
        i, live, finish = carry[0], carry[4], carry[5]
        return (i < jnp.minimum(x.steps, max_steps)) & jnp.any(live & (finish == FINISH_NONE))

    carry = (jnp.asarray(1, jnp.int32), cache, jnp.where(x.live, drawn, x.tokens), x.positions, x.live, finish,
             history, history_len, out)
    _, cache, *_, finish, _, _, out = jax.lax.while_loop(more, body, carry)
    return cache, out, finish


def step_compiler_options(config: GemmaConfig, tokens: int) -> dict:
    """What to jit `paged_step` with for batches of up to `tokens` tokens (`model.paged_products`,
    `attention.compiler_options`): on a CPU, for an MHA model, XLA:CPU's YNNPACK fusions for dots
    only, so that each gathered KV page is read in place by the reduce-form products."""
    return attention.compiler_options(model_lib.paged_products(config, tokens))


@dataclasses.dataclass
class StepEvent:
    """What one sequence drew in a step: its tokens (a stop token included) and why it finished."""

    seq: int
    tokens: list[int]
    finish: str | None = None  # "stop" | "length" | None (still running)


@dataclasses.dataclass
class _Seq:
    id: int
    tokens: list[int]  # prompt + generated (a stop token is not appended)
    prompt_len: int
    max_tokens: int
    sampling: SamplingParams
    adapter: int  # bank id
    cache_key: int  # what prefix keys name for the adapter: its load, not its reusable id
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # positions whose K/V is written
    started: bool = False  # has taken its prefix-cache pages (again, after a preemption)
    drawn: int = 0  # tokens drawn, a stop token included


def _default_budget() -> int:
    """Mixed steps' token budget: a CPU's step time grows with every token, an accelerator's barely."""
    return 64 if jax.default_backend() == "cpu" else 512


def _default_decode_buckets(max_seqs: int) -> tuple[int, ...]:
    """Decode-only row counts: 1 and max_seqs on a CPU, max_seqs elsewhere (module docstring)."""
    return tuple(sorted({1, max_seqs})) if jax.default_backend() == "cpu" else (max_seqs,)


def _default_sampling_switch() -> bool:
    """Whether decode-only steps pick their sampling mode at run time: on a CPU (module docstring)."""
    return jax.default_backend() == "cpu"


def _default_decode_steps() -> int:
    """Decode steps per dispatch: a CPU's step dwarfs the host's work; an accelerator's does not."""
    return 1 if jax.default_backend() == "cpu" else 8


class PagedEngine:
    """The host loop around `paged_step` (module docstring). Not thread-safe, except the adapter
    calls: one thread (the scheduler's) adds, cancels and steps."""

    def __init__(self, config: GemmaConfig, params, *, max_seqs: int = 8, page_size: int = 16,
                 num_pages: int | None = None, token_budget: int | None = None, decode_steps: int | None = None,
                 mesh: Mesh | None = None, cache_dtype=None, adapter_slots: int = 0,
                 adapter_rank: int = lora_lib.DEFAULT_MAX_RANK, adapter_rank_buckets: Sequence[int] | None = None,
                 adapter_dtype=None, prefix_caching: bool = True, attention_impl: str = "xla",
                 memory_fraction: float = 0.5, seed: int | None = None,
                 decode_buckets: Sequence[int] | None = None, sampling_switch: bool | None = None):
        """max_seqs: sequences running at once (R); page_size: positions per page; num_pages: the
        pool (None: `memory_fraction` of an accelerator's free memory, or on a CPU room for max_seqs
        full-length sequences and one more); token_budget: a mixed step's tokens (None: 64 on a CPU,
        512 elsewhere); decode_steps: most decode steps per decode-only dispatch (None: 1 on a CPU,
        8 elsewhere); cache_dtype: the pools' dtype (default the params' compute dtype) or int8;
        decode_buckets: a decode-only step's row counts (None: 1 and max_seqs on a CPU, max_seqs
        elsewhere; max_seqs is always one); sampling_switch: run-time branches in the step (None:
        on a CPU, where a conditional runs in place): the decode-only executables of buckets below
        max_seqs choose the sampling mode at run time, one per bucket instead of one per bucket and
        mode, and a mixed step samples only the rows that draw (`paged_step`'s mixed_switch)."""
        limits = config.limits
        self.config = config
        self.max_seqs, self.page_size = int(max_seqs), int(page_size)
        buckets = _default_decode_buckets(self.max_seqs) if decode_buckets is None else decode_buckets
        if any(int(b) < 1 or int(b) > self.max_seqs for b in buckets):
            raise ValueError(f"decode_buckets must lie in [1, max_seqs={self.max_seqs}], not {list(buckets)}")
        self.decode_buckets = tuple(sorted({int(b) for b in buckets} | {self.max_seqs}))
        self.sampling_switch = _default_sampling_switch() if sampling_switch is None else bool(sampling_switch)
        self.budget = max(int(token_budget or _default_budget()), self.max_seqs)
        self.decode_steps = max(int(decode_steps or _default_decode_steps()), 1)
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, devices=jax.devices()[:1])
        self.params = self._place(params)
        compute = params["embedder"]["input_embedding"].dtype
        self.cache_dtype = jnp.dtype(cache_dtype or compute)
        if not (jnp.issubdtype(self.cache_dtype, jnp.floating) or self.cache_dtype == jnp.int8):
            raise ValueError(f"cache_dtype must be a float dtype or int8, not {self.cache_dtype}")
        self.max_len = int(limits.max_total_tokens)
        self.max_pages = -(-self.max_len // self.page_size)
        self.num_pages = int(num_pages or self._default_pages(memory_fraction))
        self.max_total = min(self.max_len, (self.num_pages - 1) * self.page_size)  # one sequence alone
        self.max_input = min(limits.max_input_tokens, self.max_total - 1)
        self.attention_impl = attention_impl
        self.prefix_caching = bool(prefix_caching)
        self._lora = AdapterSlots(config, adapter_slots=adapter_slots, rank=adapter_rank,
                                  dtype=adapter_dtype or compute, mesh=self.mesh, rank_buckets=adapter_rank_buckets)
        self._loads = collections.defaultdict(int)  # bank id -> its cache key (bumped at each load)
        self._load_count = 0
        self._rng = np.random.default_rng(seed)
        self._traces: collections.Counter[str] = collections.Counter()
        self._jit()
        self.reset()

    # -- construction ------------------------------------------------------------------------------
    def _place(self, params):
        shardings = params_lib.param_shardings(self.config, self.mesh, quantized=params_lib.quantization(params) or False)
        if jax.tree.structure(shardings) != jax.tree.structure(params):
            return params  # a tree the core does not know: the caller placed it
        return jax.device_put(params, shardings)

    def page_bytes(self) -> int:
        """Device bytes of one page over every layer (K and V, and an int8 pool's scales)."""
        cfg = self.config
        per = cfg.num_kv_heads * self.page_size * (cfg.head_dim * self.cache_dtype.itemsize
                                                   + (4 if self.cache_dtype == jnp.int8 else 0))
        return 2 * per * cfg.num_layers

    def _default_pages(self, fraction: float) -> int:
        """`fraction` of the first device's free memory in pages (each device holds 1 / model of a
        page when the kv heads split over "model"), at least one full-length sequence; on a CPU,
        room for max_seqs + 1 full-length sequences."""
        device = self.mesh.devices.flat[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and stats.get("bytes_limit"):
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            split = self.mesh.shape["model"] if self.config.num_kv_heads % self.mesh.shape["model"] == 0 else 1
            return max(int(free * fraction * split) // self.page_bytes(), self.max_pages + 1)
        return (self.max_seqs + 1) * self.max_pages + 1

    def _cache_sharding(self):
        model = self.mesh.shape["model"]
        heads = "model" if self.config.num_kv_heads % model == 0 else None
        pool = NamedSharding(self.mesh, PartitionSpec(None, heads, None, None))
        scale = NamedSharding(self.mesh, PartitionSpec(None, heads, None))
        quantized = self.cache_dtype == jnp.int8
        layer = model_lib.PagedLayer(pool, pool, scale if quantized else None, scale if quantized else None)
        return {f"layer_{i}": layer for i in range(self.config.num_layers)}

    def _jit(self) -> None:
        cfg, traces, impl = self.config, self._traces, self.attention_impl

        def step(params, bank, cache, inputs, *, mode, use_lora, max_steps):
            traces["step"] += 1
            return paged_step(params, bank, cache, inputs, config=cfg, mode=mode, use_lora=use_lora,
                              max_steps=max_steps, attn_impl=impl, mixed_switch=self.sampling_switch)

        def init():
            traces["init"] += 1
            return model_lib.init_paged_cache(cfg, self.num_pages, self.page_size, self.cache_dtype)

        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._cache_shardings = self._cache_sharding()
        options = step_compiler_options(cfg, self.budget) if impl == "xla" else {}
        self._step_jit = jax.jit(step, static_argnames=("mode", "use_lora", "max_steps"), donate_argnums=(2,),
                                 out_shardings=(self._cache_shardings, replicated, replicated),
                                 compiler_options=options)
        self._init_jit = jax.jit(init, out_shardings=self._cache_shardings)

    def reset(self) -> list[int]:
        """A fresh cache and pool (after a failed step: its cache was donated). Every sequence is
        dropped; returns their ids."""
        dropped = list(getattr(self, "_seqs", {}))
        self.cache = self._init_jit()
        self.pool = PagePool(self.num_pages, self.page_size)
        self._seqs: dict[int, _Seq] = {}
        self._next = getattr(self, "_next", 0)
        self._stats = collections.Counter(getattr(self, "_stats", {}))
        return dropped

    # -- limits and admission ----------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int, *, clip: bool = False) -> int:
        """`api.check_limits` with this engine's limits (a sequence must fit the whole pool alone)."""
        return check_limits(prompt_tokens, max_tokens, self.max_input, self.max_total, clip=clip)

    def can_add(self, prompt_tokens: int) -> bool:
        """Whether a new sequence of `prompt_tokens` may start now: a free row, and pages for its
        prompt beside what the sequences not yet started will need."""
        if len(self._seqs) >= self.max_seqs:
            return False
        waiting = sum(self.pool.pages_for(len(s.tokens)) for s in self._seqs.values() if not s.started)
        return self.pool.available() - waiting >= self.pool.pages_for(prompt_tokens + 1)

    def add(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams = _GREEDY,
            adapter: int = 0) -> int:
        """Start a sequence (`check` its size first); returns its id. A seed of None is drawn here,
        once, so every step of the sequence uses the same key. ValueError if it cannot be served."""
        ids = [int(t) for t in prompt_ids]
        if not ids or min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        self.check(len(ids), int(max_tokens))
        check_params(sampling)
        if len(self._seqs) >= self.max_seqs:
            raise ValueError(f"at most {self.max_seqs} sequences at once")
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int(self._rng.integers(0, 2**63)))
        seq = _Seq(self._next, ids, len(ids), int(max_tokens), sampling, int(adapter), self._loads[int(adapter)])
        self._seqs[seq.id] = seq
        self._next += 1
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Drop a running sequence (its full pages stay in the prefix cache)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._release(seq)

    def busy(self) -> bool:
        return bool(self._seqs)

    def running(self) -> int:
        return len(self._seqs)

    # -- one step ----------------------------------------------------------------------------------
    def _start(self, seq: _Seq) -> None:
        """Take the prefix cache's leading pages of the sequence's tokens (all but its last token)."""
        seq.started = True
        if self.prefix_caching:
            seq.pages = self.pool.match_prefix(seq.tokens, seq.cache_key, limit=(len(seq.tokens) - 1) // self.page_size)
            seq.computed = len(seq.pages) * self.page_size

    def _preempt(self, seq: _Seq) -> None:
        """Give back its pages (full ones stay cached); it restarts later from its tokens."""
        self._release(seq)
        seq.pages, seq.computed, seq.started = [], 0, False
        self._stats["preemptions"] += 1

    def _grow(self, seq: _Seq, positions: int, order: list[_Seq], planned: set[int]) -> bool:
        """Pages for `positions` positions of `seq`, preempting the youngest sequence not planned
        this step when the pool is short. False if even that leaves too few."""
        need = self.pool.pages_for(positions) - len(seq.pages)
        while need > self.pool.available():
            victims = [s for s in order if s.id not in planned and s is not seq and s.pages]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda s: s.id))
        if need > 0:
            seq.pages += self.pool.allocate(need)
        return True

    def _plan(self, steps: int) -> tuple[list[tuple[_Seq, int]], int]:
        """(sequence, tokens it feeds) this step, decode tokens first, and the decode steps to run."""
        order = sorted(self._seqs.values(), key=lambda s: s.id)
        for seq in order:
            if not seq.started:
                self._start(seq)
        decoding = [s for s in order if len(s.tokens) - s.computed == 1]
        if steps > 1 and len(decoding) == len(order):  # decode only: pages for `steps` positions ahead
            ahead = [min(steps, s.max_tokens - s.drawn) for s in order]
            if sum(max(self.pool.pages_for(s.computed + k) - len(s.pages), 0)
                   for s, k in zip(order, ahead)) <= self.pool.available():
                for s, k in zip(order, ahead):
                    self._grow(s, s.computed + k, order, set())
                return [(s, 1) for s in order], steps
        plan, planned, left = [], set(), self.budget
        for seq in decoding + [s for s in order if len(s.tokens) - s.computed > 1]:
            if seq.id not in self._seqs or not seq.started:  # preempted earlier in this plan
                continue
            want = min(len(seq.tokens) - seq.computed, left)
            if want <= 0:
                break
            if not self._grow(seq, seq.computed + want, order, planned):
                if len(seq.tokens) - seq.computed == 1:
                    self._preempt(seq)  # a decode that cannot go on waits, its pages freed for others
                continue
            plan.append((seq, want))
            planned.add(seq.id)
            left -= want
        return plan, 1

    def step(self, steps: int | None = None) -> list[StepEvent]:
        """One dispatch: a mixed step, or when every sequence decodes, up to `steps` decode steps
        (default `decode_steps`). Returns what each sequence that drew drew; finished sequences are
        gone (their pages released) when it returns."""
        plan, steps = self._plan(self.decode_steps if steps is None else max(int(steps), 1))
        if not plan:
            raise RuntimeError("no sequence can run: the pool cannot hold even one")
        decode_only = all(want == 1 and len(s.tokens) - s.computed == 1 for s, want in plan)
        r = self._rows(len(plan)) if decode_only else self.max_seqs
        t, m = (r if decode_only else self.budget), self.max_pages
        tokens, positions = np.zeros(t, np.int32), np.full(t, -1, np.int32)
        pages, offsets = np.full(t, NULL_PAGE, np.int32), np.zeros(t, np.int32)
        seq_ids, adapter_ids = np.zeros(t, np.int32), np.zeros(t, np.int32)
        tables = np.full((r, m), NULL_PAGE, np.int32)
        logits_rows, live = np.zeros(r, np.int32), np.zeros(r, bool)
        history, history_len = np.zeros((r, self.max_len), np.int32), np.zeros(r, np.int32)
        prompt_len, limit = np.zeros(r, np.int32), np.ones(r, np.int32)
        sampling = [_GREEDY] * r
        samplers, n = {}, 0
        for row, (seq, want) in enumerate(plan):
            span = np.arange(seq.computed, seq.computed + want)
            tokens[n:n + want] = seq.tokens[seq.computed:seq.computed + want]
            positions[n:n + want] = span
            pages[n:n + want] = np.asarray(seq.pages)[span // self.page_size]
            offsets[n:n + want] = span % self.page_size
            seq_ids[n:n + want], adapter_ids[n:n + want] = row, seq.adapter
            tables[row, :len(seq.pages)] = seq.pages
            if seq.computed + want == len(seq.tokens):  # its last token is in: it draws
                logits_rows[row], live[row] = n + want - 1, True
                history[row, :len(seq.tokens)] = seq.tokens
                history_len[row], prompt_len[row] = len(seq.tokens), seq.prompt_len
                limit[row], sampling[row] = seq.max_tokens, seq.sampling
                samplers[row] = seq
            n += want
        mode = self._mode(mode_for([s.sampling for s in samplers.values()]) if samplers else MODES[0], decode_only)
        use_lora = self.bank is not None and any(s.adapter for s, _ in plan)
        inputs = StepInputs(tokens, positions, adapter_ids, model_lib.PagedBatch(pages, offsets, tables, seq_ids),
                            logits_rows, live, rows_from_params(sampling), history, history_len, prompt_len, limit,
                            np.asarray(steps if decode_only else 1, np.int32), np.asarray(MODES.index(mode), np.int32))
        if decode_only and self._switches(t):
            mode = ANY_MODE
        drawn, finish = self._dispatch(inputs, mode=mode, use_lora=use_lora,
                                       max_steps=self.decode_steps if decode_only else 1)
        self._stats["steps"] += 1
        self._stats["tokens_fed"] += n
        events = []
        for seq, want in plan:
            seq.computed += want
        for row, seq in samplers.items():
            got = [int(v) for v in drawn[:, row] if v >= 0]
            seq.drawn += len(got)
            reason = REASONS.get(int(finish[row]))
            kept = got[:-1] if reason == "stop" else got
            seq.tokens += kept
            seq.computed += len(got) - 1  # a multi-step dispatch fed each drawn token but the last
            events.append(StepEvent(seq.id, got, reason))
            if reason is not None:
                del self._seqs[seq.id]
                self._release(seq)
        for seq, _ in plan:
            if seq.id in self._seqs:
                self._register(seq)
        return events

    def _switches(self, t: int) -> bool:
        """Whether the decode-only executable of bucket t picks its sampling mode at run time."""
        return self.sampling_switch and t < self.max_seqs

    def _rows(self, n: int) -> int:
        """A decode-only step's rows for n sequences: the smallest bucket that holds them."""
        return next(b for b in self.decode_buckets if b >= n)

    @staticmethod
    def _mode(mode: str, decode_only: bool) -> str:
        """The compiled sampling mode of a step: a mixed step's cost is its prompt chunk, not its
        draws, so it samples "sampled" rows in the widest mode (the same draws: `sampling.sample`)
        and compiles two modes instead of three."""
        return MODES[-1] if mode == "sampled" and not decode_only else mode

    def _dispatch(self, inputs: StepInputs, **static) -> tuple[np.ndarray, np.ndarray]:
        with self._lora.lock:
            self.cache, drawn, finish = self._step_jit(self.params, self.bank, self.cache, inputs, **static)
        return np.asarray(drawn), np.asarray(finish)

    def run(self) -> dict[int, list[int]]:
        """Step until every sequence finished; each sequence's drawn tokens (a stop token included)."""
        out = collections.defaultdict(list)
        while self.busy():
            for event in self.step():
                out[event.seq] += event.tokens
        return dict(out)

    def _register(self, seq: _Seq) -> None:
        """The full pages `seq` has written so far join the prefix cache."""
        if self.prefix_caching:
            full = min(seq.computed, len(seq.tokens)) // self.page_size
            self.pool.register(seq.pages[:full], seq.tokens[:full * self.page_size], seq.cache_key)

    def _release(self, seq: _Seq) -> None:
        self._register(seq)
        self.pool.release(seq.pages)
        seq.pages = []

    # -- compiles ----------------------------------------------------------------------------------
    def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compile every executable serving can reach: each decode-only bucket (in each sampling mode,
        or in one where it switches: `_switches`), the mixed budget in two modes (`_mode`), each
        with LoRA on and off when there is a bank, by running an all-padding step (it writes only
        the trash page). progress(compiled, total) before the first and after each compile:
        executables compiled, the pools' initialization included, of what a fresh engine compiles
        by the end of its warmup."""
        examples = {mode_for([s]): s for s in _MODE_EXAMPLES}
        if set(examples) != set(MODES):
            raise AssertionError(f"warmup examples cover {sorted(examples)}, not every mode of {MODES}")
        examples[ANY_MODE] = _GREEDY
        variants = {(self.budget, self.max_seqs, 1, self._mode(m, False)) for m in MODES}
        variants |= {(b, b, self.decode_steps, m) for b in self.decode_buckets
                     for m in ((ANY_MODE,) if self._switches(b) else MODES)}
        loras = (False, True) if self.bank is not None else (False,)
        plan = [(t, r, k, m, u) for t, r, k, m in sorted(variants) for u in loras]
        before, others = self._traces["step"], sum(self._traces.values()) - self._traces["step"]
        report = (lambda: progress(others + self._traces["step"] - before, others + len(plan))) if progress else (
            lambda: None)
        report()
        for t, r, k, mode, use_lora in plan:
            self._dispatch(self._padding_inputs(t, examples[mode], r), mode=mode, use_lora=use_lora, max_steps=k)
            report()

    def _padding_inputs(self, t: int, sampling: SamplingParams, r: int | None = None) -> StepInputs:
        """An all-padding step of T = t tokens and r sampling rows (default max_seqs)."""
        r = self.max_seqs if r is None else r
        z = lambda *shape: np.zeros(shape, np.int32)
        batch = model_lib.PagedBatch(z(t), z(t), z(r, self.max_pages), z(t))
        return StepInputs(z(t), np.full(t, -1, np.int32), z(t), batch, z(r), np.zeros(r, bool),
                          rows_from_params([dataclasses.replace(sampling, seed=0)] * r), z(r, self.max_len), z(r),
                          z(r), np.ones(r, np.int32), np.asarray(1, np.int32), np.asarray(0, np.int32))

    def compile_counts(self) -> dict[str, int]:
        """Traces per device function so far (each is one compile)."""
        return dict(self._traces)

    def stats(self) -> dict[str, int]:
        """Pages (total, free, cached), prefix-cache hits / misses / evictions (in pages),
        preemptions, steps, running sequences."""
        pool = self.pool
        return dict(kv_pages=self.num_pages - 1, kv_pages_available=pool.available(),
                    kv_pages_cached=pool.cached_count(), prefix_hits=pool.stats.hits,
                    prefix_misses=pool.stats.misses, prefix_evictions=pool.stats.evictions,
                    preemptions=self._stats["preemptions"], steps=self._stats["steps"],
                    tokens_fed=self._stats["tokens_fed"], running=len(self._seqs))

    # -- LoRA adapters -------------------------------------------------------------------------------
    @property
    def bank(self) -> lora_lib.AdapterBank | None:
        return self._lora.bank

    @property
    def adapter_slots(self) -> int:
        return self._lora.adapter_slots

    def load_adapter(self, name: str, adapter: "lora_lib.Adapter | str | os.PathLike", *,
                     require_model_type: bool = False) -> int:
        """`AdapterSlots.load`; the id's prefix-cache key changes, so no page of an adapter that
        held the id before is ever matched."""
        index = self._lora.load(name, adapter, require_model_type=require_model_type)
        self._load_count += 1
        self._loads[index] = self._load_count
        return index

    def unload_adapter(self, name: str) -> None:
        self._lora.unload(name)

    def adapters(self) -> dict[str, int]:
        return self._lora.names()

    def adapter_id(self, name: str) -> int:
        return self._lora.id_of(name)
