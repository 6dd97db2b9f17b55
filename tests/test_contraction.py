"""`weight_einsum` equals `jnp.einsum` (a numpy einsum too) on every projection's equation and the
logits', including an output order that needs a transpose and an int8 weight through `qeinsum`."""

import numpy as np
import jax.numpy as jnp
import pytest

from gemma_jax import projections as proj
from gemma_jax import quantize
from gemma_jax.contraction import weight_einsum

EQUATIONS = sorted({p.equation for p in proj.PROJECTIONS} | {"BTD,VD->BTV", "BTNH,NHD->BDT", "BTD,DKH->KBTH"})


def _operands(eqn: str, rng):
    sizes = dict(B=3, T=2, D=48, N=4, K=2, H=16, C=2, F=64, V=96)
    xs, ws = eqn.split("->")[0].split(",")
    return (rng.standard_normal([sizes[c] for c in xs]).astype(np.float32),
            rng.standard_normal([sizes[c] for c in ws]).astype(np.float32))


@pytest.mark.parametrize("eqn", EQUATIONS)
def test_equals_einsum(eqn):
    x, w = _operands(eqn, np.random.default_rng(0))
    got = np.asarray(weight_einsum(eqn, jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_allclose(got, np.einsum(eqn, x, w), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(jnp.einsum(eqn, x, w)), rtol=1e-5, atol=1e-4)


def test_quantized_weight_through_qeinsum():
    eqn = "BTNH,NHD->BTD"
    x, w = _operands(eqn, np.random.default_rng(1))
    q = quantize.quantize_array(jnp.asarray(w), contracted=(0, 1), dtype=jnp.float32)
    want = np.einsum(eqn, x, np.asarray(quantize.dequantize(q)))
    np.testing.assert_allclose(np.asarray(quantize.qeinsum(eqn, jnp.asarray(x), q)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("eqn", ["bij,bjk->bik", "bij,jk->bk", "ii,ij->j"])
def test_other_equations_fall_back_to_einsum(eqn):
    """Batch letters, a letter summed away, a trace: jnp.einsum's own path, same result."""
    rng = np.random.default_rng(2)
    sizes = dict(b=3, i=4, j=4, k=6)
    xs, ws = eqn.split("->")[0].split(",")
    x = rng.standard_normal([sizes[c] for c in xs]).astype(np.float32)
    w = rng.standard_normal([sizes[c] for c in ws]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(weight_einsum(eqn, x, w)), np.einsum(eqn, x, w), rtol=1e-5, atol=1e-4)
