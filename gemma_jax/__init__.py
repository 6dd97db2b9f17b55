"""gemma-jax: Gemma in JAX/Flax behind the Workers AI text-generation API."""
