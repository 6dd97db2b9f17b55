"""Load against a real server process: many HTTP clients, then a burst over capacity (issue 10 item 1).

    python benchmarks/load.py                          # starts `gemma-jax serve` (embedded 270M) on 127.0.0.1
    python benchmarks/load.py --clients 64 --duration 60
    python benchmarks/load.py --url http://127.0.0.1:8080 --model-config gemma3_270m   # attach instead

Phase 1, load: `--clients` threads, each with its own keep-alive connection (requests.Session), send
requests back to back for `--duration` seconds, cycling through streaming / non-streaming x `prompt` /
`messages` x base model / a LoRA adapter (a random PEFT adapter uploaded first through the finetunes
API, exactly as a user would). Every answer is checked: no 5xx, no connection error or client timeout
(a hang), a 200 stream ends with `data: [DONE]` after a usage event, a 200 JSON answer is a Workers AI
success envelope with usage; a 429 must carry code 3040 (counted, allowed). Printed: requests by
status, TTFT p50/p99 (streams: send -> first text event), completion tokens/s over the phase.

Phase 2, over capacity: `slots + max_queue` (read from /health) holder streams with long generations
fill every slot and the whole queue (checked on /metrics); then `--excess` clients arrive at once and
each must get 429 with code 3040 within `--limit-429` seconds (time-to-429 printed). The phase counts
only if the server stayed full during the burst (the scheduler finished no request meanwhile); if a
holder finished early the burst is retried once with longer holders. Holders are then dropped, and
the slots must free (they are cancelled when the server sees the client gone).

Exit status 1 on any violation (each is printed), 0 otherwise. The server started here gets
`--max-batch`, `--max-queue` (the queue is sized so phase 1 never overflows it) and enough `--threads`
for every client of both phases; its stderr goes to `--server-log`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
MODEL = "@hf/google/gemma-7b-it"
PROMPTS = ("Why is the sky blue?", "Write a haiku about the sea.", "Name three colours.",
           "What is 2 + 2?", "Tell me a fact about cats.", "Say hello in French.")


def run_url(base: str, model: str = MODEL) -> str:
    return f"{base}/client/v4/accounts/load/ai/run/{model}"


# -- the server ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args: list[str], *, log_path: str | os.PathLike, ready_timeout: float = 600, env: dict | None = None):
    """`python -m serving.cli serve --host 127.0.0.1 --port <free> *args` until its readiness line;
    yields the base URL. SIGTERM (then SIGKILL) to its process group on exit."""
    port = free_port()
    env = {**os.environ, **(env or {})}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    env.setdefault("JAX_PLATFORMS", "cpu")
    # JAX's persistent compilation cache, where gemma_jax.compilation_cache keeps it: a second run
    # of this script loads the executables the first one compiled
    from gemma_jax.compilation_cache import default_dir  # noqa: PLC0415 - jax only when starting a server

    for key, value in (("JAX_ENABLE_COMPILATION_CACHE", "true"), ("JAX_COMPILATION_CACHE_DIR", str(default_dir())),
                       ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                       ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")):
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "serving.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while "gemma-jax ready" not in Path(log_path).read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{Path(log_path).read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def metrics(base: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    out = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until predicate() held, None if it did not within `timeout`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


def idle(base: str) -> bool:
    m = metrics(base)
    return (m.get("gemma_jax_scheduler_active_slots") == 0 and m.get("gemma_jax_scheduler_queue_depth") == 0
            and m.get("gemma_jax_generations_in_flight") == 0)


# -- a LoRA adapter, uploaded ---------------------------------------------------------------------------
def write_random_adapter(directory: str | os.PathLike, config, *, rank: int = 4, seed: int = 0,
                         targets=("q_proj", "v_proj", "down_proj"), std: float = 0.02) -> Path:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with random A and B
    for every layer of `config`, `model_type` set as Workers AI requires."""
    from safetensors.numpy import save_file

    from gemma_jax.projections import TARGETS
    from gemma_jax.weights.peft import model_types

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(config.num_layers):
        for name in targets:
            target = TARGETS[name]
            stem = f"base_model.model.model.layers.{i}.{'self_attn' if target.path[0] == 'attn' else 'mlp'}.{name}"
            tensors[f"{stem}.lora_A.weight"] = rng.normal(0, std, (rank, target.in_features(config))).astype(np.float32)
            tensors[f"{stem}.lora_B.weight"] = rng.normal(0, std, (target.out_features(config), rank)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets), "bias": "none",
        "model_type": model_types(config)[0]}))
    return directory


