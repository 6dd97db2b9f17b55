"""gemma_jax.attention against numpy by hand: decode (XLA loop in both forms of its products, the
Pallas GPU kernel in interpret mode, JAX's TPU paged-attention kernel in TPU interpret mode) and prefill
(jax.nn.dot_product_attention), over MHA / GQA / MQA, sliding windows, rows of different lengths and idle rows; and the Pallas decodes lowered for CUDA and for TPU (no device
needed) take the cache whole, with no slice or copy of it outside the kernel; the XLA loop's
"reduce" form compiled for this CPU reads each cache block in place."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo_text  # noqa: E402  (benchmarks/: the HLO reader of benchmarks/hlo.py)
from gemma_jax import attention  # noqa: E402


def _np_attention(q, k, v, allowed, scale, softcap=None):
    """q [N, H] against k, v [S, H] over the positions in `allowed` [S] (numpy, float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if not allowed.any():
        return np.zeros_like(q)
    logits = q @ k[allowed].T * scale  # [N, L]
    if softcap:
        logits = np.tanh(logits / softcap) * softcap
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v[allowed]


def np_decode(q, k, v, lengths, window, scale, softcap=None):
    b, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    out = np.zeros((b, n, h))
    pos = np.arange(s)
    for row in range(b):
        start = 0 if window is None else max(0, lengths[row] - window)
        allowed = (pos >= start) & (pos < lengths[row])
        for head in range(n):
            kh = head // g
            out[row, head] = _np_attention(q[row, head][None], k[row, kh], v[row, kh], allowed, scale, softcap)[0]
    return out


def _inputs(b, n, kv_heads, s, h, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, h)).astype(np.float32)
    k = rng.standard_normal((b, kv_heads, s, h)).astype(np.float32)
    v = rng.standard_normal((b, kv_heads, s, h)).astype(np.float32)
    return q, k, v, (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype))


# heads (N, K): MHA, GQA, MQA; lengths include an idle row (0), a full row (S) and a short one.
CASES = [(4, 4), (4, 2), (4, 1)]


@pytest.mark.parametrize("products", attention.PRODUCTS)
@pytest.mark.parametrize("heads", CASES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 24], ids=["global", "window24"])
@pytest.mark.parametrize("block", [16, 32, 256], ids=["block16", "block32-overlap", "block>S"])
def test_xla_decode_equals_numpy(heads, window, block, products):
    n, kv_heads = heads
    s, h = 80, 8 if products == "dot" else 96  # 80: the last block overlaps the one before it; 96 = 3 chunks of 32
    q, k, v, (jq, jk, jv) = _inputs(5, n, kv_heads, s, h, seed=n + kv_heads)
    lengths = np.asarray([1, 37, 0, 80, 53], np.int32)
    fn = jax.jit(lambda *a: attention.decode_attention(*a, window=window, scale=0.3, impl="xla", block=block,
                                                       products=products))
    got = np.asarray(fn(jq, jk, jv, jnp.asarray(lengths)))
    np.testing.assert_allclose(got, np_decode(q, k, v, lengths, window, 0.3), rtol=2e-5, atol=2e-5)
    assert np.all(got[2] == 0)  # the idle row


@pytest.mark.parametrize("products", attention.PRODUCTS)
def test_xla_decode_softcap_and_bfloat16(products):
    q, k, v, (jq, jk, jv) = _inputs(3, 4, 2, 64, 16, seed=3)
    lengths = np.asarray([64, 5, 30], np.int32)
    got = attention.decode_attention(jq, jk, jv, jnp.asarray(lengths), scale=0.5, softcap=5.0, block=16,
                                     products=products)
    np.testing.assert_allclose(np.asarray(got), np_decode(q, k, v, lengths, None, 0.5, 5.0), rtol=2e-5, atol=2e-5)
    _, _, _, (bq, bk, bv) = _inputs(3, 4, 2, 64, 16, seed=3, dtype=jnp.bfloat16)
    want = np_decode(*(np.asarray(x.astype(jnp.float32)) for x in (bq, bk, bv)), lengths, 16, 0.5)
    got = attention.decode_attention(bq, bk, bv, jnp.asarray(lengths), window=16, scale=0.5, block=16,
                                     products=products)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("products", attention.PRODUCTS)
