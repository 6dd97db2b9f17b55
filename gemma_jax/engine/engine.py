"""The engine: pure device functions over (params, bank, state), and `Engine`, a thin host shell.

JetStream's shape. Shape legend: P prompts in a prefill batch, T the prompt bucket, B decode slots,
S cache positions per slot, V vocabulary, K kv heads, H head dim; `steps` decode steps per dispatch.

The device functions are plain module-level functions; their keyword arguments are static (bind
them, or name them in `static_argnames`, when you jit):

    prefill_step(params, bank, tokens [P, T], lengths [P], rows, limit [P], adapter_ids [P], *,
                 config, cache_dtype, use_lora, mode, attn_impl="xla") -> Prefix
    insert_step(prefix, state, slots [P]) -> state                 (slot >= B: that row is dropped)
    generate_steps(params, bank, state, *, config, steps, use_lora, mode, attn_impl="xla")
        -> (state, tokens [steps, B])                              (-1 where a slot drew nothing)
    decode_products(config, B) -> "dot" | "reduce"                 (the decode attention's form)
    decode_compiler_options(config, B) -> the compiler options to jit generate_steps with
    release_step(state, mask [B]) -> state

They need no `Engine`. With `state = init_decode_state(config, B, S)` and sampling rows from
`sampling.rows_from_params`:

    prefill = jax.jit(prefill_step, static_argnames=("config", "cache_dtype", "use_lora", "mode"))
    prefix = prefill(params, None, tokens, lengths, rows, limit, ids, config=config,
                     cache_dtype=jnp.float32, use_lora=False, mode="greedy")
    state = insert_step(prefix, state, slots)
    state, tokens = generate_steps(params, None, state, config=config, steps=8, use_lora=False,
                                   mode="greedy")

Static variants, so that no dispatch has data-dependent control flow (no `lax.cond`, whose predicate
a GPU copies to the host): `use_lora` False runs the model with lora=None (no LoRA cost at all),
True adds each row's adapter from the bank (`lora.AdapterBank`, id 0 = base model, so one batch
mixes adapters); `mode` is the sampling mode (`sampling.MODES`), which must serve every row that
draws (`sampling.mode_for`). The caller picks both from what it knows on the host. `attn_impl` is the
attention implementation (`attention.IMPLS`): "xla", or "pallas_gpu" (JAX's Triton decode kernel,
cuDNN flash prefill).

`Engine`, the host shell, owns what is not a device value:
- buckets, so the number of compilations is bounded: prompts pad to `prefill_buckets` (T: powers of
  two to 512, then 768, 1024 and quarter steps of each octave above: 1280, 1536, ...), prefill
  batches to `prefill_batches` (P, with P * T within the batch prefill budget); decode has no bucket
  (one compile per variant: attention reads each slot's own length); `compile_counts()` counts
  traces of each function for tests;
- the attention implementation, `attention_impl`: by default `attention.default_impl()` ("pallas_gpu"
  on a GPU, else "xla"), kept only where the kernel applies (one device, a cache length it can split:
  `attention.pallas_fits`), else "xla"; an explicit choice is used as given. An int8 KV cache
  (`cache_dtype=jnp.int8`) always decodes with the XLA loop (no kernel reads its scales);
- the KV cache dtype, `cache_dtype`: the params' compute dtype, another float, or int8 (K/V
  quantized per (slot, kv head, position) as prefill inserts them and decode writes them: `model.py`);
- the jit objects: the decode state donated, every function's output shardings pinned (the state
  split as `state.state_shardings`, a prefix as `state.prefix_shardings`, tokens replicated), so a
  steady state never sees a new layout or a recompile; slots are split over the mesh's "data" axis
  and heads over "model" (`params.param_shardings`), on one CPU, a fake CPU mesh or a GPU alike;
- the variants: `prefill_prompts` runs LoRA only if a row has an adapter and always samples in the
  widest mode (one token per prompt: same draws, a third of the compiles); `insert` records, per slot, whether
  it uses an adapter and its sampling mode; `generate(state, live)` picks the least general
  variant that serves the `live` slots (default: every slot inserted since `init_state` and not
  released). The records follow one decode state at a time, the latest `init_state`'s;
- the LoRA bank (with `adapter_slots` > 0), in rank buckets, and its names. Loading or unloading an
  adapter rewrites one slot of the smallest bucket that holds its rank in place (same shapes: nothing
  that takes the bank recompiles); at most `adapter_slots` adapters are loaded at once. An unloaded
  adapter's name disappears at once, but its slot keeps its weights until a later load reuses it
  (a bucket's free slots are reused oldest-freed first), so requests already admitted or queued on it finish
  as they started. See docs/lora.md for the bank vs a merged copy;
- the limits (`check`, the one rule: `api.check_limits`).

What makes it fast on an accelerator:
- `generate_steps` runs `steps` decode steps per dispatch in a `lax.fori_loop` and packs the
  steps x B tokens into one array whose host copy starts at once (`copy_to_host_async`): one host
  round trip per `steps` tokens.
- Decode attention reads each slot's own length in place (`attention.decode_attention`): the Pallas
  kernel per (slot, kv head); the XLA path block by block up to the longest live slot, the loop's
  bounds computed on the device. No [B, K, span, H] copy of the cache, no compile per context length.
- Prefill is `jax.nn.dot_product_attention` (causal; cuDNN flash attention with "pallas_gpu") and
  returns each layer's K/V [P, K, T, H], which `insert_step` writes straight into the decode cache.
- Sampling parameters, RNG keys, penalty state, token budgets and stop tests live on the device in
  the `DecodeState`; nothing crosses to the device per step.
- Prefill computes logits only at each prompt's last position (the unembedding of all T positions
  would cost a [P, T, V] tensor: 2 GiB for a 2048-token Gemma 3 prompt).
- Layers stay unrolled (the model's Python loop); no `lax.scan` over stacked weights.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax import attention
from gemma_jax import lora as lora_lib
from gemma_jax import params as params_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.adapters import AdapterSlots
from gemma_jax.engine.api import SamplingParams, check_limits
from gemma_jax.engine.state import DecodeState, Prefix, init_decode_state, prefix_shardings, state_shardings
from gemma_jax.model import LayerCache, forward, quantize_layer_cache
from gemma_jax.sampling import (MODES, SamplingRows, mode_for, prompt_seen, rows_from_params, sample,
                                update_penalty_state)
from gemma_jax.sharding import make_mesh

_PAD_ROW = SamplingParams(temperature=0.0)  # sampling of the padding rows of a prefill batch
# One request per sampling mode, for `Engine.warmup` (checked against `mode_for` there).
_MODE_EXAMPLES = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                  SamplingParams(temperature=1.0, top_p=0.5))


# -- device functions ------------------------------------------------------------------------------
def prefill_step(params, bank: lora_lib.AdapterBank | None, tokens: jax.Array, lengths: jax.Array,
                 rows: SamplingRows, limit: jax.Array, adapter_ids: jax.Array, *, config: GemmaConfig,
                 cache_dtype, use_lora: bool, mode: str, attn_impl: str = "xla") -> Prefix:
    """Prefill P padded prompts and draw each one's first token.

    tokens [P, T] int32 (padded), lengths [P] (true lengths >= 1), rows: [P] sampling rows,
    limit [P] most tokens each may draw, adapter_ids [P] (0 = base model; read only with use_lora).
    The prefix's cache is each layer's K/V [P, K, T, H] as computed (no zero cache, no scatter),
    cast to cache_dtype, or quantized per position if it is int8 (`model.quantize_kv`); entries at
    t >= length are padding, never read (decode attends [0, length) and overwrites them).
    """
    if use_lora and bank is None:
        raise ValueError("use_lora needs an adapter bank")
    p, t = tokens.shape
    index = jnp.arange(t)[None, :]
    positions = jnp.where(index < lengths[:, None], index, t)  # padding writes are dropped
    lora = (bank, adapter_ids) if use_lora else None
    logits, kv = forward(params, tokens, positions, None, config=config, lora=lora, logits_at=lengths - 1,
                         return_kv=True, attn_impl=attn_impl)
    if jnp.dtype(cache_dtype) == jnp.int8:  # int8 K/V [P, K, T, H] + scales [P, K, T] per layer
        cache = {name: quantize_layer_cache(layer) for name, layer in kv.items()}
    else:
        cache = jax.tree.map(lambda x: x.astype(cache_dtype), kv)  # [P, K, T, H] per layer
    logits = logits[:, 0]  # [P, V]: each prompt's last position only
    seen = prompt_seen(tokens, lengths, config.vocab_size)  # [P, V]
    counts = jnp.zeros((p, config.vocab_size), jnp.int32)
    first = sample(logits, rows, seen, counts, jnp.zeros((p,), jnp.int32), mode=mode)  # [P]
    seen, counts = update_penalty_state(seen, counts, first)
    done = jnp.isin(first, jnp.asarray(config.stop_ids, jnp.int32)) | (limit <= 1)
    return Prefix(cache=cache, lengths=lengths, tokens=first, rows=rows, seen=seen, counts=counts,
                  limit=limit, adapter_ids=adapter_ids, done=done)


def insert_step(prefix: Prefix, state: DecodeState, slots: jax.Array) -> DecodeState:
    """Put the prefix's P rows into decode slots `slots` [P]; a slot >= B drops that row (padding)."""
    put = lambda dst, src: dst.at[slots].set(src, mode="drop")
    span = lambda dst, src: dst.at[slots, :, :src.shape[2]].set(src, mode="drop")  # [P, K, T, ..] into [B, K, S, ..]
    cache = {}
    for name, layer in state.cache.items():
        src = prefix.cache[name]
        cache[name] = LayerCache(span(layer.k, src.k), span(layer.v, src.v))
        if layer.quantized:  # and the scales [P, K, T] into [B, K, S]
            cache[name] = cache[name].replace(k_scale=span(layer.k_scale, src.k_scale),
                                              v_scale=span(layer.v_scale, src.v_scale))
    ones = jnp.ones_like(prefix.lengths)
    return state.replace(
        cache=cache, lengths=put(state.lengths, prefix.lengths), tokens=put(state.tokens, prefix.tokens),
        rows=jax.tree.map(put, state.rows, prefix.rows), seen=put(state.seen, prefix.seen),
        counts=put(state.counts, prefix.counts), step=put(state.step, ones), limit=put(state.limit, prefix.limit),
        adapter_ids=put(state.adapter_ids, prefix.adapter_ids), active=put(state.active, ones.astype(bool)),
        done=put(state.done, prefix.done))