def upload_adapter(base: str, name: str, directory: str | os.PathLike, headers: dict) -> str:
    """Create a finetune and upload its two files; returns its id."""
    url = f"{base}/client/v4/accounts/load/ai/finetunes"
    r = requests.post(url, json={"model": MODEL, "name": name}, headers=headers, timeout=60)
    r.raise_for_status()
    finetune_id = r.json()["result"]["id"]
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (Path(directory) / file_name).read_bytes()
        r = requests.post(f"{url}/{finetune_id}/finetune-assets", headers=headers, timeout=120,
                          data={"file_name": file_name}, files={"file": (file_name, data)})
        if r.status_code != 200:
            raise RuntimeError(f"uploading {file_name}: {r.status_code} {r.text}")
    return finetune_id


# -- one request, checked ---------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    kind: str
    status: int | None  # None: no answer (connection error or client timeout)
    seconds: float
    ttft: float | None = None
    tokens: int = 0
    problem: str | None = None  # a violation, in words


def body_for(i: int, stream: bool, messages: bool, lora: str | None, max_tokens: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {"max_tokens": max_tokens, "stream": stream, "temperature": 0.7 if i % 3 else 0}
    body.update({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]}
                if messages else {"prompt": prompt})
    if lora is not None:
        body["lora"] = lora
    return body


def parse_sse(raw: bytes) -> tuple[list[dict], bool, str | None]:
    """(data events before [DONE], whether [DONE] ended the stream, a format problem)."""
    events, done = [], False
    blocks = raw.split(b"\n\n")
    if blocks[-1] != b"":
        return events, False, "the stream does not end with a blank line"
    for block in blocks[:-1]:
        if block.startswith(b":"):
            continue
        if not block.startswith(b"data: "):
            return events, done, f"not an SSE data line: {block[:80]!r}"
        if done:
            return events, done, "data after [DONE]"
        payload = block[len(b"data: "):]
        if payload == b"[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, done, None


_FIRST_TEXT = re.compile(rb'(^|\n)data: \{"response":"[^"]')  # a stream event with text


def send(session: requests.Session, base: str, body: dict, headers: dict, timeout: float) -> Result:
    kind = ("stream" if body.get("stream") else "json") + ("+messages" if "messages" in body else "+prompt") + (
        "+lora" if "lora" in body else "")
    start = time.monotonic()
    try:
        r = session.post(run_url(base), json=body, headers=headers, timeout=timeout, stream=True)
        ttft, raw = None, b""
        for chunk in r.iter_content(chunk_size=None):
            raw += chunk
            if ttft is None and _FIRST_TEXT.search(raw):
                ttft = time.monotonic() - start
        seconds = time.monotonic() - start
    except requests.RequestException as e:
        return Result(kind, None, time.monotonic() - start, problem=f"no answer: {type(e).__name__}: {e}")
    result = Result(kind, r.status_code, seconds)
    if r.status_code >= 500:
        result.problem = f"{r.status_code}: {raw[:300]!r}"
    elif r.status_code == 429:
        if b'"code":3040' not in raw.replace(b" ", b""):
            result.problem = f"429 without code 3040: {raw[:300]!r}"
    elif r.status_code != 200:
        result.problem = f"unexpected {r.status_code}: {raw[:300]!r}"
    elif body.get("stream"):
        events, done, problem = parse_sse(raw)
        errors = [e for e in events if e.get("errors")]
        if problem or errors or not done or not events or "usage" not in events[-1]:
            result.problem = problem or (f"error event {errors[0]}" if errors else "stream without [DONE]"
                                         if not done else "stream without a usage event")
        else:
            result.ttft = ttft if ttft is not None else seconds
            result.tokens = events[-1]["usage"]["completion_tokens"]
    else:
        answer = json.loads(raw)
        if not answer.get("success") or "usage" not in answer.get("result", {}):
            result.problem = f"not a success envelope: {raw[:300]!r}"
        else:
            result.tokens = answer["result"]["usage"]["completion_tokens"]
    return result


