"""The engine on the real embedded Gemma 3 270M: a batch of mixed-length prompts, greedy, equals a
naive full-recompute greedy loop with the plain model, token for token."""

import jax.numpy as jnp

from gemma_jax.config import Limits
from gemma_jax.embedded import load_embedded
from engine_reference import assert_engine_matches_naive

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
]


def test_real_270m_engine_batch_equals_full_recompute(gguf_file):
    config, params, tokenizer = load_embedded(dtype=jnp.float32)
    # Small limits keep the naive reference (padded to max_total_tokens) and the buckets cheap.
    config = config.replace(limits=Limits(max_input_tokens=64, max_total_tokens=96, max_batch_prefill_tokens=256))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert sorted(len(p) for p in prompts) != [len(prompts[0])] * 3  # mixed lengths
    got = assert_engine_matches_naive(config, params, prompts, max_tokens=8, slots=4,
                                      prefill_buckets=(16, 64), prefill_batches=(1, 4),
                                      steps_per_call=4)
    assert tokenizer.decode(got[0]).startswith(" the capital")