def generate_steps(params, bank: lora_lib.AdapterBank | None, state: DecodeState, *, config: GemmaConfig,
                   steps: int, use_lora: bool, mode: str, attn_impl: str = "xla") -> tuple[DecodeState, jax.Array]:
    """`steps` decode steps of every live slot, each attending its own cache positions (an idle slot
    is fed position S: it writes and reads nothing). Returns (state, tokens [steps, B] int32, -1 where
    a slot drew nothing)."""
    if use_lora and bank is None:
        raise ValueError("use_lora needs an adapter bank")
    slots, max_len = state.tokens.shape[0], next(iter(state.cache.values())).k.shape[2]  # B, S
    stop = jnp.asarray(config.stop_ids, jnp.int32)

    def step(i, carry):
        st, out = carry
        live = st.live  # [B]
        positions = jnp.where(live, st.lengths, max_len)[:, None]  # idle slots write nothing
        lora = (bank, st.adapter_ids) if use_lora else None
        logits, cache = forward(params, st.tokens[:, None], positions, st.cache, config=config, lora=lora,
                                attn_impl=attn_impl)
        drawn = sample(logits[:, 0], st.rows, st.seen, st.counts, st.step, mode=mode)  # [B]
        drawn = jnp.where(live, drawn, -1)
        seen, counts = update_penalty_state(st.seen, st.counts, drawn)  # -1 is ignored
        n = st.step + live
        done = st.done | (live & (jnp.isin(drawn, stop) | (n >= st.limit)))
        st = st.replace(cache=cache, lengths=st.lengths + live, tokens=jnp.where(live, drawn, st.tokens),
                        seen=seen, counts=counts, step=n, done=done)
        return st, out.at[i].set(drawn)

    out = jnp.full((steps, slots), -1, jnp.int32)  # [steps, B]
    return jax.lax.fori_loop(0, steps, step, (state, out))