def test_xla_decode_loop_runs_only_over_live_blocks(products):
    """Positions past every live row's length are never read: NaN there changes nothing."""
    q, k, v, (jq, jk, jv) = _inputs(3, 2, 1, 128, 8, seed=4)
    lengths = np.asarray([20, 0, 33], np.int32)
    poisoned_k, poisoned_v = jk.at[:, :, 48:].set(jnp.nan), jv.at[:, :, 48:].set(jnp.nan)
    got = attention.decode_attention(jq, poisoned_k, poisoned_v, jnp.asarray(lengths), scale=1.0, block=16,
                                     products=products)
    np.testing.assert_allclose(np.asarray(got), np_decode(q, k, v, lengths, None, 1.0), rtol=2e-5, atol=2e-5)
    # and with a window, the blocks before every live row's window are skipped too
    poisoned_k, poisoned_v = poisoned_k.at[:, :, :16].set(jnp.nan), poisoned_v.at[:, :, :16].set(jnp.nan)
    got = attention.decode_attention(jq, poisoned_k, poisoned_v, jnp.asarray(lengths), window=4, scale=1.0, block=16,
                                     products=products)
    np.testing.assert_allclose(np.asarray(got), np_decode(q, k, v, lengths, 4, 1.0), rtol=2e-5, atol=2e-5)


def test_default_products_and_compiler_options():
    """"reduce" on a CPU only for one query head per kv head and a 128-position K block over
    REDUCE_MIN_BLOCK elements (the 7B's MHA from batch 5); its compiler options only with it."""
    assert attention.default_products(32, 16, 1, 256, backend="cpu") == "reduce"  # the 7B shape, batch 32
    assert attention.default_products(5, 16, 1, 256, backend="cpu") == "reduce"
    assert attention.default_products(4, 16, 1, 256, backend="cpu") == "dot"  # 2^21 elements: not over
    assert attention.default_products(64, 1, 4, 256, backend="cpu") == "dot"  # the 270M: G = 4
    assert attention.default_products(32, 16, 1, 256, backend="gpu") == "dot"
    assert attention.default_products(32, 16, 1, 256, backend="tpu") == "dot"
    assert (attention.xla_block("reduce"), attention.xla_block("dot")) == (attention.CPU_BLOCK, attention.DEFAULT_BLOCK)
    assert attention.compiler_options("dot", backend="cpu") == {}
    assert attention.compiler_options("reduce", backend="gpu") == {}
    assert attention.compiler_options("reduce", backend="cpu") == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}  # this jaxlib accepts it
    with pytest.raises(ValueError, match="products"):
        attention.decode_attention(*_inputs(1, 2, 2, 16, 8)[3], jnp.asarray([3]), scale=1.0, products="gemm")


def _fusion_reads(text: str) -> tuple[int, int]:
    """(block-shaped arrays written by scheduled instructions, dynamic slices of the cache inside
    fusions) of a compiled decode_attention at B, K, S, H = 8, 16, 256, 64 (block 32)."""
    mod = hlo_text.parse(text)
    block = (8, 16, 32, 64)
    written = [i for i in mod.instructions() if i.opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast")
               and any(d == block for _, d in i.arrays)]
    fused = [i for i in mod.all_instructions() if i.opcode == "dynamic-slice" and i.computation not in mod.scheduled
             and any(d == block for _, d in i.arrays)]
    return len(written), len(fused)


def test_reduce_form_reads_each_block_in_place_on_cpu():
    """The "reduce" form compiled with its options slices K and V inside the fusions that use them:
    no [B, K, block, H] array is written. Without the options, or in the "dot" form, XLA:CPU copies
    each block out first (so "none written" means something)."""
    sds = jax.ShapeDtypeStruct

    def compiled(products, options, cache=jnp.float32):
        args = [sds((8, 16, 64), jnp.float32), sds((8, 16, 256, 64), cache), sds((8, 16, 256, 64), cache),
                sds((8,), jnp.int32)]
        scales = [sds((8, 16, 256), jnp.float32)] * 2 if cache == jnp.int8 else [None, None]

        def fn(q, k, v, n, k_scale=None, v_scale=None):
            return attention.decode_attention(q, k, v, n, scale=0.1, products=products, block=32,
                                              k_scale=k_scale, v_scale=v_scale)
        return jax.jit(fn, compiler_options=options).lower(*args, *scales).compile().as_text()

    options = attention.compiler_options("reduce", backend="cpu")
    assert _fusion_reads(compiled("reduce", options)) == (0, 2)
    assert _fusion_reads(compiled("reduce", options, jnp.int8)) == (0, 2)  # int8 blocks, converted inside
    assert _fusion_reads(compiled("reduce", {}))[0] >= 1
    assert _fusion_reads(compiled("dot", options))[0] == 2


