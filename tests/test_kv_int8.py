"""The int8 KV cache against independent references.

- `model.quantize_kv` equals a numpy quantizer (scales within 1 ulp: XLA divides by 127 as a
  multiplication), and |x - x_int8 * scale| <= scale / 2;
- `attention.decode_attention` on an int8 cache (scales folded into the products, in both forms of
  the XLA loop) equals numpy's masked softmax over the numpy-dequantized cache, for ragged lengths
  with idle rows, sliding windows, MHA / GQA / MQA, loop blocks that overlap, a softcap, bf16
  compute, and the Pallas impls
  (which decode an int8 cache with the XLA loop);
- the tiny Gemma 3 (random weights, sliding window 4) decoding with an int8 cache vs a float32 one,
  the float run's tokens fed to both: per-step logit cosine min 0.99979, mean 0.99993, max |diff|
  0.0105 (logit std 0.16), greedy top-1 agreement 63/64 (measured when written; asserted: cosine >
  0.999, agreement >= 60/64);
- the engine: prefill's int8 prefix is `quantize_kv` of the float prefix exactly, insert puts it in
  place, and greedy tokens equal the float cache's until a near-tie (random weights have top-2 logit
  margins down to 0.0007): where a prompt diverges, the two tokens' float logits differ by less than
  the largest logit error above (0.02 asserted); on a 2x2 fake mesh the scales are split like the
  cache and the tokens equal the one-device int8 engine's;
- the compiled decode with an int8 cache has no `conditional` and converts no [B, K, S, H] cache to
  float (checked against a program that does, so "none found" means something): each step reads
  int8 blocks of `attention.DEFAULT_BLOCK` positions (the "dot" form: G = 2); the "reduce" form
  reads them in place (tests/test_attention.py);
- `serve --kv-cache int8` / GEMMA_JAX_KV_CACHE=int8 and `generate --kv-cache int8` reach the Engine,
  and a request served through the scheduler gets the engine's own tokens.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from engine_reference import ENGINE_KW, prompts_for, run_to_completion, tiny_params
from gemma_jax import attention
from gemma_jax.engine.api import Request, SamplingParams
from gemma_jax.engine.engine import Engine, generate_steps
from gemma_jax.engine.state import init_decode_state
from gemma_jax.model import forward, init_cache, kv_cache_dtype, quantize_kv
from gemma_jax.sharding import make_mesh
from test_attention import np_decode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hlo_text  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def np_quantize(x):
    """numpy's symmetric int8 per vector (last axis): (int8, float32 scale)."""
    x = np.asarray(x, np.float32)
    scale = (np.abs(x).max(-1) / np.float32(127)).astype(np.float32)
    q = np.clip(np.round(x / np.where(scale > 0, scale, 1)[..., None]), -127, 127).astype(np.int8)
    return q, scale


def _cache(rng, shape):
    """A float cache whose vectors have very different magnitudes (one scale each matters)."""
    x = rng.standard_normal(shape).astype(np.float32)
    return x * np.exp(rng.uniform(-3, 3, shape[:-1]))[..., None].astype(np.float32)


# -- quantize / dequantize -------------------------------------------------------------------------
def test_quantize_kv_matches_numpy_within_half_a_scale():
    rng = np.random.default_rng(0)
    x = _cache(rng, (3, 2, 40, 16))
    x[1, 0, 5] = 0.0  # an all-zero vector: scale 0, values 0
    got_q, got_s = jax.jit(quantize_kv)(jnp.asarray(x))
    want_q, want_s = np_quantize(x)
    assert got_q.dtype == jnp.int8 and got_s.dtype == jnp.float32 and got_s.shape == (3, 2, 40)
    got_q, got_s = np.asarray(got_q), np.asarray(got_s)
    np.testing.assert_allclose(got_s, want_s, rtol=3e-7, atol=0)  # XLA divides by 127 as * (1 / 127): 1 ulp
    assert np.abs(got_q.astype(int) - want_q).max() <= 1 and (got_q == want_q).mean() > 0.999
    assert got_s[1, 0, 5] == 0 and not got_q[1, 0, 5].any()
    err = np.abs(x - got_q.astype(np.float32) * got_s[..., None])
    assert (err <= got_s[..., None] / 2 * (1 + 1e-5)).all()
    assert (np.abs(got_q).max(-1)[got_s > 0] == 127).all()  # each vector's largest value uses the full range


# -- decode attention ------------------------------------------------------------------------------
def _int8_inputs(b, n, kv_heads, s, h, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, h)).astype(np.float32)
    (kq, ks), (vq, vs) = np_quantize(_cache(rng, (b, kv_heads, s, h))), np_quantize(_cache(rng, (b, kv_heads, s, h)))
    deq = lambda x, sc: x.astype(np.float64) * sc[..., None]
    return q, (kq, ks, vq, vs), (deq(kq, ks), deq(vq, vs))


