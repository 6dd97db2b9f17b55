"""Attention kernels: one new token per row against its KV cache (decode), and whole prompts (prefill).

    decode_attention(q [B, N, H], k [B, K, S, H], v [B, K, S, H], lengths [B], *,
                     window, scale, softcap, impl, k_scale=None, v_scale=None) -> [B, N, H]
    prefill_attention(q [B, T, N, H], k [B, T, K, H], v [B, T, K, H], *,
                      window, scale, softcap, impl) -> [B, T, N, H]

Shape letters as in `projections.py` (K is kv heads; G = N // K query heads per kv head).

Decode reads each row's own keys in place. Row b attends cache positions [start_b, lengths[b]) with
start_b = max(0, lengths[b] - window) on sliding-window layers (else 0); lengths counts the current
token, already written. A row with length 0 is idle: its output is zeros, and it costs nothing.
The implementations, equal to the masked softmax within float tolerance:

- "xla" (CPU, TPU, fallback): an online softmax over blocks of `block` positions in a
  `lax.fori_loop` whose bounds are computed on the device: from the first block any live row needs
  to the last (the batch's longest live row). Each block is read with `lax.dynamic_slice`, so no
  [B, K, span, H] copy of the cache is made and nothing is compiled per context length. The block's
  two products take one of two forms (`products`):
  * "dot" (accelerators; on a CPU for G > 1 and for small batches; blocks of 128): two einsums. A
    TPU dot reads the sliced block in place; XLA:CPU fuses no slice into a dot, so there each block
    is copied out first (a [B, K, block, H] temporary, K and V, every layer and step: the live KV
    moved three times; cheap while the block stays in the CPU's caches).
  * "reduce" (the CPU, for MHA batches whose blocks outgrow its caches: `default_products`; blocks
    of `CPU_BLOCK` = 32): the products as multiplies and sums, which XLA:CPU fuses with the slice
    into one loop that reads the block where it lies. Two conditions
    make it fuse, both found by compiling one-op programs on jax 0.10.2: every sum runs over at most
    32 terms (XLA:CPU rewrites a longer reduction into a reduce-window tree, which fuses no producer),
    so the positions come in blocks of 32 and the head dimension is summed in chunks of
    `REDUCE_CHUNK` behind an optimization barrier (XLA would merge the two sums back into one); and
    the program is compiled with `compiler_options("reduce")`, which leaves XLA:CPU's YNNPACK library
    fusions to dots only (its elementwise and reduction fusions take the multiply but not the slice,
    and the slice is copied again). Products are formed in float32 from the same rounded operands as
    the dot form's, so the two forms agree to float32 summation order. Measured on a 2-core EPYC
    (32 MiB L3), one layer's decode attention at context 1000 of 1024, float32, H = 256, MHA with 16
    heads, dot vs reduce: batch 32 174 vs 78 ms, batch 8 48 vs 19 ms, batch 6 33 vs 15 ms, batch 4
    8.2 vs 9.4 ms, batch 1 1.6 vs 2.3 ms (each loop iteration has a fixed cost, and 4x as many run);
    with G > 1 the dot wins at every size (the 270M's G = 4 at batch 8: 1.2 vs 2.9 ms; G = 8 at
    batch 32: 8.7 vs 23 ms), since it reuses each key for the G queries.
- "pallas_gpu": JAX's Triton decode kernel (`jax.experimental.pallas.ops.gpu.decode_attention`,
  `decode_attn_unbatched`) mapped over (B, K) on our [B, K, S, H] layout as it is (no transpose),
  with start_idx = start_b and kv_seq_len = lengths[b]: each program loops only over its row's
  blocks. It needs S to split into
  power-of-two blocks (`pallas_fits`), no softcap, and no mesh (not wrapped in shard_map).
  "pallas_interpret" is the same kernel in Pallas interpret mode: it runs on the CPU (tests).
- "pallas_tpu": JAX's TPU paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`)
  on our layout with no copy: the cache is viewed as one kv head of B*K*S/page pages
  (k.reshape(1, B*K*S/page, page, H), a reshape), and each (row, kv head) pair is one of the
  kernel's B*K sequences, whose G query heads (q.reshape(B*K, G, H)) read pages
  (b*K + kh)*S/page + 0, 1, ... up to lengths[b]. (The kernel's own [K, pages, page, H] layout would
  need a B<->K transpose, a copy of the cache; JAX's ragged_paged_attention wants k and v
  interleaved in one array, a copy too.) The kernel rounds k and v to bfloat16 inside (its
  dequantize step), so float32 caches lose precision there. It has no start position, so
  sliding-window layers (`window` set) use "xla"; it needs a page size dividing S (`tpu_fits`).
  The logit softcap is the kernel's own. "pallas_tpu_interpret" is the same kernel in Pallas TPU
  interpret mode (`pltpu.force_tpu_interpret_mode`): it runs on the CPU (tests).

Prefill uses `jax.nn.dot_product_attention`, causal by *index* (each row's real tokens at
positions 0, 1, ..., padding after them), with `local_window_size` on sliding-window layers; with
impl "pallas_gpu" it asks for cuDNN's flash attention (causal blocks skipped, no [T, T] scores in
memory), falling back to XLA where cuDNN refuses the call (dtype, head size, version). A softcap
(which neither supports) uses the plain masked einsum. The TPU impls prefill with XLA.

`default_impl()` is the explicit automatic choice: "pallas_gpu" on a GPU backend, else "xla".

An int8 cache (`model.init_cache(..., jnp.int8)`) comes with float32 scales k_scale, v_scale
[B, K, S], one per (row, kv head, position). Only "xla" reads it, and it never dequantizes a block:
the scale is constant along H, so it factors out of both products. Per block, logits =
(q . k_int8) * k_scale (the int8 block cast to q's dtype, exact in bf16 and f32), and the
probabilities are multiplied by v_scale before the PV product: sum_s p_s v_scale_s v_int8_s. The
softmax denominator uses the unscaled p. Neither Pallas kernel reads it, so every impl decodes an
int8 cache with the "xla" loop (as the TPU impls do sliding-window layers; prefill, which has no
cache, still uses the impl's own path, cuDNN's flash attention for "pallas_gpu"): JAX's GPU decode
kernel takes no scales; the TPU paged-attention kernel takes int8 pages with scales, but broadcasts
the scales to the cache's full [.., page, H] shape before its call (a float array as large as the
cache, written and read on every step: what int8 is meant to avoid).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "pallas_gpu", "pallas_interpret", "pallas_tpu", "pallas_tpu_interpret")
PRODUCTS = ("dot", "reduce")  # the XLA loop's forms of its two block products (module docstring)
DEFAULT_BLOCK = 128  # positions per block of the XLA decode loop, "dot" form
CPU_BLOCK = 32  # positions per block, "reduce" form: XLA:CPU fuses a slice into sums of <= 32 terms
REDUCE_CHUNK = 32  # the "reduce" form sums the head dimension in chunks of this many
REDUCE_MIN_BLOCK = 1 << 21  # CPU: "reduce" above this many elements in a 128-position K block (8 MiB in f32)
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_NEG_INF = float(jnp.finfo(jnp.float32).min)


def default_impl(backend: str | None = None) -> str:
    """The implementation `Engine` picks unless told: "pallas_gpu" on a GPU backend, else "xla"."""
    return "pallas_gpu" if (backend or jax.default_backend()) == "gpu" else "xla"


def default_products(batch: int, kv_heads: int, groups: int, head_dim: int, backend: str | None = None) -> str:
    """The XLA decode loop's form of its block products for a batch of `batch` rows, `kv_heads` kv
    heads of `head_dim`, `groups` query heads per kv head: "reduce" on a CPU backend when one query
    head reads each kv head (G = 1, MHA: the products are matrix-vector products, which a dot runs
    no faster) and a `DEFAULT_BLOCK`-position K block of the batch is over `REDUCE_MIN_BLOCK`
    elements (the dot form's copies then leave the CPU's caches); "dot" otherwise (module docstring)."""
    if (backend or jax.default_backend()) != "cpu" or groups != 1:
        return "dot"
    return "reduce" if batch * kv_heads * DEFAULT_BLOCK * head_dim > REDUCE_MIN_BLOCK else "dot"


def xla_block(products: str) -> int:
    """Positions per block of the XLA decode loop in the form `products`."""
    return CPU_BLOCK if products == "reduce" else DEFAULT_BLOCK


@functools.cache
def _accepts(options: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((1,))).compile(dict(options))
        return True
    except Exception:  # an XLA that lacks the option (renamed or gone) rejects it at compile time
        return False


def compiler_options(products: str, backend: str | None = None) -> dict:
    """Compiler options for a program whose decode attention runs in the form `products`
    (`jax.jit(..., compiler_options=...)`): for "reduce" on a CPU, YNNPACK library fusions for dots
    only, so that XLA:CPU fuses each cache block's slice into the sums (module docstring); nothing
    otherwise, or where this jaxlib rejects the option (the loop is then correct but copies its
    blocks)."""
    if products != "reduce" or (backend or jax.default_backend()) != "cpu":
        return {}
    return dict(_CPU_OPTIONS) if _accepts(tuple(_CPU_OPTIONS.items())) else {}


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, not {impl!r}")


# -- decode ----------------------------------------------------------------------------------------
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, window: int | None = None,
                     scale: float, softcap: float | None = None, impl: str = "xla",
                     block: int | None = None, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None, products: str | None = None) -> jax.Array:
    """One query per row against that row's cache: q [B, N, H], k/v [B, K, S, H], lengths [B] int32
    (valid positions, the current token included; 0 = idle row) -> [B, N, H] in q's dtype.

    window: sliding-window size (a row attends its last `window` positions) or None. scale: the query
    scale. softcap: tanh cap of the logits or None. impl: one of IMPLS (see the module docstring);
    block: the XLA loop's block (default `xla_block(products)`). k_scale, v_scale: [B, K, S] scales
    of an int8 cache (k, v int8), else None; with them the XLA loop runs whatever `impl` says (see
    the module docstring). products: the XLA loop's form of its products, one of PRODUCTS (default
    `default_products` of these shapes: "reduce" on a CPU for a large MHA batch, else "dot")."""
    _check_impl(impl)
    products = products or default_products(q.shape[0], k.shape[1], q.shape[1] // k.shape[1], q.shape[2])
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, not {products!r}")
    block = min(block or xla_block(products), k.shape[2])
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} kv heads")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("an int8 cache needs both k_scale and v_scale")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, k.shape[2])
    starts = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)
    if k_scale is not None:  # int8 cache: the XLA loop whatever `impl` (neither kernel reads scales)
        return _decode_xla(q, k, v, starts, lengths, scale, softcap, block, products, k_scale, v_scale)
    if impl in ("pallas_tpu", "pallas_tpu_interpret"):
        if window is None:  # the TPU kernel has no start position: sliding-window layers use XLA
            return _decode_pallas_tpu(q, k, v, lengths, scale, softcap, interpret=impl == "pallas_tpu_interpret")
        impl = "xla"
    if impl != "xla":
        if softcap:
            raise ValueError("the Pallas decode kernel has no logit softcap: use impl='xla'")
        return _decode_pallas(q, k, v, starts, lengths, scale, interpret=impl == "pallas_interpret")
    return _decode_xla(q, k, v, starts, lengths, scale, softcap, block, products)


def _chunk(h: int) -> int:
    """The largest divisor of h that is at most REDUCE_CHUNK."""
    return max(c for c in range(1, min(h, REDUCE_CHUNK) + 1) if h % c == 0)


def _logits_reduce(qg, kb):
    """qg [B, K, G, H] . kb [B, K, block, H] -> [B, K, G, block] float32, as sums of <= REDUCE_CHUNK
    products (fused with kb's slice on XLA:CPU; see the module docstring)."""
    h = qg.shape[-1]
    prod = qg.astype(jnp.float32)[:, :, :, None, :] * kb.astype(jnp.float32)[:, :, None]  # [B, K, G, block, H]
    part = prod.reshape(*prod.shape[:-1], h // _chunk(h), _chunk(h)).sum(axis=-1)
    return part.sum(axis=-1) if part.shape[-1] == 1 else lax.optimization_barrier(part).sum(axis=-1)


def _values_reduce(p, vb):
    """p [B, K, G, block] . vb [B, K, block, H] -> [B, K, G, H] float32: one sum over the block's
    positions (<= CPU_BLOCK terms, fused with vb's slice on XLA:CPU)."""
    return (p.astype(jnp.float32)[..., None] * vb.astype(jnp.float32)[:, :, None]).sum(axis=3)


def _decode_xla(q, k, v, starts, lengths, scale, softcap, block, products, k_scale=None, v_scale=None):
    b, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    qg = q.reshape(b, kv_heads, g, h)
    live = lengths > 0
    first = jnp.min(jnp.where(live, starts, s)) // block  # no live row: first >= last, no iteration
    last = (jnp.max(jnp.where(live, lengths, 0)) + block - 1) // block

    def body(i, carry):
        m, l, acc = carry  # running max [B, K, G], denominator [B, K, G], numerator [B, K, G, H]
        at = jnp.minimum(i * block, s - block)  # the last block may overlap the one before it
        kb = lax.dynamic_slice_in_dim(k, at, block, axis=2)  # [B, K, block, H]
        vb = lax.dynamic_slice_in_dim(v, at, block, axis=2)
        pos = at + jnp.arange(block)
        valid = (pos >= i * block)[None] & (pos >= starts[:, None]) & (pos < lengths[:, None])  # [B, block]
        valid = valid[:, None, None]  # [B, 1, 1, block]
        if products == "dot":
            logits = jnp.einsum("BKGH,BKSH->BKGS", qg, kb.astype(q.dtype), preferred_element_type=jnp.float32)
        else:
            logits = _logits_reduce(qg, kb.astype(q.dtype))
        logits = logits * scale
        if k_scale is not None:  # int8 keys: (q . k_int8) * k_scale, per position
            logits = logits * lax.dynamic_slice_in_dim(k_scale, at, block, axis=2)[:, :, None]
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        logits = jnp.where(valid, logits, _NEG_INF)
        m_next = jnp.maximum(m, logits.max(axis=-1))
        p = jnp.where(valid, jnp.exp(logits - m_next[..., None]), 0.0)  # a fully masked block adds 0
        correction = jnp.exp(m - m_next)
        if v_scale is None:
            pw, vw = p.astype(vb.dtype), vb
        else:  # int8 values: (p * v_scale) . v_int8; the denominator below keeps the unscaled p
            pw = (p * lax.dynamic_slice_in_dim(v_scale, at, block, axis=2)[:, :, None]).astype(q.dtype)
            vw = vb.astype(q.dtype)
        if products == "dot":
            pv = jnp.einsum("BKGS,BKSH->BKGH", pw, vw, preferred_element_type=jnp.float32)
        else:
            pv = _values_reduce(pw, vw)
        return m_next, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    init = (jnp.full((b, kv_heads, g), _NEG_INF, jnp.float32), jnp.zeros((b, kv_heads, g), jnp.float32),
            jnp.zeros((b, kv_heads, g, h), jnp.float32))
    with jax.named_scope("decode_attention"):
        _, l, acc = lax.fori_loop(first, last, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # idle rows: 0
    return out.reshape(b, n, h).astype(q.dtype)


def pallas_fits(max_len: int) -> bool:
    """Whether the Pallas decode kernel can split a cache of `max_len` positions (power-of-two blocks)."""
    return _pallas_split(max_len) is not None


def _pallas_split(s: int, block_k: int = 128, most_splits: int = 16) -> tuple[int, int] | None:
    """(k_splits, block_k) for a cache of s positions: s = k_splits x split, split a multiple of a
    power-of-two block_k >= 16 (Triton's tiles), or None."""
    for splits in range(most_splits, 0, -1):
        if s % splits:
            continue
        split = s // splits
        blk = min(block_k, split)
        if split >= 16 and blk & (blk - 1) == 0 and split % blk == 0:
            return splits, blk
    return None


def _decode_pallas(q, k, v, starts, lengths, scale, interpret):
    from jax.experimental.pallas.ops.gpu import decode_attention as kernels

    b, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    split = _pallas_split(s)
    if split is None:
        raise ValueError(f"the Pallas decode kernel cannot split a cache of {s} positions into power-of-two blocks")
    k_splits, block_k = split
    options = dict(sm_scale=scale, block_h=16, block_k=block_k, k_splits=k_splits, num_warps=None, num_stages=2,
                   grid=None, interpret=interpret, debug=False, return_residuals=False, normalize_output=True)
    accepted = inspect.signature(kernels.decode_attn_unbatched).parameters  # normalize_output is newer
    kernel = functools.partial(kernels.decode_attn_unbatched, **{key: val for key, val in options.items() if key in accepted})
    start_idx = jnp.broadcast_to(starts[:, None], (b, kv_heads))  # [B, K]: one program per (row, kv head)
    kv_len = jnp.broadcast_to(lengths[:, None], (b, kv_heads))
    # [B, K] programs of q [G, H] against k, v [S, H]: the kernel's own layout, cut from ours with no copy.
    out = jax.vmap(jax.vmap(kernel))(q.reshape(b, kv_heads, n // kv_heads, h), k.astype(q.dtype), v.astype(q.dtype),
                                     start_idx, kv_len)
    return out.reshape(b, n, h).astype(q.dtype)


def tpu_fits(max_len: int) -> bool:
    """Whether the TPU paged-attention kernel can page a cache of `max_len` positions."""
    return _tpu_split(max_len) is not None


def _tpu_split(s: int, most_block: int = 512) -> tuple[int, int] | None:
    """(page_size, pages_per_compute_block) for a cache of s positions: the largest page of
    128, 64, 32, 16 or 8 positions (TPU sublane tiles) dividing s, and the most pages per kernel
    step that divide s / page and span at most `most_block` positions; or None."""
    for page in (128, 64, 32, 16, 8):
        if s % page == 0:
            pages = s // page
            per_block = max(d for d in range(1, pages + 1) if pages % d == 0 and d * page <= max(most_block, page))
            return page, per_block
    return None


def _decode_pallas_tpu(q, k, v, lengths, scale, softcap, interpret):
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    b, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    split = _tpu_split(s)
    if split is None:
        raise ValueError(f"the TPU paged-attention kernel cannot page a cache of {s} positions (multiples of 8)")
    page, per_block = split
    pages = s // page
    k_pages = k.reshape(1, b * kv_heads * pages, page, h)  # views of [B, K, S, H]: no copy
    v_pages = v.reshape(1, b * kv_heads * pages, page, h)
    page_indices = jnp.arange(b * kv_heads * pages, dtype=jnp.int32).reshape(b * kv_heads, pages)
    seq_lengths = jnp.repeat(lengths, kv_heads)  # sequence b*K + kh is row b's kv head kh
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b * kv_heads, n // kv_heads, h)
    call = functools.partial(paged_attention, attn_logits_soft_cap=softcap or None, pages_per_compute_block=per_block)
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            out = call(qs, k_pages, v_pages, seq_lengths, page_indices)
    else:
        out = call(qs, k_pages, v_pages, seq_lengths, page_indices)
    out = jnp.where((lengths > 0)[:, None, None], out.reshape(b, n, h), 0)  # idle rows: zeros
    return out.astype(q.dtype)


# -- prefill ---------------------------------------------------------------------------------------
def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None, scale: float,
                      softcap: float | None = None, impl: str = "xla") -> jax.Array:
    """Causal self-attention of whole prompts: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    Causal by index: token t attends tokens j <= t (and j > t - window with a window), so each row's
    real tokens must sit at positions 0..len-1 with any padding after them (whose outputs are junk)."""
    _check_impl(impl)
    if softcap:
        return _prefill_einsum(q, k, v, window, scale, softcap)
    kw = dict(scale=scale, is_causal=True, local_window_size=None if window is None else (window - 1, 0))
    if impl == "pallas_gpu":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            pass  # cuDNN refuses this call (dtype, head size, version): XLA below
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)


def _prefill_einsum(q, k, v, window, scale, softcap):
    """The plain masked softmax (materialises [B, K, G, T, T] logits): only for a softcap."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.tanh(logits / softcap) * softcap
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = (j <= i) if window is None else (j <= i) & (j > i - window)
    probs = jax.nn.softmax(jnp.where(mask, logits, _NEG_INF), axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h).astype(q.dtype)
