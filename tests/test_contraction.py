"""`weight_einsum` equals `jnp.einsum` (a numpy einsum too) on every projection's equation and the
logits', including an output order that needs a transpose and an int8 weight through `qeinsum`;
`unembed` equals numpy on both of its forms, and its CPU form is the table-first matmul it claims."""

import re

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from gemma_jax import projections as proj
from gemma_jax import quantize
from gemma_jax.contraction import UNEMBED_MOST_ROWS, unembed, weight_einsum

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


@pytest.mark.parametrize("lead", [(1, 1), (8, 1), (2, 3), (UNEMBED_MOST_ROWS, 1), (UNEMBED_MOST_ROWS + 1, 1), (9, 17)])
def test_unembed_equals_numpy(lead):
    """Both forms (table-first for one position per row and up to UNEMBED_MOST_ROWS rows on CPU,
    the einsum otherwise), float32 and a bfloat16 table with float32 accumulation, against numpy."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((*lead, 48)).astype(np.float32)
    table = rng.standard_normal((96, 48)).astype(np.float32)
    got = unembed(jnp.asarray(x), jnp.asarray(table))
    assert got.shape == (*lead, 96)
    np.testing.assert_allclose(np.asarray(got), np.einsum("btd,vd->btv", x, table), rtol=1e-5, atol=1e-4)
    xb, tb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16)
    got = unembed(xb, tb, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    want = np.einsum("btd,vd->btv", np.asarray(xb, np.float32), np.asarray(tb, np.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, positions, table_first", [(8, 1, True), (UNEMBED_MOST_ROWS + 1, 1, False), (4, 2, False)])
def test_unembed_form_survives_compilation(rows, positions, table_first):
    """On the CPU, one position per row and up to UNEMBED_MOST_ROWS rows, the compiled matmul
    outputs [V, rows] (the table is its left operand): XLA did not fold the transpose back into an
    x-first [rows, V] matmul. More rows, or several positions per row: the einsum's own matmul."""
    assert jax.default_backend() == "cpu"
    vocab, d = 4096, 64
    hlo = jax.jit(unembed).lower(jax.ShapeDtypeStruct((rows, positions, d), jnp.float32),
                                 jax.ShapeDtypeStruct((vocab, d), jnp.float32)).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots, hlo
    shapes = {re.search(r"= f32\[([\d,]+)\]", line).group(1) for line in dots}
    n = rows * positions  # XLA flattens [B, T] into the matmul's rows
    assert shapes == ({f"{vocab},{n}"} if table_first else {f"{n},{vocab}"}), shapes
