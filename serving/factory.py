"""What `gemma-jax serve` serves: model weights -> Engine -> Scheduler -> Backend.

Runs inside the gunicorn worker (the process that owns the device). The model comes from, in order:
`--random-weights CONFIG` (a named config with random weights, for benchmarks), `--checkpoint PATH`
(a native checkpoint directory from `gemma-jax convert`, or a .gguf file), or the embedded Gemma 3
270M. Finetunes uploaded through the API are loaded into the engine's LoRA bank under their id.
"""

from __future__ import annotations

import argparse
import logging

import jax
import jax.numpy as jnp

from gemma_jax import config as config_lib
from gemma_jax.engine.engine import Engine
from gemma_jax.engine.scheduler import Scheduler
from gemma_jax.tokenizer import Tokenizer
from serving.backend import Backend

log = logging.getLogger("serving.factory")

RANDOM_CONFIGS = {
    "gemma_7b": config_lib.gemma_7b, "gemma_2b": config_lib.gemma_2b, "gemma3_270m": config_lib.gemma3_270m,
    "tiny_mha": config_lib.tiny_mha, "tiny_gemma3": config_lib.tiny_gemma3,
}


def load_model(args: argparse.Namespace):
    """(config, params, tokenizer) as the flags ask."""
    from gemma_jax.embedded import load_embedded
    from gemma_jax.embedded_gguf import gguf_path

    dtype = jnp.dtype(args.dtype)
    if args.random_weights:
        from gemma_jax.params import init_params

        if args.random_weights not in RANDOM_CONFIGS:
            raise SystemExit(f"gemma-jax: --random-weights must be one of {sorted(RANDOM_CONFIGS)}")
        tokenizer = Tokenizer.from_gguf(gguf_path())  # any real tokenizer: the text is noise anyway
        config = RANDOM_CONFIGS[args.random_weights]()
        # Token ids must index the embedding: widen the vocabulary to the tokenizer's if needed.
        config = config.replace(vocab_size=max(config.vocab_size, tokenizer.vocab_size))
        return config, init_params(config, jax.random.key(0), dtype), tokenizer
    if args.checkpoint:
        from gemma_jax.cli import load_model as load_checkpoint_model

        return load_checkpoint_model(args.checkpoint, dtype)
    return load_embedded(dtype=dtype)


def build_backend(args: argparse.Namespace) -> Backend:
    config, params, tokenizer = load_model(args)
    engine = Engine(config, params, slots=args.max_batch, adapter_slots=args.lora_slots,
                    adapter_rank=args.max_lora_rank)
    if args.warmup:
        log.info("compiling every prefill / decode bucket (--warmup)")
        engine.warmup()
    scheduler = Scheduler(engine, tokenizer)
    return Backend(scheduler, tokenizer, model_name=args.model_name, limits=config.limits,
                   load_adapter_fn=engine.load_adapter, unload_adapter_fn=engine.unload_adapter)
