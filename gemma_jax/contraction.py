"""`weight_einsum`: an activation times a weight, contracted in the weight's storage order.

`jnp.einsum` chooses the order of the contracted axes itself: for the attention output projection
"BTNH,NHD->BTD" it emits `dot_general` contracting (H, N), not (N, H). The weight is stored [N, H, D],
so XLA then permutes all of it into [H, N, D] before the matmul, on every call: inside the decode
loop that is a copy of every layer's output projection every step (on CPU: 2.6 MB per layer of the
270M, 47 MB a step; on the 7B shape 25 MB per layer in bfloat16). Contracting the axes in the order
the weight stores them lets the matmul read the weight where it lies.

`unembed`: the tied output projection x [B, T, D] . table [V, D] -> [B, T, V]. On XLA:CPU, with a
few rows (decode: the batch), the matmul is much faster written table-first, [V, D] . [B, D] ->
[V, B], and transposed after: YNNPACK spreads the vocabulary over the threads. XLA's simplifier
folds a transpose of a dot back into the x-first dot, so an optimization barrier keeps the form.
Measured on a 2-core AVX-512 EPYC, the 270M's [262144, 640] float32 table (2026-12-06), x-first vs
table-first: 1 row 26 vs 26 ms, 8 rows 60 vs 37 ms, 16 rows 72 vs 45 ms, 32 rows 120 vs 97 ms, 64
rows 160 vs 157 ms, 128 rows 326 vs 351 ms (the transpose of a big output costs more than it
saves), hence at most `UNEMBED_MOST_ROWS` rows, and one position per row (T = 1): a multi-token
forward (a prompt's logits, training) keeps the einsum, and with it the numbers that training and
the parity tests were checked with. The layers' weights ([in, out], contracted on their leading
axes) are fastest x-first (table-first made the 270M's layers 4.7x slower at 8 rows), so only the
vocabulary projection takes this form, and only on a CPU (an accelerator's matmul is not measured
with it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

UNEMBED_MOST_ROWS = 64  # table-first on CPU up to this many rows (see the module docstring)


def weight_einsum(eqn: str, x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """`jnp.einsum(eqn, x, w, **kwargs)`. For a weight product (every letter x and w share is
    contracted, every other letter kept) it is one `dot_general` whose contracted axes follow w's
    order, its output permuted to `out` only if that differs from (x's kept letters, w's kept
    letters); any other equation goes to `jnp.einsum` as it is."""
    inputs, out = eqn.split("->")
    x_letters, w_letters = inputs.split(",")
    shared = [c for c in w_letters if c in x_letters]
    kept = [c for c in x_letters + w_letters if c not in shared]
    if any(c in out for c in shared) or any(c not in out for c in kept) or len(set(x_letters)) != len(x_letters):
        return jnp.einsum(eqn, x, w, **kwargs)  # batch letters, a sum or a trace: einsum's general path
    dims = (([x_letters.index(c) for c in shared], [w_letters.index(c) for c in shared]), ((), ()))
    y = lax.dot_general(x, w, dims, **kwargs)  # precision / preferred_element_type, as einsum takes them
    natural = "".join(c for c in x_letters if c not in shared) + "".join(c for c in w_letters if c not in shared)
    return y if natural == out else jnp.transpose(y, [natural.index(c) for c in out])


def unembed(x: jax.Array, table: jax.Array, **kwargs) -> jax.Array:
    """`jnp.einsum("BTD,VD->BTV", x, table, **kwargs)`: the tied output projection. Table-first on a
    CPU for one position per row (T = 1: a decode step, a prefill's last position) and at most
    `UNEMBED_MOST_ROWS` rows (see the module docstring); every multi-token forward (a prompt's
    logits, training) takes the einsum as before, so its numbers do not move."""
    b, t, d = x.shape
    if jax.default_backend() != "cpu" or t != 1 or b > UNEMBED_MOST_ROWS:
        return jnp.einsum("BTD,VD->BTV", x, table, **kwargs)
    dims = (((1,), (1,)), ((), ()))
    y = lax.dot_general(table, x.reshape(b, d), dims, **kwargs)  # [V, B]
    return lax.optimization_barrier(y).T.reshape(b, 1, table.shape[0])