def decode_products(config: GemmaConfig, slots: int) -> str:
    """The form of the XLA decode loop's products for `slots` rows of this model on this backend
    (`attention.default_products`: "reduce" on a CPU for a large MHA batch, else "dot")."""
    groups = config.num_heads // config.num_kv_heads
    return attention.default_products(slots, config.num_kv_heads, groups, config.head_dim)


def decode_compiler_options(config: GemmaConfig, slots: int) -> dict:
    """What to pass as `jax.jit(generate_steps, compiler_options=...)` for `slots` rows: the options
    the decode attention's form needs (`decode_products`, `attention.compiler_options`; for "reduce",
    XLA:CPU's YNNPACK fusions for dots only, so that every cache block is read in place)."""
    return attention.compiler_options(decode_products(config, slots))


def release_step(state: DecodeState, mask: jax.Array) -> DecodeState:
    """Free the slots where mask [B] is set: they stop decoding at once."""
    return state.replace(active=state.active & ~mask, done=state.done | mask)


# -- the host shell --------------------------------------------------------------------------------
def _prompt_buckets(lo: int, hi: int) -> list[int]:
    """Prompt buckets below `hi`: powers of two from `lo` to 512, then 768, then four steps per
    octave (1024, 1280, 1536, 1792, 2048, 2560, ...): a long prompt pads by at most a quarter, and the
    count stays logarithmic in `hi`."""
    out, b = [], lo
    while b < min(hi, 512):
        out.append(b)
        b *= 2
    if hi > 512:
        out += [b for b in (512, 768) if b < hi]
        octave = 1024
        while octave < hi:
            out += [b for b in range(octave, 2 * octave, octave // 4) if b < hi]
            octave *= 2
    return out


def _widest(modes) -> str:
    """The most general of some sampling modes (MODES is least general first); none: the least."""
    return max(modes, key=MODES.index, default=MODES[0])


class Engine:
    """The device functions over `slots` fixed decode slots of `max_len` positions each.

    params: the model's parameter tree (placed on `mesh` with `param_shardings` if not already).
    mesh: a ("data", "model") mesh; None means the first device alone.
    adapter_slots: how many LoRA adapters the bank holds at once (0: no bank, no LoRA cost);
    adapter_rank: the bank's maximum rank (higher ranks are refused); adapter_rank_buckets: the
    smaller ranks that get a bucket of their own (`lora.bank_ranks`; each bucket has
    `adapter_slots` slots, an adapter goes to the smallest that holds it; None:
    `lora.default_rank_buckets` for the mesh's platform); adapter_dtype: the bank's dtype (default:
    the params' dtype). cache_dtype: the KV cache's dtype (default: the params' compute dtype), or
    jnp.int8 for an int8 cache with a float32 scale per (slot, kv head, position) (`model.py`): half
    a bf16 cache's bytes, plus 4 per H values for the scales, decoded by the XLA attention loop whatever
    `attention_impl` is (`attention.py`; the impl still chooses the prefill path).
    """

    def __init__(self, config: GemmaConfig, params, *, slots: int, max_len: int | None = None,
                 mesh: Mesh | None = None, prefill_buckets: Sequence[int] | None = None,
                 prefill_batches: Sequence[int] = (1, 2, 4, 8), steps_per_call: int = 8,
                 attention_impl: str | None = None, cache_dtype=None,
                 adapter_slots: int = 0, adapter_rank: int = lora_lib.DEFAULT_MAX_RANK,
                 adapter_rank_buckets: Sequence[int] | None = None, adapter_dtype=None):
        limits = config.limits
        self.config = config
        self.slots = int(slots)
        self.max_len = int(max_len or limits.max_total_tokens)
        self.max_total = min(limits.max_total_tokens, self.max_len)
        want_input = min(limits.max_input_tokens, self.max_total - 1)
        if prefill_buckets is None:
            top = min(-(-want_input // 128) * 128 if want_input > 128 else want_input, self.max_len)
            prefill_buckets = _prompt_buckets(32, top) + [top]
        self.prefill_buckets = tuple(sorted(set(int(b) for b in prefill_buckets)))
        if self.prefill_buckets[-1] > self.max_len:
            raise ValueError(f"prefill bucket {self.prefill_buckets[-1]} exceeds max_len {self.max_len}")
        self.max_input = min(want_input, self.prefill_buckets[-1])
        self.prefill_budget = limits.max_batch_prefill_tokens
        self.prefill_batches = tuple(sorted({1, *(int(b) for b in prefill_batches if b <= self.slots)}))
        self.steps = int(steps_per_call)

        self.mesh = mesh if mesh is not None else make_mesh(1, 1, devices=jax.devices()[:1])
        self.attention_impl = self._attention_impl(attention_impl)
        self.params = self._place_params(params)
        self.cache_dtype = jnp.dtype(cache_dtype or params["embedder"]["input_embedding"].dtype)
        if not (jnp.issubdtype(self.cache_dtype, jnp.floating) or self.cache_dtype == jnp.int8):
            raise ValueError(f"cache_dtype must be a float dtype or int8, not {self.cache_dtype}")
        self.state_sharding = state_shardings(config, self.slots, self.max_len, self.mesh, self.cache_dtype)
        self._traces: collections.Counter[str] = collections.Counter()
        self._jit_device_functions()

        # Per slot, what its decode needs: (adapter id > 0, sampling mode), recorded at insert.
        self._needs: dict[int, tuple[bool, str]] = {}
        # LoRA bank: id 0 is "no adapter"; names, free ids and the lock live in `AdapterSlots`.
        self.adapter_slots = max(int(adapter_slots), 0)
        self._lora = AdapterSlots(config, adapter_slots=self.adapter_slots, rank=adapter_rank,
                                  dtype=adapter_dtype or params["embedder"]["input_embedding"].dtype, mesh=self.mesh,
                                  rank_buckets=adapter_rank_buckets)
        self._bank_lock = self._lora.lock  # bank updates (donated) vs dispatches that read it

    @property
    def bank(self) -> lora_lib.AdapterBank | None:
        return self._lora.bank

    def _attention_impl(self, asked: str | None) -> str:
        """The explicit choice, else `attention.default_impl()` where it applies: the Pallas kernel
        runs unsharded (one device) on a cache it can split into power-of-two blocks."""
        if asked is not None:
            if asked not in attention.IMPLS:
                raise ValueError(f"attention_impl must be one of {attention.IMPLS}, not {asked!r}")
            if asked != "xla" and not attention.pallas_fits(self.max_len):
                raise ValueError(f"the Pallas decode kernel cannot split max_len {self.max_len}")
            return asked
        impl = attention.default_impl()
        if impl != "xla" and (self.mesh.size > 1 or not attention.pallas_fits(self.max_len)):
            impl = "xla"
        return impl

    def _place_params(self, params):
        shardings = params_lib.param_shardings(self.config, self.mesh, quantized=params_lib.quantization(params) or False)
        if jax.tree.structure(shardings) != jax.tree.structure(params):
            return params  # a tree the core does not know: the caller placed it
        return jax.device_put(params, shardings)

    def _jit_device_functions(self) -> None:
        """One jit object per device function, the static config bound, the state donated, the
        output shardings pinned. Each wrapper bumps a trace counter: a retrace is a compile."""
        cfg, dtype, slots, max_len, steps, traces = (self.config, self.cache_dtype, self.slots, self.max_len,
                                                     self.steps, self._traces)
        impl = self.attention_impl

        def init():
            traces["init"] += 1
            return init_decode_state(cfg, slots, max_len, dtype)

        def prefill(params, bank, tokens, lengths, rows, limit, adapter_ids, *, use_lora, mode):
            traces["prefill"] += 1
            return prefill_step(params, bank, tokens, lengths, rows, limit, adapter_ids, config=cfg,
                                cache_dtype=dtype, use_lora=use_lora, mode=mode, attn_impl=impl)

        def insert(prefix, state, slot_ids):
            traces["insert"] += 1
            return insert_step(prefix, state, slot_ids)

        def generate(params, bank, state, *, use_lora, mode):
            traces["generate"] += 1
            return generate_steps(params, bank, state, config=cfg, steps=steps, use_lora=use_lora, mode=mode,
                                  attn_impl=impl)

        def release(state, mask):
            traces["release"] += 1
            return release_step(state, mask)

        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._init_jit = jax.jit(init, out_shardings=self.state_sharding)
        self._prefill_jit = jax.jit(prefill, static_argnames=("use_lora", "mode"),
                                    out_shardings=prefix_shardings(cfg, self.mesh, dtype))
        self._insert_jit = jax.jit(insert, donate_argnums=(1,), out_shardings=self.state_sharding)
        self._generate_jit = jax.jit(generate, static_argnames=("use_lora", "mode"), donate_argnums=(2,),
                                     out_shardings=(self.state_sharding, replicated),
                                     compiler_options=decode_compiler_options(cfg, slots))
        self._release_jit = jax.jit(release, donate_argnums=(0,), out_shardings=self.state_sharding)

    # -- device functions, from the host -----------------------------------------------------------
    def init_state(self) -> DecodeState:
        """A decode state with every slot free, created directly on the mesh. Forgets what the
        engine recorded about the slots of the previous one."""
        self._needs.clear()
        return self._init_jit()

    def prefill_prompts(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
                        limits: Sequence[int], adapter_ids: Sequence[int] | None = None,
                        rng: np.random.Generator | None = None) -> Prefix:
        """Bucket, pad and prefill prompts (token ids), each drawing its first token; padding rows
        are greedy and never inserted. limits: most tokens each may draw (`check`); adapter_ids:
        bank ids (`adapter_id`), None = base model. The first tokens' host copy has started."""
        if len(sampling) != len(prompts) or len(limits) != len(prompts):
            raise ValueError("one sampling and one limit per prompt")
        for ids in prompts:
            if not ids or min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        tokens, lengths = self.pack(prompts)
        pad = tokens.shape[0] - len(prompts)
        rows = rows_from_params(list(sampling) + [_PAD_ROW] * pad, rng)
        limit = np.asarray(list(limits) + [1] * pad, np.int32)
        adapter_ids = [0] * len(prompts) if adapter_ids is None else [int(a) for a in adapter_ids]
        ids = np.asarray(adapter_ids + [0] * pad, np.int32)
        needs = tuple((self.bank is not None and a > 0, mode_for([s])) for a, s in zip(adapter_ids, sampling))
        # Prefill draws one token per prompt, so its sampling cost is nothing beside the forward pass:
        # it always uses the widest mode (the same draws as any narrower mode that serves a row),
        # which keeps prefill to one compile per (P, T, LoRA on/off).
        use_lora = any(a for a, _ in needs)
        with self._bank_lock:
            prefix = self._prefill_jit(self.params, self.bank, tokens, lengths, rows, limit, ids,
                                       use_lora=use_lora, mode=MODES[-1])
        prefix.tokens.copy_to_host_async()
        return prefix.replace(needs=needs)

    def insert(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        """Put the prefix's rows into `slots` ([P]; a slot >= B drops that row) and record what each
        slot's decode needs. Donates `state`."""
        slots = np.asarray(slots, np.int32)
        needs = prefix.needs or ((self.bank is not None, MODES[-1]),) * len(slots)  # unknown: the widest
        for slot, need in zip(slots.tolist(), needs):
            if 0 <= slot < self.slots:
                self._needs[slot] = need
        return self._insert_jit(prefix.replace(needs=()), state, slots)

    def generate(self, state: DecodeState, live: Sequence[int] | None = None) -> tuple[DecodeState, jax.Array]:
        """`steps` decode steps (attention reads each slot's own length: no bound to pass).
        `live`: the slots live in this dispatch (None: every slot inserted and not released);
        the compiled variant is the least general that serves them (LoRA only if one of them has an
        adapter; their widest sampling mode). A live slot left out of `live` may decode wrongly.

        Returns (state, tokens [steps, B] int32, -1 where a slot drew nothing); the tokens' copy to
        the host has already started. Donates `state`.
        """
        slots = self._needs.keys() if live is None else live
        unknown = (self.bank is not None, MODES[-1])
        needs = [self._needs.get(int(s), unknown) for s in slots]
        use_lora, mode = any(a for a, _ in needs), _widest(m for _, m in needs)
        with self._bank_lock:
            state, tokens = self._generate_jit(self.params, self.bank, state, use_lora=use_lora, mode=mode)
        tokens.copy_to_host_async()
        return state, tokens

    def release(self, state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Free `slots` (cancelled requests): they stop decoding at once. Donates `state`."""
        mask = np.zeros((self.slots,), bool)
        for slot in slots:
            mask[slot] = True
            self._needs.pop(int(slot), None)
        return self._release_jit(state, mask)

    def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compile every variant serving can reach, through the functions above: prefill (and
        insert) per (P, T) bucket, generate once per sampling mode and, with a bank, LoRA on and
        off; then release. Afterwards `compile_counts()` stays constant.

        progress(compiled, total): called before the first compile and after each step, with the
        executables traced so far by this warmup and how many it traces in all (one per distinct
        prefill, insert and generate shape or variant, plus init and release on a fresh engine)."""
        examples = {mode_for([s]): s for s in _MODE_EXAMPLES}
        if set(examples) != set(MODES):
            raise AssertionError(f"warmup examples cover {sorted(examples)}, not every mode of {MODES}")
        adapters = (0, 1) if self.bank is not None else (0,)  # slot 1 serves for any adapter: same shapes
        rng, bos = np.random.default_rng(0), self.config.bos_id
        widest = examples[MODES[-1]]  # prefill always samples in the widest mode
        # (prompts, sampling, adapter, slots, generate after insert?) per step
        steps = [([[bos] * t] * p, widest, adapter, [], False)
                 for t in self.prefill_buckets for p in self.prefill_batches
                 if p == 1 or p * t <= self.prefill_budget for adapter in adapters]
        steps += [([[bos]], examples[m], adapter, [0], True) for adapter in adapters for m in MODES]
        lora = lambda a: self.bank is not None and a > 0
        keys = set()
        for prompts, sampling, adapter, _, gen in steps:
            shape = (self.batch_bucket(len(prompts)), self.prompt_bucket(len(prompts[0])))
            keys |= {("prefill", *shape, lora(adapter)), ("insert", *shape)}
            if gen:
                keys.add(("generate", lora(adapter), mode_for([sampling])))
        fresh = {name for name in ("init", "release") if not self._traces[name]}
        total, before = len(keys) + len(fresh), sum(self._traces.values())
        report = (lambda: progress(sum(self._traces.values()) - before, total)) if progress else (lambda: None)
        report()
        state = self.init_state()
        for prompts, sampling, adapter, slots, gen in steps:
            n = len(prompts)
            prefix = self.prefill_prompts(prompts, [sampling] * n, [1] * n, [adapter] * n, rng)
            state = self.insert(prefix, state, self.pad_slots(slots, prefix))  # rows past `slots` dropped
            if gen:
                state, _ = self.generate(state, live=[0])
            report()
        jax.block_until_ready(self.release(state, range(self.slots)))
        report()

    # -- host-side planning -----------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int, *, clip: bool = False) -> int:
        """`api.check_limits` with this engine's limits (its prefill buckets may cap the input below
        the config's): how many tokens the request may draw, else ValueError / InputTooLong."""
        return check_limits(prompt_tokens, max_tokens, self.max_input, self.max_total, clip=clip)

    # -- LoRA adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter: "lora_lib.Adapter | str | os.PathLike", *,
                     require_model_type: bool = False) -> int:
        """`AdapterSlots.load`: the adapter (or a PEFT directory) into the bank under `name`; its id.
        Running requests and compiled functions are unaffected."""
        return self._lora.load(name, adapter, require_model_type=require_model_type)

    def unload_adapter(self, name: str) -> None:
        """Forget `name` (UnknownAdapter if not loaded); its slot is reused by a later load."""
        self._lora.unload(name)

    def adapters(self) -> dict[str, int]:
        """Loaded adapters: name -> id."""
        return self._lora.names()

    @property
    def bank_dtype(self):
        return self._lora.dtype

    def adapter_id(self, name: str) -> int:
        """The device id of a loaded LoRA adapter; UnknownAdapter if there is none by that name."""
        return self._lora.id_of(name)

    def prompt_bucket(self, length: int) -> int:
        return next(b for b in self.prefill_buckets if b >= length)

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.prefill_batches if b >= n)

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

    def pad_slots(self, slots: Sequence[int], prefix: Prefix) -> np.ndarray:
        """Slot indices for every row of `prefix`: the given ones, then B (dropped) for padding."""
        p = prefix.lengths.shape[0]
        return np.asarray(list(slots) + [self.slots] * (p - len(slots)), np.int32)

    # -- introspection ----------------------------------------------------------------------------
    def compile_counts(self) -> dict[str, int]:
        """Traces per device function so far (each new shape, bucket or variant traces and compiles once)."""
        return dict(self._traces)

    def compiled_shapes(self) -> int:
        """Total compiled executables, from jit's caches where this jax exposes them (else traces)."""
        fns = (self._init_jit, self._prefill_jit, self._insert_jit, self._generate_jit, self._release_jit)
        sizes = [getattr(f, "_cache_size", None) for f in fns]
        if any(s is None for s in sizes):
            return sum(self._traces.values())
        return sum(s() for s in sizes)

