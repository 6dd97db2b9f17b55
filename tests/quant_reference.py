"""Shared by the quantized-product tests (test_w8a8.py, test_q8_0.py): the weight products of the
model, each with a weight shape of the tiny Gemma 3 and its contracted axes, and a random x for one."""

import numpy as np

from gemma_jax import config as C
from gemma_jax import projections as proj

# (equation, weight shape, the weight's contracted axes): every projection, and the tied unembedding.
EQUATIONS = [(p.equation, p.shape(C.tiny_gemma3()), tuple(range(len(p.ins)))) for p in proj.PROJECTIONS]
EQUATIONS.append(("BTD,VD->BTV", (512, 64), (1,)))


def random_x(eqn: str, shape: tuple[int, ...], rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float32 standard-normal x for `eqn` with weight `shape` and (B, T) = rows."""
    x_letters, w_letters = eqn.split("->")[0].split(",")
    sizes = dict(zip(w_letters, shape)) | dict(zip("BT", rows))
    return rng.standard_normal([sizes[c] for c in x_letters]).astype(np.float32)
