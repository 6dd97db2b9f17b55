"""`weight_einsum`: an activation times a weight, contracted in the weight's storage order.

`jnp.einsum` chooses the order of the contracted axes itself: for the attention output projection
"BTNH,NHD->BTD" it emits `dot_general` contracting (H, N), not (N, H). The weight is stored [N, H, D],
so XLA then permutes all of it into [H, N, D] before the matmul, on every call: inside the decode
loop that is a copy of every layer's output projection every step (on CPU: 2.6 MB per layer of the
270M, 47 MB a step; on the 7B shape 25 MB per layer in bfloat16). Contracting the axes in the order
the weight stores them lets the matmul read the weight where it lies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


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
