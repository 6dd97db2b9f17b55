"""What `gemma-jax serve` serves: model weights -> PagedEngine (`engine.build`) -> Scheduler -> Backend.

Runs inside the gunicorn worker (the process that owns the device). The model comes from, in order:
`--random-weights CONFIG` (a named config with random weights, for benchmarks), `--checkpoint PATH`
(a native checkpoint directory from `gemma-jax convert`, or a .gguf file), or the embedded Gemma 3
270M. Finetunes uploaded through the API are loaded into the engine's LoRA bank under their id
(`make_backend`); as on Workers AI, an adapter_config.json must name its `model_type`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gemma_jax import config as config_lib
from gemma_jax import model as model_lib
from gemma_jax.engine import build
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.engine.scheduler import Scheduler
from gemma_jax.mesh_flag import build_mesh, default_shape
from gemma_jax.tokenizer import Tokenizer
from serving import startup
from serving.backend import DEFAULT_MODEL, Backend

log = logging.getLogger("serving.factory")

RANDOM_CONFIGS = {
    "gemma_7b": config_lib.gemma_7b, "gemma_2b": config_lib.gemma_2b, "gemma3_270m": config_lib.gemma3_270m,
    "tiny_mha": config_lib.tiny_mha, "tiny_gemma3": config_lib.tiny_gemma3,
    # a 256-token context: few buckets, so a full warmup compiles in seconds (smoke runs, startup tests)
    "tiny_gemma3_short": lambda: config_lib.tiny_gemma3().replace(limits=config_lib.Limits(
        max_input_tokens=192, max_total_tokens=256, max_batch_prefill_tokens=256)),
}


def serve_dtype(args: argparse.Namespace):
    """--dtype, else float32 on a CPU and bfloat16 on an accelerator (what benchmarks/gpu.py measures)."""
    if args.dtype:
        return jnp.dtype(args.dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def model_config(args: argparse.Namespace) -> config_lib.GemmaConfig:
    """The config of the model the flags ask for, read without loading any weights (a config.json,
    a GGUF header): the mesh is built from it, then `load_model` puts the weights onto that mesh."""
    from gemma_jax.weights.load import read_config

    if args.random_weights:
        return _random_config(args.random_weights)
    return read_config(args.checkpoint)


def load_model(args: argparse.Namespace, mesh: Mesh | None = None):
    """(config, params, tokenizer) as the flags ask, every array put straight onto its
    `param_shardings` placement on `mesh` as it loads (None: the first device): a native checkpoint
    restores into it, GGUF tensors are placed (and quantized) one by one, random weights are born
    sharded, so no device ever holds the whole model."""
    from gemma_jax.weights.load import load_parts, resolve_quantize

    dtype = serve_dtype(args)
    embedded = args.checkpoint is None and not args.random_weights
    quantize = resolve_quantize(getattr(args, "quantize", None), embedded=embedded, dtype=dtype)
    if args.random_weights:
        from gemma_jax import params as P

        config = _random_config(args.random_weights)
        # unsafe_rbg: random init compiles and runs several times faster than threefry on CPU.
        params = P.init_params(config, jax.random.key(0, impl="unsafe_rbg"), dtype, mesh=mesh)
        if quantize:
            params = P.place_params(params, config, mesh, dtype, quantize)
        return config, params, _noise_tokenizer()
    # a checkpoint dir, a .gguf, or (None) the embedded model
    return load_parts(args.checkpoint, dtype, quantize, mesh=mesh)


def _noise_tokenizer() -> Tokenizer:
    """The tokenizer of random weights: any real one, the text is noise anyway (the embedded GGUF's)."""
    from gemma_jax.embedded_gguf import gguf_path

    return _tokenizer_of(str(gguf_path()))


@functools.lru_cache(maxsize=4)
def _tokenizer_of(gguf_file: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_file)


def _random_config(name: str) -> config_lib.GemmaConfig:
    if name not in RANDOM_CONFIGS:
        raise SystemExit(f"gemma-jax: --random-weights must be one of {sorted(RANDOM_CONFIGS)}")
    tokenizer = _noise_tokenizer()
    # Token ids must index the embedding: widen the vocabulary to the tokenizer's if needed; the
    # chat turn markers (stop ids) are the tokenizer's (Gemma 3: 105/106, Gemma 1 configs: 106/107).
    config = RANDOM_CONFIGS[name]()
    return config.replace(vocab_size=max(config.vocab_size, tokenizer.vocab_size),
                          start_of_turn_id=tokenizer.start_of_turn_id, end_of_turn_id=tokenizer.end_of_turn_id)


def build_backend(args: argparse.Namespace) -> Backend:
    """Load, then compile every executable (`PagedEngine.warmup`: 10 step variants, unless --no-warmup) so
    that the server is ready only once the first request runs as fast as the tenth; compiled executables come from
    JAX's persistent cache (`gemma_jax.compilation_cache`) when an earlier start wrote them. On a CPU a
    cold cache is filled by a child process first (`serving.precompile`), so that serializing each
    executable into the cache never holds this process's GIL while it answers /health."""
    from gemma_jax import compilation_cache

    cache = compilation_cache.enable()
    if args.warmup and not multihost_requested(args):
        from serving import precompile

        report = functools.partial(startup.PROGRESS.compiled, stage="precompiling")
        if precompile.precompile(args, cache, report, started=lambda: startup.PROGRESS.stage("precompiling")):
            log.info("precompiled every step variant in a child process (persistent cache: %s)", cache)
    startup.PROGRESS.stage("loading weights")
    engine, tokenizer = build_engine(args)
    if multihost_requested(args):
        from gemma_jax.engine.multihost import LeaderEngine

        engine = LeaderEngine(engine)  # broadcasts every engine call, warmup included, to the followers
        atexit.register(_stop_followers, engine)
    if args.warmup:
        started = time.monotonic()
        log.info("compiling every step variant (persistent cache: %s)", cache)
        engine.warmup(progress=startup.compiled)  # /health shows it while the server starts
        log.info("compiled %d executables in %.1f s", sum(engine.compile_counts().values()),
                 time.monotonic() - started)
    return make_backend(engine, tokenizer, model_name=args.model_name, max_queue=args.max_queue)


def build_engine(args: argparse.Namespace) -> tuple[PagedEngine, Tokenizer]:
    """The engine the flags ask for (`engine.build.build_engine`), on its mesh: the config first (`model_config`, no weights),
    then the mesh (--mesh, or the default rule of mesh_flag.py), then the weights loaded straight
    onto it (`load_model`), which the engine keeps where they are; --kv-cache int8 gives it int8
    KV pages (every process of a multi-host engine builds the same one from the same flags). Multi-host (`--coordinator`):
    `jax.distributed` first, and the same mesh over every process's devices (`jax.devices()` spans
    them; without --mesh the accelerator rule, on CPU too); a native checkpoint restores into its
    global sharding, other weights are converted on every host alike and each tensor is placed."""
    shape = getattr(args, "mesh", None)
    if multihost_requested(args):
        from gemma_jax.engine import multihost

        auto = args.coordinator == "auto"  # a TPU VM slice (or SLURM ...): JAX finds the cluster itself
        multihost.initialize(None if auto else args.coordinator, None if auto else args.num_processes,
                             None if auto else args.process_id)
    config = model_config(args)
    if multihost_requested(args) and shape is None:
        shape = default_shape(jax.device_count(), config.num_heads)
    mesh = build_mesh(shape, config)
    log.info("mesh: data=%d, model=%d (%s)", mesh.shape["data"], mesh.shape["model"], mesh.devices.flat[0].platform)
    config, params, tokenizer = load_model(args, mesh)
    engine = build.build_engine(config, params, mesh=mesh, **engine_options(args))
    log.info("engine: %d sequences, %d KV pages of %d positions, token budget %d, %d decode steps per dispatch, "
             "decode buckets %s", engine.max_seqs, engine.num_pages - 1, engine.page_size, engine.budget,
             engine.decode_steps, ",".join(map(str, engine.decode_buckets)))
    return engine, tokenizer


def engine_options(args: argparse.Namespace) -> dict:
    """The flags' `build_engine` options (a flag left out keeps the engine's default)."""
    given = dict(max_seqs=args.max_batch, adapter_slots=args.lora_slots, adapter_rank=args.max_lora_rank,
                 cache_dtype=kv_cache_dtype(args), num_pages=getattr(args, "kv_pages", None),
                 page_size=getattr(args, "page_size", None), token_budget=getattr(args, "token_budget", None),
                 decode_steps=getattr(args, "decode_steps", None),
                 decode_buckets=getattr(args, "decode_buckets", None),
                 prefix_caching=getattr(args, "prefix_cache", None),
                 attention_impl=getattr(args, "paged_attention", None))
    return {k: v for k, v in given.items() if v is not None}


def kv_cache_dtype(args: argparse.Namespace):
    """--kv-cache int8 -> jnp.int8 (an int8 KV cache with scales); otherwise None: the compute dtype."""
    try:
        return model_lib.kv_cache_dtype(getattr(args, "kv_cache", None))
    except ValueError as err:
        raise SystemExit(f"gemma-jax: {err}") from None


def _stop_followers(leader) -> None:
    try:
        leader.stop_followers()
    except Exception as err:  # noqa: BLE001 - exiting anyway: a lost follower has nothing to stop
        log.warning("could not stop the multi-host followers: %r", err)


def multihost_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "coordinator", None))


