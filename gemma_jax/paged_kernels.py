"""Accelerator kernels for ragged paged attention, beside the XLA reference in `paged_attention.py`.

    ragged_paged_attention_tpu(q [T, N, H], k_pages [P, K, S, H], v_pages, tables [Q, M], seq_ids [T],
                               positions [T], *, window, scale, softcap, interpret=False) -> [T, N, H]
    ragged_paged_attention_gpu(... the same ...) -> [T, N, H]
        (both also take an int8 pool's k_scale, v_scale [P, K, S], which they hand to the reference)
    paged_attention_fn(impl) -> one of the above or the reference; default_paged_impl() -> impl

Shape letters and the contract are `paged_attention.py`'s: token t attends its sequence's positions
[max(0, positions[t] - window + 1), positions[t]]; padding tokens (position < 0) return zeros.

"pallas_tpu" wraps JAX's TPU ragged paged attention kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, mixed prefill and decode). It wants k and
v interleaved in one pool [P, S, 2K, H] (kv head k at 2k, its v at 2k + 1), so the wrapper builds
that pool on every call: a full copy of both pools, per layer and step. Only an engine that keeps
its pool in that layout (`combine_kv_pages` at write time) avoids it; `write_pages` does not today.
The kernel takes queries grouped per sequence: sequence r owns query rows [cu_q_lens[r],
cu_q_lens[r+1]) and the last of them sits at position kv_lens[r] - 1, each earlier row one position
before the next. The wrapper moves padding tokens behind the live ones (a stable partition of q, a
[T, N, H] gather) and cuts the live tokens into runs: a run ends where the sequence changes or the
position does not go up by one. Each run is one kernel sequence with its table's row of pages.
Precondition: the batch has at most Q runs (rows of `tables`), which holds whenever each sequence's
live tokens are contiguous (padding may sit anywhere) with positions ascending by one: the engine's
batches (decode tokens first, then prompt chunks). With more runs the runs past Q return zeros.
Sliding window and logit softcap are the kernel's own. It needs H a multiple of 128 (it asserts so
even in interpret mode) and 2K to tile (K in 1, 2 or a multiple of 4 for float32; 1, 2, 4 or a
multiple of 8 for bfloat16: it raises otherwise); on a TPU it takes its block sizes from its tuned
table. jax 0.10.2's TPU interpreter cannot run it (it reshapes a VMEM ref, and the interpreter takes
only indexed refs), so `interpret=True` fails there; the tests check the wrapper's conversion through
the kernel's own pure-JAX reference (`ref_ragged_paged_attention`, same inputs) instead.

"pallas_gpu" wraps JAX's Triton paged attention (`jax.experimental.pallas.ops.gpu.paged_attention`,
one query per sequence). Every (token, kv head) pair is one of its queries, so prompt chunks go
through it as well as decode tokens: row t*K + kh holds token t's G query heads and reads pages
tables[seq_ids[t]] * K + kh of the pool viewed as one kv head of P*K pages (k_pages.reshape(1, P*K,
S, H), a reshape, no copy) up to length positions[t] + 1 (0 for padding). The kernel has no start
position, so sliding-window layers (`window` set) use the XLA reference. It has no scale argument:
q is scaled in float32 and cast to the pool's dtype before the call. It needs S * (pages per compute
block) a power of two >= 16 (Triton tiles; `gpu_fits`). On a GPU a float32 dot may run in TF32.
Each token reads its own context (as in the reference: a chunk's tokens share no KV loads), and the
G query heads of a row are padded to the kernel's 16 (its smallest dot tile).
Neither wrapper has been compiled for its accelerator yet (Mosaic / Triton lowering untested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma_jax.paged_attention import ragged_paged_attention

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")


def _tpu_kernel():
    """JAX's TPU ragged paged attention, or None when the installed JAX does not ship it."""
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention as kernel
    except ImportError:
        return None
    return kernel