@pytest.mark.parametrize("heads,window", [((4, 2), None), ((4, 1), 24), ((2, 2), 7)], ids=["gqa", "mqa-window", "mha-window"])
def test_pallas_gpu_kernel_in_interpret_mode_equals_numpy(heads, window):
    n, kv_heads = heads
    q, k, v, (jq, jk, jv) = _inputs(4, n, kv_heads, 64, 16, seed=7)
    lengths = np.asarray([64, 0, 9, 40], np.int32)
    got = attention.decode_attention(jq, jk, jv, jnp.asarray(lengths), window=window, scale=0.25,
                                     impl="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), np_decode(q, k, v, lengths, window, 0.25), rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(got)[1] == 0)  # idle row: every split skipped, zeros (not NaN)


def test_pallas_split_rule():
    assert attention._pallas_split(2048) == (16, 128)
    assert attention._pallas_split(64) == (4, 16)
    assert attention._pallas_split(1536) == (12, 128)
    assert not attention.pallas_fits(100) and not attention.pallas_fits(8)
    with pytest.raises(ValueError):
        attention.decode_attention(jnp.ones((1, 2, 8)), jnp.ones((1, 1, 100, 8)), jnp.ones((1, 1, 100, 8)),
                                   jnp.ones((1,), jnp.int32), scale=1.0, impl="pallas_interpret")


def test_pallas_decode_lowered_for_cuda_reads_the_cache_only_inside_the_kernel():
    """jax.export lowers the GPU path on this CPU: the Triton kernel is the only consumer of the
    cache, reached through reshapes (views), with no slice, gather, transpose or copy before it."""
    b, n, kv_heads, s, h = 4, 8, 2, 512, 64
    args = [jax.ShapeDtypeStruct((b, n, h), jnp.bfloat16), jax.ShapeDtypeStruct((b, kv_heads, s, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, kv_heads, s, h), jnp.bfloat16), jax.ShapeDtypeStruct((b,), jnp.int32)]
    fn = jax.jit(lambda q, k, v, lengths: attention.decode_attention(q, k, v, lengths, window=128, scale=0.125,
                                                                     impl="pallas_gpu"))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exported.mlir_module()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 1
    ops = set(re.findall(r"stablehlo\.([a-z_]+)", text))
    assert not ops & {"slice", "dynamic_slice", "gather", "transpose", "copy", "concatenate", "pad"}, ops
    body = [line for line in text.splitlines() if "func.func" not in line]
    cache_type = f"tensor<{b}x{kv_heads}x{s}x{h}x"
    uses = [line for line in body if re.search(r"%arg[12]\b", line) and cache_type in line]  # main's k and v
    assert len(uses) == 2 and all("stablehlo.reshape" in line for line in uses), uses
    views = [re.match(r"\s*(%\w+)", line).group(1) for line in uses]
    assert all(any(f"{v}," in ln or f"{v})" in ln for ln in body if "custom_call" in ln) for v in views)


def _bf16(x):
    """x rounded to bfloat16, as the TPU paged-attention kernel reads k and v."""
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("heads,softcap", [((4, 2), None), ((4, 1), None), ((2, 2), 3.0)], ids=["gqa", "mqa", "mha-softcap"])
def test_pallas_tpu_kernel_in_interpret_mode_equals_numpy(heads, softcap):
    """JAX's TPU paged-attention kernel in TPU interpret mode on our [B, K, S, H] cache: rows of
    different lengths (full, idle, one page and a bit, past a compute block), against numpy on the
    bfloat16-rounded k and v the kernel reads."""
    n, kv_heads = heads
    s = 1152  # 9 pages of 128: three compute blocks of 3 pages (384 positions)
    assert attention._tpu_split(s) == (128, 3)
    q, k, v, (jq, jk, jv) = _inputs(4, n, kv_heads, s, 128, seed=11)
    lengths = np.asarray([s, 0, 130, 700], np.int32)
    fn = jax.jit(lambda *a: attention.decode_attention(*a, scale=0.1, softcap=softcap, impl="pallas_tpu_interpret"))
    got = np.asarray(fn(jq, jk, jv, jnp.asarray(lengths)))
    np.testing.assert_allclose(got, np_decode(q, _bf16(k), _bf16(v), lengths, None, 0.1, softcap), rtol=2e-4, atol=2e-4)
    assert np.all(got[1] == 0)  # idle row: zeros


def test_pallas_tpu_window_layers_use_xla_and_paging_rule():
    q, k, v, (jq, jk, jv) = _inputs(3, 4, 2, 64, 16, seed=12)
    lengths = jnp.asarray([64, 5, 30], np.int32)
    tpu = attention.decode_attention(jq, jk, jv, lengths, window=16, scale=0.5, impl="pallas_tpu_interpret")
    xla = attention.decode_attention(jq, jk, jv, lengths, window=16, scale=0.5, impl="xla")
    np.testing.assert_array_equal(np.asarray(tpu), np.asarray(xla))  # the same XLA loop, exactly
    np.testing.assert_allclose(np.asarray(tpu), np_decode(q, k, v, np.asarray(lengths), 16, 0.5), rtol=2e-5, atol=2e-5)
    assert attention._tpu_split(64) == (64, 1) and attention._tpu_split(24) == (8, 3)
    assert attention._tpu_split(4096) == (128, 4)
    assert attention.tpu_fits(2048) and not attention.tpu_fits(100)
    with pytest.raises(ValueError):
        attention.decode_attention(jnp.ones((1, 2, 8)), jnp.ones((1, 1, 100, 8)), jnp.ones((1, 1, 100, 8)),
                                   jnp.ones((1,), jnp.int32), scale=1.0, impl="pallas_tpu_interpret")


def test_pallas_tpu_decode_lowered_for_tpu_reads_the_cache_only_inside_the_kernel():
    """jax.export lowers the TPU path on this CPU (Mosaic): one tpu_custom_call, reached from the
    cache through reshapes (views) only: no transpose, slice, gather or copy of it."""
    b, n, kv_heads, s, h = 4, 8, 2, 512, 128
    args = [jax.ShapeDtypeStruct((b, n, h), jnp.bfloat16), jax.ShapeDtypeStruct((b, kv_heads, s, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, kv_heads, s, h), jnp.bfloat16), jax.ShapeDtypeStruct((b,), jnp.int32)]
    fn = jax.jit(lambda q, k, v, lengths: attention.decode_attention(q, k, v, lengths, scale=0.125, impl="pallas_tpu"))
    text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
    assert len(re.findall(r"custom_call @tpu_custom_call", text)) == 1
    ops = set(re.findall(r"stablehlo\.([a-z_]+)", text))
    assert not ops & {"slice", "dynamic_slice", "gather", "transpose", "copy", "concatenate", "pad"}, ops
    cache_type = f"tensor<{b}x{kv_heads}x{s}x{h}x"
    uses = [line for line in text.splitlines() if "func.func" not in line and re.search(r"%arg[12]\b", line)
            and cache_type in line]  # main's k and v
    assert len(uses) == 2 and all("stablehlo.reshape" in line for line in uses), uses


# -- prefill ---------------------------------------------------------------------------------------
def np_prefill(q, k, v, window, scale, softcap=None):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    out = np.zeros((b, t, n, h))
    pos = np.arange(t)
    for row in range(b):
        for i in range(t):
            allowed = (pos <= i) if window is None else (pos <= i) & (pos > i - window)
            for head in range(n):
                kh = head // (n // kv_heads)
                out[row, i, head] = _np_attention(q[row, i, head][None], k[row, :, kh], v[row, :, kh], allowed,
                                                  scale, softcap)[0]
    return out


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])  # on a CPU, pallas_gpu's cuDNN request falls back to XLA
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 4.0), (5, 4.0)])
def test_prefill_equals_numpy(impl, window, softcap):
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 12, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
    got = attention.prefill_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, scale=0.4,
                                      softcap=softcap, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np_prefill(q, k, v, window, 0.4, softcap), rtol=2e-5, atol=2e-5)