# -- phase 1: load ----------------------------------------------------------------------------------
def load_phase(base: str, *, clients: int, duration: float, max_tokens: int, lora: str | None, headers: dict,
               timeout: float, once: bool = False) -> tuple[list[Result], float]:
    """Each client sends requests back to back for `duration` seconds (`once`: exactly one each)."""
    results: list[Result] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration
    variants = list(itertools.product((True, False), (False, True), (None, lora) if lora else (None,)))

    def client(c: int) -> None:
        session = requests.Session()
        for n in itertools.count():
            if (n > 0 if once else time.monotonic() >= stop_at):
                break
            stream, messages, adapter = variants[(c + n) % len(variants)]
            result = send(session, base, body_for(c + n, stream, messages, adapter, max_tokens), headers, timeout)
            with lock:
                results.append(result)
        session.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - start


def compiles(base: str) -> int:
    return int(requests.get(f"{base}/health", timeout=10).json()["scheduler"]["compiles"])


def warm_up(base: str, *, clients: int, max_tokens: int, lora: str | None, headers: dict, timeout: float,
            rounds: int = 30) -> tuple[list[Result], int, int]:
    """Rounds of one request per client (the same mix as the load) until a round compiles nothing
    new, so that phase 1 measures serving, not XLA. Returns (results, rounds, new compiles)."""
    results, first = [], compiles(base)
    before = first
    for n in range(1, rounds + 1):
        got, _ = load_phase(base, clients=clients, duration=0, max_tokens=max_tokens, lora=lora, headers=headers,
                            timeout=timeout, once=True)
        results += got
        now = compiles(base)
        if now == before and n > 1:
            return results, n, now - first
        before = now
    return results, rounds, before - first