def run_follower(args: argparse.Namespace) -> int:
    """A follower of `serve --coordinator` (process id != 0): no HTTP. It builds the same engine
    and makes every engine call the leader broadcasts (`multihost.follow`) until the leader stops."""
    from gemma_jax import compilation_cache
    from gemma_jax.engine import multihost

    compilation_cache.enable()
    engine, _ = build_engine(args)
    log.info("multi-host follower %d of %d ready", jax.process_index(), jax.process_count())
    n = multihost.follow(engine)
    log.info("multi-host follower %d: the leader stopped after %d commands", jax.process_index(), n)
    # Exit now, skipping jax.distributed's shutdown at exit: its RPC goes to the coordination service,
    # which lives in the leader, itself exiting; a failed shutdown RPC aborts the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_backend(engine: PagedEngine, tokenizer: Tokenizer, *, model_name: str = DEFAULT_MODEL,
                 max_queue: int = 256) -> Backend:
    """A new scheduler over `engine`, as a Backend. Adapters load into the engine's LoRA bank with
    `model_type` required (Workers AI's rule); an engine without a bank serves no finetunes. The
    limits are the engine's own (`PagedEngine.check`, through the scheduler)."""
    lora = engine.bank is not None
    return Backend(Scheduler(engine, tokenizer, max_queue=max_queue), tokenizer, model_name=model_name,
                   load_adapter_fn=functools.partial(engine.load_adapter, require_model_type=True) if lora else None,
                   unload_adapter_fn=engine.unload_adapter if lora else None)