@pytest.mark.parametrize("products", attention.PRODUCTS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 24], ids=["global", "window24"])
@pytest.mark.parametrize("block", [16, 32], ids=["block16", "block32-overlap"])
def test_int8_decode_equals_numpy_over_the_dequantized_cache(heads, window, block, products):
    n, kv_heads = heads
    s, h = 80, 16 if products == "dot" else 64  # 80 = 2.5 blocks of 32: the last block overlaps the one before it
    lengths = np.asarray([0, s, 37, 1, 5], np.int32)  # an idle row, a full one, ragged ones
    q, (kq, ks, vq, vs), (k, v) = _int8_inputs(len(lengths), n, kv_heads, s, h, seed=n + kv_heads)
    fn = jax.jit(lambda q, kq, vq, ks, vs, ln: attention.decode_attention(
        q, kq, vq, ln, window=window, scale=0.25, block=block, k_scale=ks, v_scale=vs, products=products))
    got = np.asarray(fn(q, kq, vq, ks, vs, lengths))
    want = np_decode(q, k, v, lengths, window, 0.25)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not got[0].any()  # the idle row


def test_int8_decode_with_softcap_bf16_and_every_impl():
    """The Pallas impls decode an int8 cache with the XLA loop: the same numbers; a softcap and bf16
    compute (the int8 block cast to bf16 is exact) against the same numpy reference."""
    s, h = 64, 32
    lengths = np.asarray([0, 64, 33, 2], np.int32)
    q, (kq, ks, vq, vs), (k, v) = _int8_inputs(4, 8, 2, s, h, seed=7)
    want = np_decode(q, k, v, lengths, None, 0.2, softcap=5.0)
    for impl in attention.IMPLS:
        got = attention.decode_attention(jnp.asarray(q), kq, vq, lengths, scale=0.2, softcap=5.0, impl=impl,
                                         k_scale=ks, v_scale=vs)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5, err_msg=impl)
    got = attention.decode_attention(jnp.asarray(q, jnp.bfloat16), kq, vq, lengths, scale=0.2, softcap=5.0,
                                     k_scale=ks, v_scale=vs)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.03)
    with pytest.raises(ValueError, match="both"):
        attention.decode_attention(jnp.asarray(q), kq, vq, lengths, scale=0.2, k_scale=ks)


# -- the model's decode ----------------------------------------------------------------------------
def test_model_decode_with_an_int8_cache_stays_close_to_float():
    config, params = tiny_params("tiny_gemma3")
    s, prompt = 64, prompts_for([9], seed=3)[0]

    @functools.partial(jax.jit, static_argnums=0)
    def decode(dtype, forced, n_forced):
        """s one-token decode steps from an empty cache: token i is forced[i] for i < n_forced, else
        the previous step's argmax. Returns (logits [s, V], tokens fed [s], cache)."""
        def step(carry, i):
            cache, prev = carry
            token = jnp.where(i < n_forced, forced[i], prev)
            logits, cache = forward(params, token[None, None], i[None, None], cache, config=config)
            return (cache, jnp.argmax(logits[0, 0]).astype(jnp.int32)), (logits[0, 0], token)

        (cache, _), (logits, tokens) = jax.lax.scan(step, (init_cache(config, 1, s, dtype), jnp.int32(0)),
                                                    jnp.arange(s))
        return logits, tokens, cache

    forced = np.zeros((s,), np.int32)
    forced[:len(prompt)] = prompt
    f, seq, _ = decode(jnp.float32, forced, len(prompt))  # the float cache's greedy run
    q, _, cache = decode(jnp.int8, seq, s)  # the int8 cache fed the same tokens
    f, q = np.asarray(f, np.float64), np.asarray(q, np.float64)
    layer = cache["layer_0"]
    assert layer.k.dtype == jnp.int8 and layer.k_scale.shape == (1, config.num_kv_heads, s)
    assert (np.asarray(layer.k_scale) > 0).all()  # every position was written with its own scale
    cos = (f * q).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1))
    print(f"cosine min {cos.min():.6f} mean {cos.mean():.6f}, max |diff| {np.abs(f - q).max():.4f}, "
          f"logit std {f.std():.3f}, top-1 {(f.argmax(-1) == q.argmax(-1)).sum()}/{s}")
    assert cos.min() > 0.999, cos.min()
    assert np.abs(f - q).max() < 0.02
    assert (f.argmax(-1) == q.argmax(-1)).sum() >= 60


# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    config, params = tiny_params("tiny_gemma3")
    config = config.replace(eos_id=-1, end_of_turn_id=-1)  # every prompt draws max_tokens
    return (config, params, Engine(config, params, **ENGINE_KW),
            Engine(config, params, cache_dtype=jnp.int8, **ENGINE_KW))


def test_prefill_quantizes_the_prefix_and_insert_places_it(engines):
    config, params, float_engine, int8_engine = engines
    prompts = prompts_for([7, 20], seed=4)
    pf = float_engine.prefill_prompts(prompts, [GREEDY] * 2, [4, 4])
    pq = int8_engine.prefill_prompts(prompts, [GREEDY] * 2, [4, 4])
    for name in ("layer_0", "layer_5"):
        want_k, want_ks = jax.jit(quantize_kv)(pf.cache[name].k)  # the float prefix, quantized
        want_v, want_vs = jax.jit(quantize_kv)(pf.cache[name].v)
        got = pq.cache[name]
        np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want_k))
        np.testing.assert_array_equal(np.asarray(got.v), np.asarray(want_v))
        np.testing.assert_array_equal(np.asarray(got.k_scale), np.asarray(want_ks))
        np.testing.assert_array_equal(np.asarray(got.v_scale), np.asarray(want_vs))
    state = int8_engine.insert(pq, int8_engine.init_state(), int8_engine.pad_slots([3, 1], pq))
    t = pq.cache["layer_0"].k.shape[2]
    for slot, row in ((3, 0), (1, 1)):
        layer = state.cache["layer_2"]
        np.testing.assert_array_equal(np.asarray(layer.k[slot, :, :t]), np.asarray(pq.cache["layer_2"].k[row]))
        np.testing.assert_array_equal(np.asarray(layer.v_scale[slot, :, :t]),
                                      np.asarray(pq.cache["layer_2"].v_scale[row]))
    assert not np.asarray(state.cache["layer_2"].k_scale[0]).any()  # slot 0 untouched


def test_engine_int8_greedy_equals_float_until_a_near_tie(engines):
    config, params, float_engine, int8_engine = engines
    prompts = prompts_for([3, 9, 17, 30], seed=1)
    want = run_to_completion(float_engine, prompts, max_tokens=30)
    got = run_to_completion(int8_engine, prompts, max_tokens=30)
    full = jax.jit(lambda t: forward(params, t, jnp.arange(t.shape[1])[None], None, config=config)[0][0])
    agreed = 0
    for prompt, w, g in zip(prompts, want, got):
        d = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), len(w))
        agreed += d
        if d < len(w):  # a divergence: the float model nearly ties the two tokens there
            seq = np.zeros((1, config.limits.max_total_tokens), np.int32)
            seq[0, :len(prompt) + d] = prompt + w[:d]
            logits = np.asarray(full(jnp.asarray(seq)))[len(prompt) + d - 1]  # the float model, no cache
            assert logits[w[d]] - logits[g[d]] < 0.02, (d, logits[w[d]] - logits[g[d]])
            print(f"prompt of {len(prompt)}: diverges at {d}, float margin {logits[w[d]] - logits[g[d]]:.5f}")
    assert agreed >= 60, agreed  # measured: 94 of 120 (prompts 1 and 3 diverge at tokens 28 and 6)


def test_int8_engine_on_a_mesh_splits_the_scales_like_the_cache(engines):
    config, params, _, int8_engine = engines
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    sharded = Engine(config, params, cache_dtype=jnp.int8, mesh=mesh, **ENGINE_KW)
    state = sharded.init_state()
    layer = state.cache["layer_0"]
    assert layer.k.sharding.spec == PartitionSpec("data", "model", None, None)
    assert layer.k_scale.sharding.spec == PartitionSpec("data", "model", None)
    prompts = prompts_for([5, 12], seed=6)
    assert run_to_completion(sharded, prompts, max_tokens=12) == run_to_completion(int8_engine, prompts, max_tokens=12)


# -- the compiled decode ---------------------------------------------------------------------------
def _float_cache_arrays(mod: hlo_text.Module, dims: tuple[int, ...]) -> list[hlo_text.Instr]:
    """Scheduled instructions that output a float array of the whole cache's shape `dims`."""
    return [ins for ins in mod.instructions() if ins.opcode not in ("parameter", "get-tuple-element", "tuple",
                                                                     "bitcast", "while")
            and any(dt in ("f32", "bf16", "f16") and d == dims for dt, d in ins.arrays)]


