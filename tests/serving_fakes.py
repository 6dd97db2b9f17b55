"""A fake tokenizer, scheduler and adapter bank whose outputs are computable by hand.

Like JetStream's mock engine for its orchestrator tests, these let the HTTP layer be tested without a
model. The rules:

- FakeTokenizer: one token per character, id = ord(char); BOS is id 2 (so a raw prompt of n chars
  is n + 1 tokens); decode drops ids 0..2.
- FakeScheduler: the generated text is the prompt's text (decoded ids after BOS) reversed, cut to
  max_tokens characters, one character (= one token) per event; with an adapter it is swapcased,
  so an adapter's output always differs from the base model's for letters. finish_reason is
  "length" when cut, else "stop"; "cancelled" if cancel() came first.
- FakeScheduler.check is the engine's own limits check (`api.check_limits`) over `limits`
  (Workers AI's gemma-7b-it numbers by default: 1512 input tokens, 2048 in all).
- Knobs: `delay` seconds per token (slow), `fail_after` n tokens then RequestFailed mid-stream,
  `full=True` -> submit raises QueueFull, `slots` decode slots (more requests queue).
- FakeAdapterBank: loads an adapter if adapter_config.json has an integer "r" <= 32 and the
  safetensors file exists; otherwise ValueError (what the real LoRA loader does with bad files).

Run as a script it serves the fake backend under the real gunicorn server (`serving.cli`), for the
test that checks the production server process; this path exists only in tests/.
"""

from __future__ import annotations

import dataclasses

import json
import os
import queue
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gemma_jax.config import Limits  # noqa: E402
from gemma_jax.engine.api import (  # noqa: E402
    Completion, QueueFull, RequestFailed, StreamEvent, UnknownAdapter, check_limits,
)
from serving.backend import Backend  # noqa: E402

BOS = 2
MODEL = "@hf/google/gemma-7b-it"


class FakeTokenizer:
    bos_id, eos_id, pad_id = BOS, 1, 0

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [ord(c) for c in text]
        return [BOS, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > BOS)


def expected_output(prompt_text: str, max_tokens: int, adapter: bool = False) -> str:
    """What the fake generates for a prompt whose formatted text is `prompt_text`."""
    out = prompt_text[::-1][:max_tokens]
    return out.swapcase() if adapter else out


_END = object()


