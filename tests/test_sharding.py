"""Sharded forward on a fake 8-device CPU mesh equals the unsharded forward.

Params are placed with `param_shardings` (heads / kv heads / MLP / vocab over "model"), the cache
with `P.cache_shardings` (batch over "data", kv heads over "model"), and `forward` is jitted
as is: XLA inserts the collectives. The reference is the same forward on one device. Both a prefill
into the cache and one decode step are checked, plus a cache-less full forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gemma_jax import config as C
from gemma_jax import params as P
from gemma_jax.model import forward, init_cache
from gemma_jax.sharding import make_mesh

B, T, S = 2, 6, 16


def make_cache(config, batch, max_len, mesh=None):
    """A zero KV cache created on device, sharded by `P.cache_shardings` when a mesh is given."""
    out = None if mesh is None else P.cache_shardings(config, batch, max_len, mesh)
    return jax.jit(lambda: init_cache(config, batch, max_len), out_shardings=out)()


def _run(params, config, cache):
    fwd = jax.jit(forward, static_argnames=("config",))
    tokens = jnp.array([[2, 40, 7, 300, 11, 5], [2, 9, 9, 120, 64, 500]], jnp.int32)  # [B, T]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    full, _ = fwd(params, tokens, positions, None, config=config)
    prefill, cache = fwd(params, tokens, positions, cache, config=config)
    step, _ = fwd(params, jnp.array([[17], [3]], jnp.int32), jnp.full((B, 1), T), cache, config=config)
    return [np.asarray(x) for x in (full, prefill, step)]


@pytest.mark.parametrize("factory", [C.tiny_mha, C.tiny_gqa, C.tiny_gemma3])
def test_sharded_forward_equals_unsharded(factory):
    assert jax.device_count() == 8
    config = factory()
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), P.param_shapes(config))
    want = _run(jax.tree.map(jnp.asarray, host), config, make_cache(config, B, S))

    for mesh_shape in [(2, 4), (1, 8)]:
        mesh = make_mesh(*mesh_shape)
        sharded = jax.device_put(host, P.param_shardings(config, mesh))
        # really split: MLP and vocabulary always, query heads where the model axis divides them
        assert sharded["layer_0"]["mlp"]["gating_einsum"]["w"].sharding.spec == PartitionSpec(None, None, "model")
        assert sharded["embedder"]["input_embedding"].sharding.spec == PartitionSpec("model", None)
        heads_split = config.num_heads % mesh.shape["model"] == 0
        q_spec = sharded["layer_0"]["attn"]["q_einsum"]["w"].sharding.spec  # [D, N, H]
        assert (q_spec[1] if len(q_spec) > 1 else None) == ("model" if heads_split else None)
        cache = make_cache(config, B, S, mesh=mesh)
        assert cache["layer_0"].k.sharding.spec[0] == "data"
        got = _run(sharded, config, cache)

        for name, g, w in zip(("full", "prefill", "decode step"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=f"{mesh_shape} {name}")
    # with and without the cache: the same logits (up to summation order over the padded cache)
    np.testing.assert_allclose(want[1], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