# -- phase 2: over capacity -------------------------------------------------------------------------
class Holder:
    """A streaming request that occupies a slot or a queue place until `drop()` closes its socket."""

    def __init__(self, base: str, body: dict, headers: dict):
        self.sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=600)
        data = json.dumps(body).encode()
        head = (f"POST {run_url('')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.sock.sendall(head.encode() + data)

    def drop(self) -> None:
        self.sock.close()


def finished(m: dict[str, float]) -> float:
    """Requests the scheduler finished so far, whatever their outcome."""
    return sum(m.get(f'gemma_jax_scheduler_requests_total{{outcome="{o}"}}', 0)
               for o in ("completed", "cancelled", "failed"))


def capacity_phase(base: str, *, excess: int, hold_tokens: int, headers: dict,
                   limit: float) -> tuple[list[Result], list[str]]:
    """Fill every slot, then the whole queue, with holders; then `excess` clients at once must each get
    429 / 3040 within `limit` seconds. Returns (their results, violations)."""
    scheduler = requests.get(f"{base}/health", timeout=10).json()["scheduler"]
    slots, max_queue = int(scheduler["slots"]), int(scheduler["max_queue"])
    # raw text that goes on and on, greedy: a holder runs to max_tokens
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "raw": True, "temperature": 0,
            "max_tokens": hold_tokens, "stream": True}
    holders: list[Holder] = []
    results: list[Result] = []
    try:
        before = finished(metrics(base))
        holders += [Holder(base, body, headers) for _ in range(slots)]
        if wait_until(lambda: metrics(base).get("gemma_jax_scheduler_active_slots") == slots, 120) is None:
            return results, [f"capacity: the {slots} slots never filled: {metrics(base)}"]
        holders += [Holder(base, body, headers) for _ in range(max_queue)]
        if wait_until(lambda: metrics(base).get("gemma_jax_scheduler_queue_depth") == max_queue, 60) is None:
            return results, [f"capacity: the queue never filled ({max_queue}): {metrics(base)}"]
        results = [None] * excess  # type: ignore[list-item]
        gate = threading.Barrier(excess)

        def one(i: int) -> None:
            with requests.Session() as session:
                gate.wait()
                results[i] = send(session, base, body_for(i, i % 2 == 0, i % 4 < 2, None, 16), headers, 30)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(excess)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if finished(metrics(base)) != before:
            return results, ["capacity: a holder finished before the burst was over, so the server was not full "
                             "throughout: inconclusive (raise --hold-tokens)"]
    finally:
        for h in holders:
            h.drop()
    problems = []
    for r in results:
        if r.status != 429:
            problems.append(f"capacity: {r.kind} got {r.status} after {r.seconds:.2f} s, not 429: {r.problem}")
        elif r.problem:
            problems.append(f"capacity: {r.problem}")
        elif r.seconds > limit:
            problems.append(f"capacity: 429 after {r.seconds:.2f} s (limit {limit} s)")
    return results, problems