def test_default_impl_is_explicit():
    assert attention.default_impl("gpu") == "pallas_gpu"
    assert attention.default_impl("cpu") == "xla" and attention.default_impl("tpu") == "xla"
    with pytest.raises(ValueError):
        attention.decode_attention(jnp.ones((1, 2, 8)), jnp.ones((1, 1, 16, 8)), jnp.ones((1, 1, 16, 8)),
                                   jnp.ones((1,), jnp.int32), scale=1.0, impl="cuda")


# -- in the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_model_decode_steps_equal_the_full_forward(impl):
    """Gemma 3 shape (sliding-window layers, window 8 < the 20 tokens): a 6-token prefill with
    return_kv placed into a 64-position cache, then one token per step in rows of different lengths
    (row 1 idle at position S in the first steps), against one full forward of each row."""
    from gemma_jax import config as config_lib
    from gemma_jax.model import LayerCache, forward, init_cache
    from gemma_jax.params import init_params

    cfg = config_lib.tiny_gemma3().replace(sliding_window=8)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 20)), jnp.int32)
    fwd = jax.jit(forward, static_argnames=("config", "kv_len", "return_kv", "attn_impl"))
    full = np.asarray(fwd(params, tokens, jnp.broadcast_to(jnp.arange(20), (2, 20)), config=cfg)[0])

    s, start = 64, 6
    _, kv = fwd(params, tokens[:, :start], jnp.broadcast_to(jnp.arange(start), (2, start)), config=cfg,
                    return_kv=True)
    cache = {name: LayerCache(k=c.k.at[:, :, :start].set(kv[name].k), v=c.v.at[:, :, :start].set(kv[name].v))
             for name, c in init_cache(cfg, 2, s).items()}
    step = jax.jit(lambda p, t, pos, c: fwd(p, t, pos, c, config=cfg, attn_impl=impl))
    late = 9  # row 1 joins at step 9: idle before (position S), its cache filled meanwhile by the prefill
    for t in range(start, 20):
        pos = jnp.asarray([[t], [t if t >= late else s]], jnp.int32)
        if t == late:  # catch row 1 up to position `late` with a cached multi-token call (masked path)
            ids = jnp.broadcast_to(jnp.arange(start, late), (2, late - start))
            _, cache = fwd(params, tokens[:, start:late], jnp.where(jnp.arange(2)[:, None] == 1, ids, s), cache,
                               config=cfg, kv_len=s)
        logits, cache = step(params, tokens[:, t:t + 1], pos, cache)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[0, t], rtol=2e-4, atol=2e-4)
        if t >= late:
            np.testing.assert_allclose(np.asarray(logits)[1, 0], full[1, t], rtol=2e-4, atol=2e-4)


