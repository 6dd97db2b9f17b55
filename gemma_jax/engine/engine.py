"""The engine: three jit-compiled device functions over fixed decode slots, JetStream's shape.

    prefill(tokens [P, T], lengths [P], rows, limit [P], adapter_ids [P]) -> Prefix
    insert(prefix, state, slots [P]) -> state                        (state donated)
    generate(state, longest) -> (state, tokens [K, B])                (state donated)
    release(state, slots) -> state                                    (state donated)
    load_adapter(name, adapter) -> id / unload_adapter(name)          (LoRA bank slot, hot)

What makes it fast on a GPU (see shared/BASELINES.md):
- `generate` runs K decode steps per dispatch in a `lax.fori_loop` and packs the K x B tokens into
  one array whose host copy starts at once (`copy_to_host_async`): one host round trip per K tokens.
- Attention reads only a *kv bucket* covering the longest active length (`forward(kv_len=...)`), not
  the whole cache; the caller passes an upper bound of the longest slot and the engine rounds it up.
- Sampling parameters, RNG keys, penalty state, token budgets and stop tests live on the device in
  the `DecodeState`; nothing crosses to the device per step.
- Prefill computes logits only at each prompt's last position (the unembedding of all T positions
  would cost a [P, T, V] tensor: 2 GiB for a 2048-token Gemma 3 prompt).
- Layers stay unrolled (the model's Python loop); no `lax.scan` over stacked weights.

LoRA: with `adapter_slots` > 0 the engine holds a `lora.AdapterBank` on device and passes it, with
each row's adapter id, to every prefill and decode step (id 0 = base model), so one batch mixes
adapters. Loading or unloading an adapter rewrites one bank slot in place (same shapes: nothing that
takes the bank recompiles). An unloaded adapter's name disappears at once, but its slot keeps its
weights until a later load reuses it (free slots are reused oldest-freed first), so requests already
admitted or queued on it finish as they started. With `adapter_slots=0` the model runs with
lora=None: no per-token LoRA cost at all. See docs/lora.md for the bank vs a merged copy.

Shapes are bucketed so the number of compilations is bounded: prompts pad to `prefill_buckets`
(T), prefill batches to `prefill_batches` (P, with P * T within the batch prefill budget), the
attention span to `kv_buckets`. `compile_counts()` counts traces of each function for tests.

The same code runs on one CPU, a fake multi-device CPU mesh, a GPU: slots are split over the mesh's
"data" axis and heads over "model" (`state.state_shardings`, `params.param_shardings`); every
function pins its output shardings so a steady state never sees a new layout (or a recompile).
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax import lora as lora_lib
from gemma_jax import params as params_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.api import SamplingParams, UnknownAdapter, check_limits
from gemma_jax.engine.state import DecodeState, Prefix, init_decode_state, state_shardings
from gemma_jax.model import LayerCache, forward, init_cache
from gemma_jax.sampling import SamplingRows, prompt_seen, rows_from_params, sample, update_penalty_state
from gemma_jax.sharding import make_mesh

_PAD_ROW = SamplingParams(temperature=0.0)  # sampling of the padding rows of a prefill batch


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out


class Engine:
    """Device functions over `slots` fixed decode slots of `max_len` positions each.

    params: the model's parameter tree (placed on `mesh` with `param_shardings` if not already).
    mesh: a ("data", "model") mesh; None means the first device alone.
    adapter_resolver: name -> adapter id (> 0) or None, consulted for names not loaded here.
    adapter_slots: how many LoRA adapters the bank holds at once (0: no bank, no LoRA cost);
    adapter_rank: the bank's maximum rank (higher ranks are refused); adapter_dtype: the bank's
    dtype (default: the params' dtype).
    """

    def __init__(self, config: GemmaConfig, params, *, slots: int, max_len: int | None = None,
                 mesh: Mesh | None = None, prefill_buckets: Sequence[int] | None = None,
                 prefill_batches: Sequence[int] = (1, 2, 4, 8), steps_per_call: int = 8,
                 kv_buckets: Sequence[int] | None = None, cache_dtype=None,
                 adapter_resolver: Callable[[str], int | None] | None = None,
                 adapter_slots: int = 0, adapter_rank: int = lora_lib.DEFAULT_MAX_RANK, adapter_dtype=None):
        limits = config.limits
        self.config = config
        self.slots = int(slots)
        self.max_len = int(max_len or limits.max_total_tokens)
        self.max_total = min(limits.max_total_tokens, self.max_len)
        want_input = min(limits.max_input_tokens, self.max_total - 1)
        if prefill_buckets is None:
            top = min(-(-want_input // 128) * 128 if want_input > 128 else want_input, self.max_len)
            prefill_buckets = _pow2_buckets(32, top) + [top]
        self.prefill_buckets = tuple(sorted(set(int(b) for b in prefill_buckets)))
        if self.prefill_buckets[-1] > self.max_len:
            raise ValueError(f"prefill bucket {self.prefill_buckets[-1]} exceeds max_len {self.max_len}")
        self.max_input = min(want_input, self.prefill_buckets[-1])
        self.prefill_budget = limits.max_batch_prefill_tokens
        self.prefill_batches = tuple(sorted({1, *(int(b) for b in prefill_batches if b <= self.slots)}))
        self.steps = int(steps_per_call)
        if kv_buckets is None:
            kv_buckets = _pow2_buckets(128, self.max_len)
        self.kv_buckets = tuple(sorted({*(int(b) for b in kv_buckets if b < self.max_len), self.max_len}))
        self.adapter_resolver = adapter_resolver

        self.mesh = mesh if mesh is not None else make_mesh(1, 1, devices=jax.devices()[:1])
        self.params = self._place_params(params)
        self.cache_dtype = jnp.dtype(cache_dtype or params["embedder"]["input_embedding"].dtype)
        self.state_sharding = state_shardings(config, self.slots, self.max_len, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._stop_ids = tuple(int(i) for i in config.stop_ids)
        self._traces: collections.Counter[str] = collections.Counter()

        self._init_jit = jax.jit(self._init_impl, out_shardings=self.state_sharding)
        self._prefill_jit = jax.jit(self._prefill_impl)
        self._insert_jit = jax.jit(self._insert_impl, donate_argnums=(1,), out_shardings=self.state_sharding)
        self._generate_jit = jax.jit(self._generate_impl, static_argnums=(3,), donate_argnums=(2,),
                                     out_shardings=(self.state_sharding, replicated))
        self._release_jit = jax.jit(self._release_impl, donate_argnums=(0,), out_shardings=self.state_sharding)

        # LoRA bank: slot 0 is "no adapter"; names -> slots; free slots, oldest-freed first.
        self.bank: lora_lib.AdapterBank | None = None
        if adapter_slots > 0:
            dtype = adapter_dtype or params["embedder"]["input_embedding"].dtype
            self.bank = lora_lib.make_bank(config, int(adapter_slots) + 1, int(adapter_rank), dtype, self.mesh)
        self._adapters: dict[str, int] = {}
        self._free = collections.deque(range(1, int(adapter_slots) + 1))
        self._bank_lock = threading.Lock()  # bank updates (donated) vs dispatches that read it

    def _place_params(self, params):
        shardings = params_lib.param_shardings(self.config, self.mesh)
        if jax.tree.structure(shardings) != jax.tree.structure(params):
            return params  # a tree the core does not know (e.g. quantized): the caller placed it
        return jax.device_put(params, shardings)

    # -- traced functions (each bumps a trace counter: a retrace is a compile) ---------------------
    def _init_impl(self):
        self._traces["init"] += 1
        return init_decode_state(self.config, self.slots, self.max_len, self.cache_dtype)

    def _prefill_impl(self, params, bank, tokens, lengths, rows: SamplingRows, limit, adapter_ids) -> Prefix:
        self._traces["prefill"] += 1
        cfg = self.config
        p, t = tokens.shape  # [P, T]
        index = jnp.arange(t)[None, :]
        positions = jnp.where(index < lengths[:, None], index, t)  # padding writes are dropped
        cache = init_cache(cfg, p, t, self.cache_dtype)
        lora = None if bank is None else (bank, adapter_ids)
        logits, cache = forward(params, tokens, positions, cache, config=cfg, lora=lora, logits_at=lengths - 1)
        logits = logits[:, 0]  # [P, V]: each prompt's last position only
        seen = prompt_seen(tokens, lengths, cfg.vocab_size)  # [P, V]
        counts = jnp.zeros((p, cfg.vocab_size), jnp.int32)
        first = sample(logits, rows, seen, counts, jnp.zeros((p,), jnp.int32))  # [P]
        seen, counts = update_penalty_state(seen, counts, first)
        done = jnp.isin(first, jnp.asarray(self._stop_ids)) | (limit <= 1)
        return Prefix(cache=cache, lengths=lengths, tokens=first, rows=rows, seen=seen, counts=counts,
                      limit=limit, adapter_ids=adapter_ids, done=done)

    def _insert_impl(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        self._traces["insert"] += 1
        put = lambda dst, src: dst.at[slots].set(src, mode="drop")  # slot == B: a padding row
        cache = {}
        for name, layer in state.cache.items():
            t = prefix.cache[name].k.shape[2]  # [P, K, T, H] into [B, K, S, H]
            cache[name] = LayerCache(k=layer.k.at[slots, :, :t].set(prefix.cache[name].k, mode="drop"),
                                     v=layer.v.at[slots, :, :t].set(prefix.cache[name].v, mode="drop"))
        ones = jnp.ones_like(prefix.lengths)
        return state.replace(
            cache=cache, lengths=put(state.lengths, prefix.lengths), tokens=put(state.tokens, prefix.tokens),
            rows=jax.tree.map(put, state.rows, prefix.rows), seen=put(state.seen, prefix.seen),
            counts=put(state.counts, prefix.counts), step=put(state.step, ones), limit=put(state.limit, prefix.limit),
            adapter_ids=put(state.adapter_ids, prefix.adapter_ids), active=put(state.active, ones.astype(bool)),
            done=put(state.done, prefix.done))

    def _generate_impl(self, params, bank, state: DecodeState, kv_len: int):
        self._traces["generate"] += 1
        cfg, stop = self.config, jnp.asarray(self._stop_ids)

        def step(i, carry):
            st, out = carry
            live = st.live  # [B]
            positions = jnp.where(live, st.lengths, self.max_len)[:, None]  # idle slots write nothing
            lora = None if bank is None else (bank, st.adapter_ids)
            logits, cache = forward(params, st.tokens[:, None], positions, st.cache, config=cfg, kv_len=kv_len,
                                    lora=lora)
            drawn = sample(logits[:, 0], st.rows, st.seen, st.counts, st.step)  # [B]
            drawn = jnp.where(live, drawn, -1)
            seen, counts = update_penalty_state(st.seen, st.counts, drawn)  # -1 is ignored
            n = st.step + live
            done = st.done | (live & (jnp.isin(drawn, stop) | (n >= st.limit)))
            st = st.replace(cache=cache, lengths=st.lengths + live, tokens=jnp.where(live, drawn, st.tokens),
                            seen=seen, counts=counts, step=n, done=done)
            return st, out.at[i].set(drawn)

        out = jnp.full((self.steps, self.slots), -1, jnp.int32)  # [K, B]
        return jax.lax.fori_loop(0, self.steps, step, (state, out))

    def _release_impl(self, state: DecodeState, mask) -> DecodeState:
        self._traces["release"] += 1
        return state.replace(active=state.active & ~mask, done=state.done | mask)

    # -- device functions (host wrappers) ---------------------------------------------------------
    def init_state(self) -> DecodeState:
        """A decode state with every slot free, created directly on the mesh."""
        return self._init_jit()

    def prefill(self, tokens, lengths, rows: SamplingRows, limit=None, adapter_ids=None) -> Prefix:
        """Prefill P padded prompts (tokens [P, T], lengths [P]) and draw each one's first token."""
        tokens = np.asarray(tokens, np.int32)
        p = tokens.shape[0]
        lengths = np.asarray(lengths, np.int32)
        limit = self.max_total - lengths if limit is None else np.asarray(limit, np.int32)
        adapter_ids = np.zeros((p,), np.int32) if adapter_ids is None else np.asarray(adapter_ids, np.int32)
        with self._bank_lock:
            prefix = self._prefill_jit(self.params, self.bank, tokens, lengths, rows, limit, adapter_ids)
        prefix.tokens.copy_to_host_async()
        return prefix

    def insert(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        """Put the prefix's rows into `slots` ([P]; a slot >= B drops that row). Donates `state`."""
        return self._insert_jit(prefix, state, np.asarray(slots, np.int32))

    def generate(self, state: DecodeState, longest: int | None = None) -> tuple[DecodeState, jax.Array]:
        """K decode steps. `longest`: upper bound of any live slot's `lengths` (None: the whole cache).

        Returns (state, tokens [K, B] int32, -1 where a slot drew nothing); the tokens' copy to the
        host has already started. Donates `state`.
        """
        kv_len = self.kv_bucket(self.max_len if longest is None else longest + self.steps)
        with self._bank_lock:
            state, tokens = self._generate_jit(self.params, self.bank, state, kv_len)
        tokens.copy_to_host_async()
        return state, tokens

    def release(self, state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Free `slots` (cancelled requests): they stop decoding at once. Donates `state`."""
        mask = np.zeros((self.slots,), bool)
        mask[list(slots)] = True
        return self._release_jit(state, mask)

    def warmup(self) -> None:
        """Compile every bucket now (prefill and insert per (P, T), generate per kv bucket, release),
        so serving never stalls on a compile; afterwards `compile_counts()` stays constant."""
        state = self.init_state()
        for t in self.prefill_buckets:
            for p in self.prefill_batches:
                if p == 1 or p * t <= self.prefill_budget:
                    rows = rows_from_params([_PAD_ROW] * p, np.random.default_rng(0))
                    ones = np.ones((p,), np.int32)
                    prefix = self.prefill(np.zeros((p, t), np.int32), ones, rows, ones, ones * 0)
                    state = self.insert(prefix, state, np.full((p,), self.slots, np.int32))
        for kv_len in self.kv_buckets:
            with self._bank_lock:
                state, _ = self._generate_jit(self.params, self.bank, state, kv_len)
        jax.block_until_ready(self.release(state, []))

    # -- host-side planning -----------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int, *, clip: bool = False) -> int:
        """`api.check_limits` with this engine's limits (its prefill buckets may cap the input below
        the config's): how many tokens the request may draw, else ValueError / InputTooLong."""
        return check_limits(prompt_tokens, max_tokens, self.max_input, self.max_total, clip=clip)

    # -- LoRA adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter: "lora_lib.Adapter | str | os.PathLike", *,
                     require_model_type: bool = False) -> int:
        """Put an adapter (an `lora.Adapter`, or a PEFT directory, validated here) into a free bank
        slot under `name`; returns its id. Running requests and compiled functions are unaffected.
        Raises LoraError (a ValueError) if it does not fit, the name is taken or the bank is full."""
        if self.bank is None:
            raise lora_lib.LoraError("this engine has no adapter bank (adapter_slots=0)")
        if not isinstance(adapter, lora_lib.Adapter):
            from gemma_jax.weights.peft import load_adapter as load_peft

            adapter = load_peft(adapter, self.config, max_rank=self.bank.rank, dtype=self.bank_dtype,
                                require_model_type=require_model_type)
        with self._bank_lock:
            if name in self._adapters:
                raise lora_lib.LoraError(f"an adapter named {name!r} is already loaded")
            if not self._free:
                raise lora_lib.LoraError(f"the adapter bank is full ({len(self._adapters)} adapters loaded)")
            index = self._free[0]
            self.bank = lora_lib.bank_add(self.bank, index, adapter)  # validates; donates the old bank
            self._free.popleft()
            self._adapters[name] = index
        return index

    def unload_adapter(self, name: str) -> None:
        """Forget `name` (UnknownAdapter if not loaded); its slot is reused by a later load."""
        with self._bank_lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
            self._free.append(self._adapters.pop(name))

    def adapters(self) -> dict[str, int]:
        """Loaded adapters: name -> id."""
        with self._bank_lock:
            return dict(self._adapters)

    @property
    def bank_dtype(self):
        return None if self.bank is None else next(iter(self.bank.layer(0).values())).a.dtype

    def adapter_id(self, name: str) -> int:
        """The device id of a loaded LoRA adapter; UnknownAdapter if there is none by that name."""
        with self._bank_lock:
            found = self._adapters.get(name)
        if found is None and self.adapter_resolver is not None:
            found = self.adapter_resolver(name)
        if not found:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        return int(found)

    def prompt_bucket(self, length: int) -> int:
        return next(b for b in self.prefill_buckets if b >= length)

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.prefill_batches if b >= n)

    def kv_bucket(self, length: int) -> int:
        return next((b for b in self.kv_buckets if b >= length), self.max_len)

    def plan_prefill(self, prompt_lengths: Sequence[int], free_slots: int) -> int:
        """How many of the leading prompts to prefill together (>= 1), within the slots free, the
        largest prefill batch and the batch prefill budget (padded tokens, P * T)."""
        n, most = 1, min(len(prompt_lengths), free_slots, self.prefill_batches[-1])
        while n < most:
            t = self.prompt_bucket(max(prompt_lengths[: n + 1]))
            if self.batch_bucket(n + 1) * t > self.prefill_budget:
                break
            n += 1
        return n

    def pack(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad prompts to (P bucket, T bucket): tokens [P, T] int32, lengths [P] (padding rows: 1)."""
        lengths = [len(p) for p in prompts]
        t, p = self.prompt_bucket(max(lengths)), self.batch_bucket(len(prompts))
        tokens = np.full((p, t), self.config.pad_id, np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = ids
        return tokens, np.asarray(lengths + [1] * (p - len(prompts)), np.int32)

    def prefill_prompts(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
                        limits: Sequence[int], adapter_ids: Sequence[int] | None = None,
                        rng: np.random.Generator | None = None) -> Prefix:
        """Bucket, pad and prefill prompts (token ids); padding rows are greedy and never inserted."""
        for ids in prompts:
            if not ids or min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        tokens, lengths = self.pack(prompts)
        pad = tokens.shape[0] - len(prompts)
        rows = rows_from_params(list(sampling) + [_PAD_ROW] * pad, rng)
        limit = np.asarray(list(limits) + [1] * pad, np.int32)
        ids = np.asarray(list(adapter_ids or [0] * len(prompts)) + [0] * pad, np.int32)
        return self.prefill(tokens, lengths, rows, limit, ids)

    def pad_slots(self, slots: Sequence[int], prefix: Prefix) -> np.ndarray:
        """Slot indices for every row of `prefix`: the given ones, then B (dropped) for padding."""
        p = prefix.lengths.shape[0]
        return np.asarray(list(slots) + [self.slots] * (p - len(slots)), np.int32)

    # -- introspection ----------------------------------------------------------------------------
    def compile_counts(self) -> dict[str, int]:
        """Traces per device function so far (each new shape or bucket traces and compiles once)."""
        return dict(self._traces)

    def compiled_shapes(self) -> int:
        """Total compiled executables, from jit's caches where this jax exposes them (else traces)."""
        fns = (self._init_jit, self._prefill_jit, self._insert_jit, self._generate_jit, self._release_jit)
        sizes = [getattr(f, "_cache_size", None) for f in fns]
        if any(s is None for s in sizes):
            return sum(self._traces.values())
        return sum(s() for s in sizes)


def run_to_completion(engine: Engine, prompts: Sequence[Sequence[int]], *, max_tokens: int | Sequence[int] = 32,
                      sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0),
                      rng: np.random.Generator | None = None) -> list[list[int]]:
    """Synchronous driver (tests, benchmarks): prefill every prompt (at most `slots`), decode until
    all are done, return each prompt's drawn tokens (stop token included)."""
    n = len(prompts)
    if n > engine.slots:
        raise ValueError(f"{n} prompts for {engine.slots} slots")
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * n
    limits = [engine.check(len(p), m) for p, m in zip(prompts, np.broadcast_to(max_tokens, (n,)).tolist())]
    state = engine.init_state()
    out: list[list[int]] = [[] for _ in range(n)]
    start = 0
    while start < n:
        count = engine.plan_prefill([len(p) for p in prompts[start:]], n - start)
        prefix = engine.prefill_prompts(prompts[start:start + count], sampling[start:start + count],
                                        limits[start:start + count], rng=rng)
        state = engine.insert(prefix, state, engine.pad_slots(range(start, start + count), prefix))
        for i, tok in enumerate(np.asarray(prefix.tokens)[:count]):
            out[start + i].append(int(tok))
        start += count
    finished = [_finished(engine, o, lim) for o, lim in zip(out, limits)]
    while not all(finished):
        longest = max(len(p) + len(o) - 1 for p, o, f in zip(prompts, out, finished) if not f)
        state, tokens = engine.generate(state, longest)
        for k_tokens in np.asarray(tokens):
            for slot, tok in enumerate(k_tokens[:n]):
                if tok >= 0 and not finished[slot]:
                    out[slot].append(int(tok))
                    finished[slot] = _finished(engine, out[slot], limits[slot])
    return out


def _finished(engine: Engine, drawn: list[int], limit: int) -> bool:
    return len(drawn) >= limit or drawn[-1] in engine.config.stop_ids