def test_compiled_int8_decode_reads_int8_blocks_and_never_converts_the_cache():
    config, params = tiny_params("tiny_gemma3")
    b, s = 8, 512
    dims = (b, config.num_kv_heads, s, config.head_dim)

    # The reader on a known program: a cache converted whole before its product is found.
    def converts(c, q):
        return jnp.einsum("BKH,BKSH->BKS", q, c.astype(jnp.float32))

    known = jax.jit(converts).lower(jax.ShapeDtypeStruct(dims, jnp.int8),
                                    jax.ShapeDtypeStruct((b, dims[1], dims[3]), jnp.float32)).compile()
    assert len(_float_cache_arrays(hlo_text.parse(known.as_text()), dims)) == 1

    state = jax.eval_shape(lambda: init_decode_state(config, b, s, jnp.int8))
    decode = jax.jit(lambda p, st: generate_steps(p, None, st, config=config, steps=2, use_lora=False, mode="greedy"),
                     donate_argnums=(1,))
    mod = hlo_text.parse(decode.lower(params, state).compile().as_text())
    entry = [ins for ins in mod.computations[mod.entry] if ins.opcode == "parameter"]
    assert sum(("s8", dims) in ins.arrays for ins in entry) == 2 * config.num_layers  # the cache stays int8
    assert hlo_text.conditionals(mod) == []
    assert _float_cache_arrays(mod, dims) == []
    block = (b, config.num_kv_heads, attention.DEFAULT_BLOCK, config.head_dim)
    blocks = [ins for ins in mod.instructions() if any(d == block and dt == "f32" for dt, d in ins.arrays)]
    assert blocks, "no float [B, K, block, H] block: the reader did not see the attention loop"


# -- flags -----------------------------------------------------------------------------------------
def test_kv_cache_kind_maps_to_the_engine_cache_dtype():
    """One mapping for every `--kv-cache` flag (serve, generate, benchmarks/engine.py)."""
    from serving.factory import kv_cache_dtype as serve_kv_cache_dtype

    assert kv_cache_dtype(None) is None and kv_cache_dtype("int8") is jnp.int8
    with pytest.raises(ValueError, match="kv-cache"):
        kv_cache_dtype("fp8")
    assert serve_kv_cache_dtype(argparse.Namespace(kv_cache="int8")) is jnp.int8
    assert serve_kv_cache_dtype(argparse.Namespace()) is None
    with pytest.raises(SystemExit, match="kv-cache"):
        serve_kv_cache_dtype(argparse.Namespace(kv_cache="fp8"))


def _serve_args(argv, monkeypatch, env=None):
    from serving.cli import add_serve_arguments

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_serve_kv_cache_flag_and_env_reach_the_engine_and_serve(monkeypatch):
    from serving.factory import build_engine, make_backend

    assert _serve_args([], monkeypatch).kv_cache is None
    assert _serve_args([], monkeypatch, {"GEMMA_JAX_KV_CACHE": "int8"}).kv_cache == "int8"
    args = _serve_args(["--random-weights", "tiny_gemma3_short", "--kv-cache", "int8", "--max-batch", "2",
                        "--lora-slots", "0", "--dtype", "float32"], monkeypatch)
    engine, tokenizer = build_engine(args)
    assert engine.cache_dtype == jnp.int8
    assert engine.cache["layer_0"].k.dtype == jnp.int8
    prompt = [tokenizer.bos_id] + tokenizer.encode("Why is the sky blue?", add_bos=False)
    seq = engine.add(prompt, 6)
    want = engine.run()[seq]
    backend = make_backend(engine, tokenizer)
    backend.start()
    try:
        done = backend.submit(Request(tuple(prompt), max_tokens=6, sampling=GREEDY)).result(timeout=120)
    finally:
        backend.stop()
    n = len(want) if want[-1] not in engine.config.stop_ids else len(want) - 1
    assert list(done.token_ids)[:n] == want[:n] and done.completion_tokens == len(want)


def test_generate_kv_cache_flag_reaches_the_engine(monkeypatch, capsys):
    from gemma_jax import cli, notebook
    from engine_reference import trained_tokenizer

    config, params = tiny_params("tiny_gemma3")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (config, params, trained_tokenizer(), None))
    made = []

    real_build = notebook.build_engine

    def recording(*a, **k):
        made.append(k.get("cache_dtype"))
        return real_build(*a, **k)

    monkeypatch.setattr(notebook, "build_engine", recording)
    assert cli.main(["generate", "hello world", "--raw", "--max-tokens", "3", "--kv-cache", "int8"]) == 0
    assert made == [jnp.int8] and capsys.readouterr().out.endswith("\n")
    assert cli.build_parser().parse_args(["generate", "hi"]).kv_cache is None  # default: the cache in --dtype