# -- report ---------------------------------------------------------------------------------------------
def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize_load(results: list[Result], seconds: float) -> list[str]:
    statuses = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ttft = [r.ttft for r in results if r.ttft is not None]
    tokens = sum(r.tokens for r in results)
    streams = [r for r in results if r.kind.startswith("stream") and r.status == 200]
    kinds = sorted({r.kind for r in results})
    return [
        f"requests: {len(results)} in {seconds:.1f} s, by status {dict(sorted(statuses.items(), key=str))}",
        f"kinds: {', '.join(f'{k} {sum(r.kind == k for r in results)}' for k in kinds)}",
        f"streams answered 200: {len(streams)}, ended with [DONE]: {sum(r.problem is None for r in streams)}",
        f"5xx: {sum(1 for r in results if r.status is not None and r.status >= 500)}, "
        f"no answer: {sum(r.status is None for r in results)}, 429: {statuses.get(429, 0)}",
        f"TTFT (streams) p50 {pct(ttft, 50):.2f} s, p99 {pct(ttft, 99):.2f} s, max {max(ttft, default=float('nan')):.2f} s",
        f"completion tokens: {tokens}, {tokens / seconds:.1f} tokens/s; request latency p50 "
        f"{pct([r.seconds for r in results], 50):.2f} s, p99 {pct([r.seconds for r in results], 99):.2f} s",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="attach to a running server instead of starting one")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each load request")
    p.add_argument("--excess", type=int, default=32, help="clients arriving when slots and queue are full")
    p.add_argument("--limit-429", type=float, default=1.0, help="seconds within which the excess must get 429")
    p.add_argument("--hold-tokens", type=int, default=256, help="max_tokens of the holders filling the server")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the server started here")
    p.add_argument("--max-queue", type=int, help="--max-queue of the server started here (default: clients)")
    p.add_argument("--random-weights", metavar="CONFIG", help="serve random weights (default: the embedded model)")
    p.add_argument("--model-config", default="gemma3_270m",
                   help="with --url: the served architecture, for the adapter (serving.factory.RANDOM_CONFIGS)")
    p.add_argument("--no-lora", action="store_true", help="do not upload or use an adapter")
    p.add_argument("--api-token", default=os.environ.get("GEMMA_JAX_API_TOKEN"))
    p.add_argument("--request-timeout", type=float, default=300.0, help="client timeout of one request (a hang)")
    p.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "gemma-jax-load-server.log"))
    p.add_argument("--no-capacity", action="store_true", help="skip phase 2")
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="seconds the started server may take to report ready (it compiles every bucket first)")
    args = p.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_token}"} if args.api_token else {}
    with contextlib.ExitStack() as stack:
        if args.url:
            base = args.url.rstrip("/")
        else:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gemma-jax-load-"))
            max_queue = args.max_queue if args.max_queue is not None else args.clients
            threads = args.max_batch + max_queue + args.excess + args.clients + 8
            flags = ["--data-dir", data_dir, "--max-batch", str(args.max_batch), "--max-queue", str(max_queue),
                     "--threads", str(threads), "--lora-slots", "2", "--max-lora-rank", "8"]
            if args.random_weights:
                flags += ["--random-weights", args.random_weights]
            print(f"starting gemma-jax serve {' '.join(flags[2:])} (log: {args.server_log})", flush=True)
            started = time.monotonic()
            base = stack.enter_context(server(flags, log_path=args.server_log, ready_timeout=args.ready_timeout))
            print(f"ready in {time.monotonic() - started:.1f} s at {base}", flush=True)
        lora = None
        if not args.no_lora:
            from serving.factory import RANDOM_CONFIGS

            config = RANDOM_CONFIGS[args.random_weights or args.model_config]()
            adapter_dir = write_random_adapter(stack.enter_context(tempfile.TemporaryDirectory()), config)
            lora = "load-adapter"
            upload_adapter(base, lora, adapter_dir, headers)
        started = time.monotonic()
        warm, rounds, compiled = warm_up(base, clients=args.clients, max_tokens=args.max_tokens, lora=lora,
                                         headers=headers, timeout=900)
        problems = [f"warm-up: {r.kind}: {r.problem}" for r in warm if r.problem]
        print(f"warm-up: {len(warm)} requests in {rounds} rounds, {time.monotonic() - started:.1f} s, "
              f"{compiled} new compiles", flush=True)

        print(f"phase 1: {args.clients} clients for {args.duration:.0f} s, max_tokens {args.max_tokens}, "
              f"lora {'on' if lora else 'off'}", flush=True)
        results, seconds = load_phase(base, clients=args.clients, duration=args.duration, max_tokens=args.max_tokens,
                                      lora=lora, headers=headers, timeout=args.request_timeout)
        for line in summarize_load(results, seconds):
            print("  " + line)
        problems += [f"load: {r.kind}: {r.problem}" for r in results if r.problem]
        freed = wait_until(lambda: idle(base), 30)
        print(f"  idle (no slot, queue or in-flight generation) {freed:.2f} s after the last answer"
              if freed is not None else "  NOT idle 30 s after the last answer")
        if freed is None:
            problems.append(f"load: the server is not idle 30 s after the last answer: {metrics(base)}")

        if not args.no_capacity:
            print(f"phase 2: slots + queue filled by holders, then {args.excess} clients at once", flush=True)
            burst, more = capacity_phase(base, excess=args.excess, hold_tokens=args.hold_tokens, headers=headers,
                                         limit=args.limit_429)
            burst = [r for r in burst if r is not None]
            problems += more
            times = [r.seconds for r in burst if r.status == 429]
            if times:
                print(f"  429 (3040): {len(times)} of {len(burst)}; time to 429 p50 {pct(times, 50) * 1000:.0f} ms, "
                      f"max {max(times) * 1000:.0f} ms")
            freed = wait_until(lambda: idle(base), 120)
            print(f"  holders dropped: idle after {freed:.2f} s" if freed is not None else "  NOT idle 120 s after the holders left")
            if freed is None:
                problems.append(f"capacity: the server is not idle 120 s after the holders left: {metrics(base)}")

    for problem in problems[:50]:
        print("VIOLATION " + problem)
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    print("OK" if not problems else f"FAILED: {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
