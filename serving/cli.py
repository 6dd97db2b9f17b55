"""The `gemma-jax` console script: the core's commands (generate, convert) plus `serve`.

`serve` flags each have a GEMMA_JAX_* environment variable; `serving/factory.py` says what a
backend is made of (embedded 270M, `--checkpoint`, `--random-weights`):

    add_serve_arguments(parser)
    run_serve(args, backend_factory)   # backend_factory(args) -> serving.backend.Backend, in the worker

A flag given on the command line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from gemma_jax.cli import QUANTIZE_HELP
from gemma_jax.mesh_flag import parse_mesh
from gemma_jax.weights.load import QUANTIZE_CHOICES
from serving.backend import DEFAULT_MODEL, Backend

_FALSE = ("0", "false", "no", "off", "")


def _env(name: str, default=None):
    return os.environ.get(f"GEMMA_JAX_{name}", default)


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name)
    return default if value is None else value.strip().lower() not in _FALSE


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--host", default=_env("HOST", "127.0.0.1"), help="address to bind [GEMMA_JAX_HOST] (default 127.0.0.1)")
    a("--port", type=int, default=int(_env("PORT", "8080")), help="port [GEMMA_JAX_PORT] (default 8080)")
    a("--api-token", default=_env("API_TOKEN"),
      help="require 'Authorization: Bearer TOKEN' on every API route (/client/v4/..., /v1/...), else 401 "
           "(code 10000); /health, /openapi.json and the playground stay open [GEMMA_JAX_API_TOKEN] "
           "(default: no auth)")
    a("--protect-metrics", action="store_true", default=_env_bool("PROTECT_METRICS", False),
      help="/metrics needs the --api-token too [GEMMA_JAX_PROTECT_METRICS=1] (default: /metrics is open)")
    a("--data-dir", default=_env("DATA_DIR", "./gemma-jax-data"),
      help="finetunes database and adapter files [GEMMA_JAX_DATA_DIR] (default ./gemma-jax-data)")
    a("--max-batch", type=int, default=int(_env("MAX_BATCH", "8")),
      help="sequences the engine runs at once [GEMMA_JAX_MAX_BATCH] (default 8)")
    a("--kv-pages", type=int, default=_env_int("KV_PAGES"),
      help="KV cache pages (each --page-size positions of every layer); a request waits in the queue "
           "until pages are free [GEMMA_JAX_KV_PAGES] (default: half the accelerator's free memory; on a "
           "CPU, room for --max-batch full-length sequences and one more)")
    a("--page-size", type=int, default=_env_int("PAGE_SIZE"),
      help="positions per KV page, the prefix cache's unit [GEMMA_JAX_PAGE_SIZE] (default 16)")
    a("--token-budget", type=int, default=_env_int("TOKEN_BUDGET"),
      help="most tokens in one step (decode tokens first, then prompt chunks) [GEMMA_JAX_TOKEN_BUDGET] "
           "(default 64 on a CPU, 512 on an accelerator)")
    a("--decode-steps", type=int, default=_env_int("DECODE_STEPS"),
      help="most decode steps per dispatch when every sequence decodes and none waits "
           "[GEMMA_JAX_DECODE_STEPS] (default 1 on a CPU, 8 on an accelerator)")
    a("--decode-buckets", type=_int_list, default=_int_list(_env("DECODE_BUCKETS") or ""),
      help="comma-separated row counts a decode-only step is compiled for; a step runs the smallest "
           "that holds its sequences, --max-batch always one [GEMMA_JAX_DECODE_BUCKETS] (default: "
           "1,MAX_BATCH on a CPU, where a step's cost grows with its rows; MAX_BATCH on an accelerator)")
    a("--paged-attention", choices=("xla", "pallas_tpu", "pallas_gpu"), default=_env("PAGED_ATTENTION") or None,
      help="the step's attention over KV pages: xla (the reference), or a Pallas kernel of "
           "gemma_jax/paged_kernels.py (not yet measured on hardware) [GEMMA_JAX_PAGED_ATTENTION] (default xla)")
    a("--prefix-cache", action=argparse.BooleanOptionalAction, default=_env_bool("PREFIX_CACHE", True),
      help="reuse the KV pages of a prompt's leading tokens that an earlier request computed "
           "[GEMMA_JAX_PREFIX_CACHE=0 to disable] (default: on)")
    a("--threads", type=int, default=int(_env("THREADS", "32")),
      help="HTTP threads of the single worker [GEMMA_JAX_THREADS] (default 32)")
    a("--max-queue", type=int, default=int(_env("MAX_QUEUE", "256")),
      help="requests waiting for a slot before 429 / 3040 [GEMMA_JAX_MAX_QUEUE] (default 256)")
    a("--no-stream-padding", action="store_true", default=not _env_bool("STREAM_PADDING", True),
      help='omit the random "p" padding field in streamed events [GEMMA_JAX_STREAM_PADDING=0]')
    a("--checkpoint", default=_env("CHECKPOINT"),
      help="directory of a converted checkpoint (default: the embedded Gemma 3 270M) [GEMMA_JAX_CHECKPOINT]")
    a("--random-weights", metavar="CONFIG", default=_env("RANDOM_WEIGHTS"),
      help="serve a named config with random weights, for benchmarks [GEMMA_JAX_RANDOM_WEIGHTS]")
    a("--model-name", default=_env("MODEL_NAME", DEFAULT_MODEL),
      help=f"model name in the run route [GEMMA_JAX_MODEL_NAME] (default {DEFAULT_MODEL})")
    a("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT", "600")),
      help="seconds before a generation is cancelled with 3007 [GEMMA_JAX_REQUEST_TIMEOUT] (default 600)")
    a("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(1 << 20))),
      help="largest JSON body, else 3006 [GEMMA_JAX_MAX_BODY_BYTES] (default 1 MiB)")
    a("--max-upload-bytes", type=int, default=int(_env("MAX_UPLOAD_BYTES", str(100 << 20))),
      help="largest finetune file, else 3006 [GEMMA_JAX_MAX_UPLOAD_BYTES] (default 100 MiB, Workers AI's "
           "adapter limit)")
    a("--graceful-timeout", type=float, default=float(_env("GRACEFUL_TIMEOUT", "30")),
      help="seconds in-flight requests get after SIGTERM [GEMMA_JAX_GRACEFUL_TIMEOUT] (default 30)")
    a("--log-level", default=_env("LOG_LEVEL", "info"), help="[GEMMA_JAX_LOG_LEVEL] (default info)")
    a("--dtype", choices=("float32", "bfloat16"), default=_env("DTYPE"),
      help="parameter / activation dtype [GEMMA_JAX_DTYPE] (default: float32 on a CPU, bfloat16 on a "
           "GPU or TPU)")
    a("--mesh", metavar="data=D,model=M", type=parse_mesh, default=_env("MESH") or None,
      help="device mesh of the engine: heads / KV pages / MLP / vocabulary split over M, the step "
           "replicated over D; "
           "D*M must equal the device count [GEMMA_JAX_MESH] (default: one device on CPU; on TPU/GPU "
           "every device, M = the largest divisor of the device count dividing the head count)")
    a("--quantize", choices=QUANTIZE_CHOICES, default=_env("QUANTIZE") or "auto",
      help=QUANTIZE_HELP + " [GEMMA_JAX_QUANTIZE]")
    a("--kv-cache", choices=("int8",), default=_env("KV_CACHE") or None,
      help="int8: store the KV pages as int8 with one float32 scale per (page, kv head, position), "
           "written as each token's keys/values are computed. Half a bfloat16 cache's bytes, a quarter "
           "of float32's, so twice or four times the pages [GEMMA_JAX_KV_CACHE] (default: the cache in --dtype)")
    a("--lora-slots", type=int, default=int(_env("LORA_SLOTS", "8")),
      help="LoRA adapters held on device at once, mixed per batch row [GEMMA_JAX_LORA_SLOTS] (default 8; 0 = no LoRA)")
    a("--max-lora-rank", type=int, default=int(_env("MAX_LORA_RANK", "32")),
      help="largest adapter rank accepted [GEMMA_JAX_MAX_LORA_RANK] (default 32)")
    a("--warmup", action=argparse.BooleanOptionalAction, default=_env_bool("WARMUP", True),
      help="compile every step variant (10 with LoRA, 5 without) before reporting ready, so the first request is as "
           "fast as the tenth; --no-warmup compiles on first use instead [GEMMA_JAX_WARMUP=0] (default: on)")
    a("--coordinator", metavar="HOST:PORT", default=_env("COORDINATOR"),
      help="multi-host: the jax.distributed coordinator (process 0's address), or 'auto' where JAX finds "
           "the cluster itself (a TPU VM slice); process 0 serves HTTP, the others follow "
           "[GEMMA_JAX_COORDINATOR] (default: one process). See docs/multihost.md")
    a("--num-processes", type=int, default=_env_int("NUM_PROCESSES"),
      help="multi-host: how many processes [GEMMA_JAX_NUM_PROCESSES]")
    a("--process-id", type=int, default=_env_int("PROCESS_ID", os.environ.get("TPU_WORKER_ID")),
      help="multi-host: this process's index, 0 = the HTTP leader [GEMMA_JAX_PROCESS_ID, else TPU_WORKER_ID]")
    return parser


def _int_list(text: str) -> tuple[int, ...] | None:
    """"1,2,8" -> (1, 2, 8); "" -> None (the engine's default)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip()) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


def _env_int(name: str, fallback: str | None = None) -> int | None:
    value = _env(name, fallback)
    return None if value in (None, "") else int(value)


def app_kwargs(args: argparse.Namespace) -> dict:
    return {"api_token": args.api_token or None, "data_dir": args.data_dir,
            "stream_padding": not args.no_stream_padding, "max_body_bytes": args.max_body_bytes,
            "max_upload_bytes": args.max_upload_bytes, "request_timeout": args.request_timeout or None,
            "protect_metrics": args.protect_metrics}


def run_serve(args: argparse.Namespace, backend_factory: Callable[[argparse.Namespace], Backend]) -> None:
    """Serve until SIGTERM. `backend_factory(args)` runs inside the gunicorn worker."""
    if args.protect_metrics and not args.api_token:
        raise SystemExit("gemma-jax serve: --protect-metrics needs --api-token (the token /metrics asks for)")
    from serving.server import serve  # noqa: PLC0415 - keeps `--help` free of gunicorn imports

    serve(lambda: backend_factory(args), host=args.host, port=args.port, threads=args.threads,
          app_kwargs=app_kwargs(args), graceful_timeout=args.graceful_timeout, log_level=args.log_level,
          model_name=getattr(args, "model_name", None))


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the Workers AI text-generation API (and OpenAI routes) under gunicorn",
        description="Serve the model over HTTP: POST /client/v4/accounts/<id>/ai/run/<model>, finetunes, "
                    "/v1/chat/completions, /metrics, and a playground at /.")
    add_serve_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.coordinator:
        if args.process_id is None:
            raise SystemExit("gemma-jax serve: --coordinator needs --process-id (0 serves HTTP, others follow)")
        if args.coordinator != "auto" and args.num_processes is None:
            raise SystemExit("gemma-jax serve: --coordinator HOST:PORT needs --num-processes")
        if args.process_id != 0:  # a follower: no HTTP, no gunicorn; it replays the leader's engine calls
            from serving.factory import run_follower  # noqa: PLC0415
            from serving.server import configure_logging  # noqa: PLC0415

            configure_logging(args.log_level)
            return run_follower(args)
    from serving.factory import build_backend  # noqa: PLC0415 - jax is imported in the worker only

    run_serve(args, build_backend)
    return 0


def main(argv=None) -> int:
    from gemma_jax import cli  # noqa: PLC0415

    return cli.main(argv, commands=(*cli.COMMANDS, _add_serve))


if __name__ == "__main__":  # python -m serving.cli serve ... (what the console script runs)
    sys.exit(main())
