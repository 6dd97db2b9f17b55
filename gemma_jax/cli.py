"""The `gemma-jax` command: one argparse subcommand per job.

    gemma-jax generate "prompt" [--max-tokens N] [--raw] [--checkpoint DIR|FILE.gguf] [--quantize METHOD]
                       [--kv-cache int8] [--mesh data=D,model=M]
    gemma-jax convert ...      (weights in other formats -> our native checkpoint)
    gemma-jax serve ...        (the Workers AI compatible HTTP server)

Each subcommand registers itself with an `_add_<name>(subparsers)` function and imports what it
needs only when it runs, so `gemma-jax --help` stays instant. Messages and progress go to stderr,
generated text to stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gemma_jax.mesh_flag import parse_mesh
from gemma_jax.weights.load import QUANTIZE_CHOICES

QUANTIZE_HELP = (
    "quantize the weights at load to int8: int8, per-channel scales, weight-only (--dtype computes; for "
    "accelerators); w8a8, per-channel, each product on int8 activations too (XLA:CPU's int8 dots, least "
    "exact); w8a8-embedding, w8a8 for the tied embedding alone, the layers float; q8_0, a scale per block "
    "of 32 weights, float activations, multiplied by a CPU kernel of ours (compiled on first use; the "
    "fastest decode on a CPU, and the closest to float32); none. Default auto: q8_0 for the embedded model in "
    "float32 on a CPU (w8a8-embedding where the kernel cannot be built; quality and speed: BENCHMARKS.md), "
    "else none")


# --- generate ------------------------------------------------------------------------------------
def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="print a greedy continuation of a prompt",
        description="Greedy (temperature 0) generation, printed as it streams. The default model is the "
                    "embedded Gemma 3 270M (converted once into the gemma-jax cache directory).")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt verbatim after BOS instead of as one user turn of the chat template")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a native checkpoint directory (gemma-jax convert) or a .gguf file; default: embedded model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and activation dtype (default float32)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=QUANTIZE_HELP)
    p.add_argument("--kv-cache", choices=("int8",),
                   help="int8: an int8 KV cache with one float32 scale per (kv head, position), decoded by "
                        "XLA's attention loop (default: the cache in --dtype)")
    p.add_argument("--mesh", metavar="data=D,model=M", type=parse_mesh,
                   help="device mesh: D*M must equal the device count (default: one device on CPU; on TPU/GPU "
                        "every device, M = the largest divisor of the device count dividing the head count)")
    p.set_defaults(func=_run_generate)


def load_model(checkpoint: str | None, dtype, quantize: str | None = None, *, mesh_shape=None):
    """(config, params, tokenizer, mesh) from a native checkpoint, a GGUF file, or the embedded model:
    the config is read first, the mesh built from it (`--mesh`), and every array loaded straight onto
    its placement on that mesh (`weights.load.load_parts`)."""
    from gemma_jax.mesh_flag import build_mesh
    from gemma_jax.weights.load import load_parts, read_config

    try:
        mesh = build_mesh(mesh_shape, read_config(checkpoint))
        return (*load_parts(checkpoint, dtype, quantize, mesh=mesh), mesh)
    except ValueError as error:
        raise SystemExit(f"gemma-jax: {error}") from None


def _run_generate(args) -> int:
    """Greedy text through the notebook API (`generate.stream`: engine + scheduler, one sequence)."""
    import jax.numpy as jnp

    from gemma_jax.engine.api import EngineError
    from gemma_jax.model import kv_cache_dtype
    from gemma_jax.notebook import Model, stream
    from gemma_jax.weights.load import resolve_quantize

    if args.max_tokens < 1:
        raise SystemExit("gemma-jax: --max-tokens must be at least 1")
    quantize = resolve_quantize(args.quantize, embedded=args.checkpoint is None, dtype=args.dtype)
    config, params, tokenizer, mesh = load_model(args.checkpoint, jnp.dtype(args.dtype), quantize,
                                                 mesh_shape=args.mesh)
    options = {"max_seqs": 1, "mesh": mesh, "cache_dtype": kv_cache_dtype(args.kv_cache)}
    model = Model(config, params, tokenizer, engine_options=options)
    try:
        for piece in stream(model, args.prompt, max_tokens=args.max_tokens, chat=not args.raw, temperature=0.0):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except EngineError as error:  # e.g. a prompt longer than the model's input limit
        raise SystemExit(f"gemma-jax: {error}") from None
    finally:
        model.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# --- convert: weights in other formats -> our native checkpoint (gemma_jax/weights/convert.py) ----
def _add_convert(subparsers) -> None:
    from gemma_jax.weights.convert import add_convert_command

    add_convert_command(subparsers)


# `serve` lives in the serving package (serving/cli.py), which adds it to these commands: imports
# point one way, so the core never imports Flask. The console script is `serving.cli:main`.
COMMANDS = (_add_generate, _add_convert)


def build_parser(commands: Sequence[Callable] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-jax", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in commands:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[Callable] = COMMANDS) -> int:
    args = build_parser(commands).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
