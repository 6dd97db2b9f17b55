"""One compiled step for every batch: a paged, chunked-prefill, prefix-caching engine core (issue 17).

    engine = PagedEngine(config, params, num_pages=64, page_size=16, token_budget=64, max_seqs=8)
    a = engine.add(prompt_ids, max_tokens=32, sampling=SamplingParams(temperature=0.0))
    while engine.busy(): engine.step()          # or engine.run() -> {id: drawn tokens}

Every step is one call of one compiled function, `paged_step`, over a flat batch of at most
`token_budget` tokens: first one decode token of each running sequence, then prompt chunks (a
prompt longer than what is left of the budget enters over several steps, so decoding sequences get
a token every step), padded to the budget. The KV cache is a page pool per layer
(`model.init_paged_cache`); the host (`pages.PagePool`) owns the page tables, the free list, the
reference counts and the prefix cache: a new sequence takes every leading full page it matches
(keyed by the tokens and the adapter) and prefills only the rest. Sampling is the slot engine's
(`sampling.sample`, per-row parameters, penalties over prompt + generated tokens, key folded with
the token's index in its request), so a seeded request draws what it draws there.

Compiles: one per (sampling mode, LoRA on/off) used: the shapes never change. Not yet: the
scheduler and server drive the slot engine (`engine.py`); this core has no preemption (a sequence
that finds no free page waits), float caches only, and no multi-step decode per dispatch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import lora as lora_lib
from gemma_jax import model as model_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.pages import NULL_PAGE, PagePool
from gemma_jax.sampling import (
    MODES, SamplingParams, SamplingRows, mode_for, prompt_seen, rows_from_params, sample,
)


def paged_step(params, bank, cache: model_lib.PagedCache, tokens: jax.Array, positions: jax.Array,
               batch: model_lib.PagedBatch, adapter_ids: jax.Array, logits_rows: jax.Array, rows: SamplingRows,
               history: jax.Array, history_len: jax.Array, prompt_len: jax.Array, *, config: GemmaConfig,
               mode: str, use_lora: bool) -> tuple[model_lib.PagedCache, jax.Array]:
    """One step: the flat batch's forward (K/V written into `cache`), then one draw per sampling row.

    tokens, positions, adapter_ids [T]; batch: where each token's K/V goes and what it reads;
    logits_rows [R]: the token whose logits row r samples from; rows: R sampling rows; history
    [R, L] each row's prompt + generated tokens (history_len [R] of them, the first prompt_len [R]
    the prompt): the penalties' state and the draw's index (history_len - prompt_len). Returns
    (cache, drawn [R] int32)."""
    lora = (bank, adapter_ids) if use_lora else None
    logits, cache = model_lib.forward_paged(params, tokens, positions, cache, batch, config=config, lora=lora,
                                            logits_rows=logits_rows)
    vocab = config.vocab_size
    seen = prompt_seen(history, history_len, vocab)  # [R, V] prompt + generated
    index = jnp.arange(history.shape[1])[None, :]
    generated = (index >= prompt_len[:, None]) & (index < history_len[:, None])
    idx = jnp.where(generated, history, vocab)
    counts = jnp.zeros((history.shape[0], vocab), jnp.int32).at[jnp.arange(history.shape[0])[:, None], idx].add(
        1, mode="drop")
    drawn = sample(logits, rows, seen, counts, history_len - prompt_len, mode=mode)
    return cache, drawn


@dataclasses.dataclass
class _Seq:
    id: int
    tokens: list[int]  # prompt + generated (the stop token, if drawn, is not appended)
    prompt_len: int
    max_tokens: int
    sampling: SamplingParams
    adapter: int
    pages: list[int]
    computed: int  # positions whose K/V is written
    generated: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None  # "stop" | "length"


class PagedEngine:
    """The host loop around `paged_step` (module docstring)."""

    def __init__(self, config: GemmaConfig, params, *, num_pages: int, page_size: int, token_budget: int,
                 max_seqs: int, bank: lora_lib.AdapterBank | None = None, prefix_caching: bool = True,
                 seed: int = 0):
        self.config, self.params, self.bank = config, params, bank
        self.page_size, self.budget, self.max_seqs = int(page_size), int(token_budget), int(max_seqs)
        self.pool = PagePool(num_pages, page_size)
        self.prefix_caching = prefix_caching
        self.max_len = config.limits.max_total_tokens
        self.max_pages = -(-self.max_len // self.page_size)
        dtype = params["embedder"]["input_embedding"].dtype
        self.cache = model_lib.init_paged_cache(config, num_pages, page_size, dtype)
        self._rng = np.random.default_rng(seed)
        self._seqs: dict[int, _Seq] = {}
        self._done: dict[int, _Seq] = {}
        self._next = 0
        self._traces = 0

        def step(*args, mode, use_lora):
            self._traces += 1
            return paged_step(*args, config=config, mode=mode, use_lora=use_lora)

        self._step = jax.jit(step, static_argnames=("mode", "use_lora"), donate_argnums=(2,))

    # -- requests ---------------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
            adapter: int = 0) -> int:
        """Queue a sequence; its leading full pages come from the prefix cache where they match."""
        ids = [int(t) for t in prompt_ids]
        if not ids or len(ids) + max_tokens > self.max_len or max_tokens < 1:
            raise ValueError(f"prompt of {len(ids)} tokens + {max_tokens} must fit {self.max_len} positions")
        if len(self._seqs) >= self.max_seqs:
            raise ValueError(f"at most {self.max_seqs} sequences at once")
        pages = (self.pool.match_prefix(ids, adapter, limit=(len(ids) - 1) // self.page_size)
                 if self.prefix_caching else [])
        if sampling.seed is None:  # drawn once, so every step of the sequence uses the same key
            sampling = dataclasses.replace(sampling, seed=int(self._rng.integers(0, 2**63)))
        seq = _Seq(self._next, ids, len(ids), int(max_tokens), sampling, int(adapter), pages,
                   computed=len(pages) * self.page_size)
        self._seqs[seq.id] = seq
        self._next += 1
        return seq.id

    def busy(self) -> bool:
        return bool(self._seqs)

    def result(self, seq_id: int) -> tuple[list[int], str]:
        seq = self._done[seq_id]
        return seq.generated, seq.finish

    def run(self) -> dict[int, list[int]]:
        while self.busy():
            self.step()
        return {i: s.generated for i, s in self._done.items()}

    def compile_count(self) -> int:
        return self._traces

    # -- one step ---------------------------------------------------------------------------------
    def _plan(self) -> list[tuple[_Seq, int]]:
        """(sequence, tokens it feeds this step): decode tokens first, then prompt chunks."""
        plan, left = [], self.budget
        order = sorted(self._seqs.values(), key=lambda s: (len(s.tokens) - s.computed > 1, s.id))
        for seq in order:
            want = min(len(seq.tokens) - seq.computed, left)
            if want <= 0:
                continue
            need = self.pool.pages_for(seq.computed + want) - len(seq.pages)
            fresh = self.pool.allocate(need) if need > 0 else []
            if fresh is None:  # no page free: it waits (no preemption yet)
                continue
            seq.pages += fresh
            plan.append((seq, want))
            left -= want
        return plan

    def step(self) -> list[tuple[int, int]]:
        """One compiled step; returns the (sequence id, token) pairs drawn in it."""
        plan = self._plan()
        if not plan:
            raise RuntimeError("no sequence can run: every page is taken (no preemption yet)")
        t, r = self.budget, self.max_seqs
        tokens, positions = np.zeros(t, np.int32), np.full(t, -1, np.int32)
        pages, offsets = np.full(t, NULL_PAGE, np.int32), np.zeros(t, np.int32)
        seq_ids, adapter_ids = np.zeros(t, np.int32), np.zeros(t, np.int32)
        tables = np.full((r, self.max_pages), NULL_PAGE, np.int32)
        logits_rows, history = np.zeros(r, np.int32), np.zeros((r, self.max_len), np.int32)
        history_len, prompt_len = np.zeros(r, np.int32), np.zeros(r, np.int32)
        sampling = [SamplingParams(temperature=0.0)] * r
        samplers, n = [], 0
        for row, (seq, want) in enumerate(plan):
            span = np.arange(seq.computed, seq.computed + want)
            tokens[n:n + want] = seq.tokens[seq.computed:seq.computed + want]
            positions[n:n + want] = span
            pages[n:n + want] = np.asarray(seq.pages)[span // self.page_size]
            offsets[n:n + want] = span % self.page_size
            seq_ids[n:n + want], adapter_ids[n:n + want] = row, seq.adapter
            tables[row, :len(seq.pages)] = seq.pages
            if seq.computed + want == len(seq.tokens):  # its last token is in: it draws
                logits_rows[row] = n + want - 1
                history[row, :len(seq.tokens)] = seq.tokens
                history_len[row], prompt_len[row] = len(seq.tokens), seq.prompt_len
                sampling[row] = seq.sampling
                samplers.append((row, seq))
            n += want
        mode = mode_for([s.sampling for _, s in samplers]) if samplers else MODES[0]
        use_lora = self.bank is not None and any(s.adapter for s, _ in plan)
        batch = model_lib.PagedBatch(pages=pages, offsets=offsets, tables=tables, seq_ids=seq_ids)
        self.cache, drawn = self._step(self.params, self.bank, self.cache, tokens, positions, batch, adapter_ids,
                                       logits_rows, rows_from_params(sampling), history, history_len, prompt_len,
                                       mode=mode, use_lora=use_lora)
        drawn = np.asarray(drawn)
        for seq, want in plan:
            seq.computed += want
        out = []
        for row, seq in samplers:
            token = int(drawn[row])
            out.append((seq.id, token))
            if token in self.config.stop_ids:
                self._finish(seq, "stop")
                continue
            seq.generated.append(token)
            seq.tokens.append(token)
            if len(seq.generated) >= seq.max_tokens:
                self._finish(seq, "length")
        for seq, _ in plan:
            if seq.finish is None:
                self._register(seq)
        return out

    def _register(self, seq: _Seq) -> None:
        """The full pages `seq` has written so far join the prefix cache."""
        if self.prefix_caching:
            full = seq.computed // self.page_size
            self.pool.register(seq.pages[:full], seq.tokens[:full * self.page_size], seq.adapter)

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.finish = reason
        self._register(seq)
        self.pool.release(seq.pages)
        del self._seqs[seq.id]
        self._done[seq.id] = seq
