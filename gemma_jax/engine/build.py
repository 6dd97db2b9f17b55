"""The one way an engine is built: serve, the notebook API and the benchmarks all call `build_engine`.

    engine = build_engine(config, params, mesh=mesh, max_seqs=8, adapter_slots=8)

It is the paged one-step engine (`paged.PagedEngine`) with the serving defaults below; any
keyword of `PagedEngine` overrides them. The slot engine of `engine.py` stays as the library's
functional prefill / insert / generate functions (the HLO proof and the CPU benchmarks read them).
"""

from __future__ import annotations

from jax.sharding import Mesh

from gemma_jax.config import GemmaConfig
from gemma_jax.engine.paged import PagedEngine

# What `gemma-jax serve` runs with no flags (its --help states the same).
DEFAULTS = dict(max_seqs=8, page_size=16, num_pages=None, token_budget=None, decode_steps=None,
                cache_dtype=None, adapter_slots=8, adapter_rank=32, prefix_caching=True)


def build_engine(config: GemmaConfig, params, *, mesh: Mesh | None = None, **options) -> PagedEngine:
    """A `PagedEngine` over `params` on `mesh` (None: the first device), DEFAULTS overridden by
    `options`; TypeError names an option `PagedEngine` does not take."""
    unknown = set(options) - set(DEFAULTS) - {"adapter_rank_buckets", "adapter_dtype", "attention_impl",
                                              "memory_fraction", "seed", "decode_buckets",
                                              "sampling_switch"}
    if unknown:
        raise TypeError(f"unknown engine options: {sorted(unknown)}")
    return PagedEngine(config, params, mesh=mesh, **{**DEFAULTS, **options})