def combine_kv_pages(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """[P, K, S, H] twice -> the TPU kernel's [P, S, 2K, H], k of kv head k at 2k and v at 2k + 1 (a copy)."""
    p, kv, s, h = k_pages.shape
    return jnp.stack([k_pages, v_pages], axis=2).transpose(0, 3, 1, 2, 4).reshape(p, s, 2 * kv, h)


def ragged_paged_attention_tpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                               seq_ids: jax.Array, positions: jax.Array, *, window: int | None = None,
                               scale: float, softcap: float | None = None, k_scale: jax.Array | None = None,
                               v_scale: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """The reference's contract through JAX's TPU ragged kernel (module docstring: layout copy, runs,
    precondition). interpret: Pallas TPU interpret mode (on the CPU; jax 0.10.2's interpreter cannot
    run this kernel yet). Returns [T, N, H] in q's dtype."""
    if k_scale is not None or v_scale is not None:  # an int8 pool: the kernel takes one scale per pool only
        return _reference(q, k_pages, v_pages, tables, seq_ids, positions, window, scale, softcap, k_scale, v_scale)
    kernel = _tpu_kernel()
    if kernel is None:
        raise NotImplementedError(f"jax {jax.__version__} ships no jax.experimental.pallas.ops.tpu."
                                  "ragged_paged_attention; use impl 'xla'")
    m, t = tables.shape[1], q.shape[0]
    blocks = dict(num_kv_pages_per_block=min(m, 4), num_queries_per_block=min(t, 8)) if interpret else {}
    call = functools.partial(kernel, sm_scale=scale, sliding_window=window, soft_cap=softcap, **blocks)
    if not interpret:
        return _through_ragged_kernel(call, q, k_pages, v_pages, tables, seq_ids, positions)
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        return _through_ragged_kernel(call, q, k_pages, v_pages, tables, seq_ids, positions)


def _through_ragged_kernel(call, q, k_pages, v_pages, tables, seq_ids, positions):
    """Our flat batch through `call(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)` (the TPU
    kernel's contract, [T, N, H] out): padding moved last, live tokens cut into runs, rows put back."""
    tables, seq_ids, positions = (jnp.asarray(x, jnp.int32) for x in (tables, seq_ids, positions))
    t = q.shape[0]
    runs = tables.shape[0]
    live = positions >= 0
    order = jnp.argsort(~live, stable=True)  # [T]: live tokens first, in their order
    seq, pos, ok = seq_ids[order], positions[order], live[order]
    idx = jnp.arange(t, dtype=jnp.int32)
    new_run = ok & ((idx == 0) | (seq != jnp.roll(seq, 1)) | (pos != jnp.roll(pos, 1) + 1))
    run = jnp.where(ok, jnp.cumsum(new_run) - 1, runs + 1)  # [T]: each live token's run (runs + 1: dropped)
    starts = jnp.where(new_run, run, runs + 1)
    cu_q_lens = jnp.full((runs + 1,), ok.sum(), jnp.int32).at[starts].set(idx, mode="drop")  # [Q + 1]
    kv_lens = jnp.zeros((runs,), jnp.int32).at[run].max(pos + 1, mode="drop")  # [Q]
    run_seq = jnp.zeros((runs,), jnp.int32).at[starts].set(seq, mode="drop")
    page_indices = tables[jnp.clip(run_seq, 0, runs - 1)]  # [Q, M]
    num_seqs = jnp.minimum(new_run.sum(), runs).astype(jnp.int32)[None]  # [1]
    out = call(q[order], combine_kv_pages(k_pages, v_pages), kv_lens, page_indices, cu_q_lens, num_seqs)
    out = jnp.where((ok & (run < runs))[:, None, None], out, 0)  # padding, runs past Q: never written
    return jnp.zeros_like(out).at[order].set(out).astype(q.dtype)


def gpu_split(pages: int, page_size: int, most_splits: int = 16, most_block: int = 8) -> tuple[int, int] | None:
    """(k_splits, pages_per_compute_block) for tables of `pages` columns: splits dividing the table,
    a block of pages dividing a split whose positions (x page_size) are a power of two >= 16; or None."""
    for splits in range(min(most_splits, pages), 0, -1):
        if pages % splits:
            continue
        split = pages // splits
        for block in range(min(most_block, split), 0, -1):
            span = block * page_size
            if split % block == 0 and span >= 16 and span & (span - 1) == 0:
                return splits, block
    return None


def gpu_fits(pages: int, page_size: int) -> bool:
    """Whether the Triton paged kernel can walk tables of `pages` columns of `page_size` positions."""
    return gpu_split(pages, page_size) is not None


def ragged_paged_attention_gpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                               seq_ids: jax.Array, positions: jax.Array, *, window: int | None = None,
                               scale: float, softcap: float | None = None, k_scale: jax.Array | None = None,
                               v_scale: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """The reference's contract through JAX's Triton paged kernel, one query per (token, kv head)
    (module docstring); sliding-window layers use the reference. interpret: Pallas interpret mode
    (on the CPU). Returns [T, N, H] in q's dtype."""
    if window is not None or k_scale is not None or v_scale is not None:
        return _reference(q, k_pages, v_pages, tables, seq_ids, positions, window, scale, softcap, k_scale, v_scale)
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    tables, seq_ids, positions = (jnp.asarray(x, jnp.int32) for x in (tables, seq_ids, positions))
    t, n, h = q.shape
    p, kv, s, _ = k_pages.shape
    m = tables.shape[1]
    split = gpu_split(m, s)
    if split is None:
        raise ValueError(f"the Triton paged kernel cannot walk {m} pages of {s} positions in power-of-two blocks")
    k_splits, per_block = split
    table = tables[jnp.clip(seq_ids, 0, tables.shape[0] - 1)]  # [T, M]
    rows = (table[:, None, :] * kv + jnp.arange(kv, dtype=jnp.int32)[None, :, None]).reshape(t * kv, m)
    lengths = jnp.repeat(jnp.maximum(positions + 1, 0), kv)  # [T*K]: row t*K + kh; 0: padding, zeros
    qs = (q.astype(jnp.float32) * scale).astype(k_pages.dtype).reshape(t * kv, n // kv, h)
    out = paged_attention(qs, k_pages.reshape(1, p * kv, s, h), v_pages.reshape(1, p * kv, s, h), rows, lengths,
                          block_h=16, pages_per_compute_block=per_block, k_splits=k_splits, interpret=interpret,
                          attn_logits_soft_cap=softcap)
    return out.reshape(t, n, h).astype(q.dtype)


def _reference(q, k_pages, v_pages, tables, seq_ids, positions, window, scale, softcap, k_scale, v_scale):
    """The XLA reference, for what a kernel cannot express (int8 pools' scales only when given)."""
    scales = {} if k_scale is None and v_scale is None else dict(k_scale=k_scale, v_scale=v_scale)
    return ragged_paged_attention(q, k_pages, v_pages, tables, seq_ids, positions, window=window, scale=scale,
                                  softcap=softcap, **scales)


def paged_attention_fn(impl: str):
    """The ragged paged attention of `impl` (one of IMPLS): "xla" is `paged_attention.ragged_paged_attention`."""
    fns = {"xla": ragged_paged_attention, "pallas_tpu": ragged_paged_attention_tpu,
           "pallas_gpu": ragged_paged_attention_gpu}
    if impl not in fns:
        raise ValueError(f"paged attention impl must be one of {IMPLS}, not {impl!r}")
    return fns[impl]


def default_paged_impl(backend: str | None = None) -> str:
    """The impl for `backend` (default: JAX's): "pallas_tpu" on a TPU when JAX ships the kernel, "pallas_gpu"
    on a GPU, else "xla"."""
    backend = backend or jax.default_backend()
    if backend == "tpu" and _tpu_kernel() is not None:
        return "pallas_tpu"
    return "pallas_gpu" if backend == "gpu" else "xla"