class FakeHandle:
    def __init__(self, request):
        self.request = request
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self._events: queue.Queue = queue.Queue()
        self._ended = False

    def next(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event, None at the end; TimeoutError if none within `timeout`; the failure."""
        if self._ended:
            if self.error is not None:
                raise self.error
            return None
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("nothing from the fake in time") from None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item is _END:
            self._ended = True
            return None
        return item

    def result(self, timeout: float | None = None) -> Completion:
        if not self.finished.wait(timeout):
            raise TimeoutError("fake handle not finished")
        if self.error is not None:
            raise self.error
        return self.completion

    def cancel(self) -> None:
        self.cancelled.set()


class FakeScheduler:
    def __init__(self, tokenizer: FakeTokenizer | None = None, *, delay: float = 0.0,
                 fail_after: int | None = None, full: bool = False, slots: int = 4,
                 known_adapters=None, limits: Limits = Limits()):
        self.tokenizer = tokenizer or FakeTokenizer()
        self.limits = limits
        self.delay, self.fail_after, self.full, self.slots = delay, fail_after, full, slots
        self.known_adapters = known_adapters  # callable -> set of keys, or None = accept any
        self.requests, self.handles = [], []
        self.started = self.stopped = False
        self.tokens_generated = 0
        self._active = self._queued = 0
        self._lock = threading.Lock()
        self._free = threading.Semaphore(slots)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True
        print("fake scheduler stopped", file=sys.stderr, flush=True)

    def stats(self) -> dict:
        with self._lock:
            return {"queue_depth": self._queued, "active_slots": self._active, "slots": self.slots,
                    "tokens_generated": self.tokens_generated}

    def check(self, prompt_tokens: int, max_tokens: int | None = None) -> int:
        """As Scheduler.check: the engine's rule over `limits`; None = the rest of the context."""
        lim = self.limits
        return check_limits(prompt_tokens, sys.maxsize if max_tokens is None else max_tokens,
                            lim.max_input_tokens, lim.max_total_tokens, clip=max_tokens is None)

    def submit(self, request) -> FakeHandle:
        """As Scheduler.submit: the limits checked here (max_tokens None resolved), then queued;
        `requests` records each request as resolved."""
        request = dataclasses.replace(request, max_tokens=self.check(len(request.prompt_ids), request.max_tokens))
        if self.full:
            raise QueueFull("fake queue is full")
        if request.adapter is not None and self.known_adapters is not None \
                and request.adapter not in self.known_adapters():
            raise UnknownAdapter(request.adapter)
        handle = FakeHandle(request)
        with self._lock:
            self.requests.append(request)
            self.handles.append(handle)
            self._queued += 1
        threading.Thread(target=self._generate, args=(handle,), daemon=True).start()
        return handle

    def _generate(self, h: FakeHandle) -> None:
        self._free.acquire()
        with self._lock:
            self._queued -= 1
            self._active += 1
        req = h.request
        text = expected_output(self.tokenizer.decode(req.prompt_ids[1:]), req.max_tokens, req.adapter is not None)
        full_len = len(self.tokenizer.decode(req.prompt_ids[1:]))
        emitted = 0
        try:
            for ch in text:
                if self.fail_after is not None and emitted == self.fail_after:
                    raise RequestFailed("fake failure mid-generation")
                if self.delay and h.cancelled.wait(self.delay):
                    break
                if h.cancelled.is_set():
                    break
                h._events.put(StreamEvent(ch, (ord(ch),)))
                emitted += 1
                with self._lock:
                    self.tokens_generated += 1
            if h.cancelled.is_set():
                finish = "cancelled"
            else:
                finish = "length" if full_len > req.max_tokens else "stop"
            h.completion = Completion(text=text[:emitted], token_ids=tuple(ord(c) for c in text[:emitted]),
                                      prompt_tokens=len(req.prompt_ids), completion_tokens=emitted,
                                      finish_reason=finish)
        except BaseException as e:  # noqa: BLE001
            h.error = e
            h._events.put(e)
        finally:
            with self._lock:
                self._active -= 1
            self._free.release()
            h.finished.set()
            h._events.put(_END)


class FakeAdapterBank:
    def __init__(self):
        self.loaded: dict[str, str] = {}

    def load(self, key: str, directory: str) -> None:
        config = json.loads(Path(directory, "adapter_config.json").read_text())
        rank = config.get("r")
        if not isinstance(rank, int) or not 1 <= rank <= 32:
            raise ValueError(f"adapter rank r must be an integer in 1..32, got {rank!r}")
        if not Path(directory, "adapter_model.safetensors").is_file():
            raise ValueError("adapter_model.safetensors missing")
        self.loaded[key] = directory

    def unload(self, key: str) -> None:
        self.loaded.pop(key, None)


def fake_backend(**scheduler_kwargs):
    """(backend, scheduler, bank) wired together as a real server would be."""
    tokenizer = FakeTokenizer()
    bank = FakeAdapterBank()
    scheduler = FakeScheduler(tokenizer, known_adapters=lambda: set(bank.loaded), **scheduler_kwargs)
    backend = Backend(scheduler, tokenizer, model_name=MODEL,
                      load_adapter_fn=bank.load, unload_adapter_fn=bank.unload)
    return backend, scheduler, bank


class LiveServer:
    """A real HTTP server on 127.0.0.1 (werkzeug, threaded) serving `app` from a thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_url(base: str, model: str = MODEL, account: str = "test-account") -> str:
    return f"{base}/client/v4/accounts/{account}/ai/run/{model}"


def main() -> None:
    """Serve the fake backend under the real gunicorn server (tests only)."""
    import argparse

    from serving.cli import add_serve_arguments, run_serve

    parser = add_serve_arguments(argparse.ArgumentParser(description="fake-backed gemma-jax server (tests)"))
    parser.add_argument("--fake-delay", type=float, default=float(os.environ.get("FAKE_DELAY", "0")))
    args = parser.parse_args()
    run_serve(args, lambda a: fake_backend(delay=a.fake_delay)[0])


if __name__ == "__main__":
    main()
