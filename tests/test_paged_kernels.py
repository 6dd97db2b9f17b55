"""The accelerator paged-attention wrappers (gemma_jax/paged_kernels.py) against the XLA reference.

Pools of random junk in which `write_pages` writes four sequences' KV under shuffled page tables;
a flat batch of decode tokens (sequences out of order), prompt chunks (one starting at a page
boundary over a cached prefix) and padding. float32 and bfloat16; MHA, GQA, MQA; sliding windows;
a logit softcap. "pallas_gpu" runs JAX's Triton paged kernel in Pallas interpret mode. jax 0.10.2's
TPU interpreter cannot run the TPU ragged kernel (a reshaped ref), so "pallas_tpu" is checked as the
wrapper's layout and run conversion through the kernel's own pure-JAX reference
(`ref_ragged_paged_attention`, same inputs and masks), plus one interpret-mode try that xfails
while the interpreter refuses.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gemma_jax import paged_kernels
from gemma_jax.paged_attention import ragged_paged_attention, write_pages
from gemma_jax.paged_kernels import (IMPLS, default_paged_impl, gpu_fits, paged_attention_fn,
                                     ragged_paged_attention_gpu, ragged_paged_attention_tpu)

S, M, H, PAGES = 16, 4, 128, 20  # positions per page, pages per table, head dim (TPU kernel: x128), pool
SCALE = 0.09
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
CASES = [(None, None), (8, None), (20, 5.0)]  # (window, softcap): a window inside a page, one across pages
HEADS = [(4, 2), (2, 2), (4, 1)]  # (N, K): GQA, MHA, MQA
# Sequence lengths before the step (what is cached), and the step: seq 2 and seq 0 decode, seq 1 a
# chunk at 3..9, seq 3 a chunk at 16..19 (a new page over a cached first page), two padding tokens.
CONTEXT = (50, 3, 37, 16)
SEQ_IDS = [2, 0, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 0, 0]
POSITIONS = [37, 50, 3, 4, 5, 6, 7, 8, 9, 16, 17, 18, 19, -1, -1]


def batch(n, kv, dtype, seq_ids=SEQ_IDS, positions=POSITIONS, seed=0):
    """(q, k_pages, v_pages, tables, seq_ids, positions): every sequence's KV at positions 0 ..
    (its last position in the step) written by `write_pages` into a pool of random junk."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    k_pages, v_pages = normal(PAGES, kv, S, H), normal(PAGES, kv, S, H)
    tables = rng.permutation(np.arange(1, PAGES))[: len(CONTEXT) * M].reshape(len(CONTEXT), M).astype(np.int32)
    for seq, cached in enumerate(CONTEXT):
        last = max([cached] + [p for s, p in zip(seq_ids, positions) if s == seq and p >= 0])
        pos = np.arange(last + 1)
        k_pages, v_pages = write_pages(k_pages, v_pages, normal(len(pos), kv, H), normal(len(pos), kv, H),
                                       jnp.asarray(tables[seq, pos // S]), jnp.asarray(pos % S))
    q = normal(len(positions), n, H)
    return q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(seq_ids, jnp.int32), jnp.asarray(positions, jnp.int32)


def check(got, want, positions, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert not got[np.asarray(positions) < 0].any()  # padding: zeros


def through_kernel_reference(window, softcap):
    """The TPU kernel's contract run by its own pure-JAX reference (which returns only the live rows)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    def call(q, kv_pages, *meta):  # the wrapper runs eagerly here: the metadata is concrete, one program
        meta = [np.asarray(x) for x in meta]
        ref = lambda q, kv: ref_ragged_paged_attention(q, kv, *meta, sm_scale=SCALE, sliding_window=window,
                                                       soft_cap=softcap)
        out = jax.jit(ref)(q, kv_pages)
        return jnp.zeros_like(q).at[: out.shape[0]].set(out)
    return call


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,kv", HEADS)
@pytest.mark.parametrize("window,softcap", CASES)
def test_tpu_wrapper_conversion_equals_reference(dtype, n, kv, window, softcap):
    args = batch(n, kv, dtype)
    want = ragged_paged_attention(*args, window=window, scale=SCALE, softcap=softcap)
    got = paged_kernels._through_ragged_kernel(through_kernel_reference(window, softcap), *args)
    check(got, want, args[-1], dtype)


def test_tpu_wrapper_runs_padding_between_and_a_sequence_twice():
    """Padding between live tokens, and seq 1's tokens in two runs (4 runs for Q = 4 table rows)."""
    seq_ids, positions = [1, 1, 0, 0, 1, 1, 2], [4, 5, -1, 50, 6, 7, 37]
    args = batch(4, 2, jnp.float32, seq_ids, positions, seed=1)
    want = ragged_paged_attention(*args, window=None, scale=SCALE)
    got = paged_kernels._through_ragged_kernel(through_kernel_reference(None, None), *args)
    check(got, want, positions, jnp.float32)


def test_tpu_wrapper_runs_past_the_table_rows_return_zeros():
    """More runs than table rows breaks the precondition: the runs past Q come back as zeros."""
    seq_ids, positions = [0, 1, 0, 1, 0], [48, 4, 49, 5, 50]  # 5 runs, Q = 4
    args = batch(4, 2, jnp.float32, seq_ids, positions, seed=2)
    want = ragged_paged_attention(*args, window=None, scale=SCALE)
    got = np.asarray(paged_kernels._through_ragged_kernel(through_kernel_reference(None, None), *args))
    np.testing.assert_allclose(got[:4], np.asarray(want)[:4], rtol=1e-5, atol=1e-5)
    assert not got[4].any()


def test_tpu_kernel_in_interpret_mode():
    args = batch(4, 2, jnp.float32)
    want = ragged_paged_attention(*args, window=8, scale=SCALE, softcap=5.0)
    try:
        got = ragged_paged_attention_tpu(*args, window=8, scale=SCALE, softcap=5.0, interpret=True)
    except jax.errors.JaxRuntimeError as e:  # jax 0.10.2: its TPU interpreter takes indexed refs, not reshaped ones
        if "ReshapeTransform" not in str(e):
            raise
        pytest.xfail(f"jax {jax.__version__}'s TPU interpreter cannot run the ragged kernel (a reshaped ref)")
    check(got, want, args[-1], jnp.float32)


def test_tpu_without_the_kernel_raises_not_implemented(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.tpu.ragged_paged_attention", None)
    with pytest.raises(NotImplementedError, match="ragged_paged_attention"):
        ragged_paged_attention_tpu(*batch(4, 2, jnp.float32), scale=SCALE)
    assert default_paged_impl("tpu") == "xla"


def test_int8_scales_go_to_the_reference(monkeypatch):
    seen = []
    monkeypatch.setattr(paged_kernels, "ragged_paged_attention", lambda *a, **kw: seen.append(kw) or "reference")
    args = batch(4, 2, jnp.float32)
    k_scale, v_scale = jnp.ones((PAGES, 2, S)), jnp.ones((PAGES, 2, S))
    for fn in (ragged_paged_attention_tpu, ragged_paged_attention_gpu):
        assert fn(*args, scale=SCALE, k_scale=k_scale, v_scale=v_scale, interpret=True) == "reference"
    assert all(kw["k_scale"] is k_scale and kw["v_scale"] is v_scale for kw in seen) and len(seen) == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,kv", HEADS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_gpu_kernel_in_interpret_mode_equals_reference(dtype, n, kv, softcap):
    args = batch(n, kv, dtype)
    want = ragged_paged_attention(*args, scale=SCALE, softcap=softcap)
    fn = jax.jit(functools.partial(ragged_paged_attention_gpu, scale=SCALE, softcap=softcap, interpret=True))
    check(fn(*args), want, args[-1], dtype)


def test_gpu_sliding_window_uses_the_reference():
    args = batch(4, 2, jnp.float32)
    want = ragged_paged_attention(*args, window=8, scale=SCALE)
    got = ragged_paged_attention_gpu(*args, window=8, scale=SCALE, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gpu_split():
    assert gpu_fits(4, 16) and gpu_fits(3, 16) and gpu_fits(64, 8)
    assert paged_kernels.gpu_split(64, 8) == (16, 4)  # 16 splits of 4 pages, blocks of 4 pages = 32 positions
    assert not gpu_fits(3, 4) and not gpu_fits(4, 12)
    q, k_pages, v_pages, tables, seq_ids, positions = batch(4, 2, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        ragged_paged_attention_gpu(q, k_pages[:, :, :12], v_pages[:, :, :12], tables, seq_ids, positions, scale=SCALE)


def test_impls_and_default():
    assert IMPLS == ("xla", "pallas_tpu", "pallas_gpu")
    assert paged_attention_fn("xla") is ragged_paged_attention
    assert paged_attention_fn("pallas_tpu") is ragged_paged_attention_tpu
    assert paged_attention_fn("pallas_gpu") is ragged_paged_attention_gpu
    with pytest.raises(ValueError, match="one of"):
        paged_attention_fn("cuda")
    assert default_paged_impl("tpu") == "pallas_tpu"
    assert default_paged_impl("gpu") == "pallas_gpu"
    assert default_paged_impl("cpu") == "xla" == default_paged_impl()