def test_model_decode_with_the_tpu_kernel_equals_xla():
    """A tiny Gemma 3 (global and sliding-window layers) decoding rows of different lengths with
    "pallas_tpu_interpret" gives the logits of "xla" within the kernel's bfloat16 rounding of k, v."""
    from gemma_jax import config as config_lib
    from gemma_jax.model import LayerCache, forward, init_cache
    from gemma_jax.params import init_params

    cfg = config_lib.tiny_gemma3().replace(sliding_window=8)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    s, start = 64, 12
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, start + 1)), jnp.int32)
    _, kv = forward(params, tokens[:, :start], jnp.broadcast_to(jnp.arange(start), (2, start)), config=cfg,
                    return_kv=True)
    cache = {name: LayerCache(k=c.k.at[:, :, :start].set(kv[name].k), v=c.v.at[:, :, :start].set(kv[name].v))
             for name, c in init_cache(cfg, 2, s).items()}
    pos = jnp.asarray([[start], [5]], jnp.int32)  # row 1 shorter: it decodes at position 5
    got = {impl: np.asarray(forward(params, tokens[:, start:], pos, cache, config=cfg, attn_impl=impl)[0])
           for impl in ("xla", "pallas_tpu_interpret")}
    assert np.abs(got["xla"]).max() > 1e-2  # not a trivial comparison
    np.testing.assert_allclose(got["pallas_tpu_interpret"], got["xla"], rtol=2e-2, atol=2e-2)
