"""A real `gemma-jax serve` process with random tiny_gemma3 weights, for the disconnect and fault tests
(a helper, not a test).

`TinyServer` starts the CLI on 127.0.0.1 (benchmarks/load.py's `server`) with the test-only fault
hook armed (`GEMMA_JAX_TEST_FAULT` -> a trigger file, `fault()` writes it atomically) and compiles on
first use. `reference(prompt, n)` is the text the served model must give greedily, computed here,
independently of the server: the same random weights (`serving.factory.load_model` with the same
flags) and a plain greedy loop over the full forward, no cache (`test_embedded._reference_greedy`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import load  # noqa: E402

RUN_PATH = load.run_url("")


class TinyServer:
    def __init__(self, tmp: Path, gguf_file: Path, *flags: str):
        self.tmp, self.trigger, self.log = tmp, tmp / "fault", tmp / "server.log"
        self.flags = ["--data-dir", str(tmp / "data"), "--random-weights", "tiny_gemma3", "--lora-slots", "0",
                      "--no-stream-padding", *flags]
        self.env = {"GEMMA_JAX_CACHE": str(gguf_file.parent), "GEMMA_JAX_TEST_FAULT": str(self.trigger),
                    "GEMMA_JAX_WARMUP": "0"}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TinyServer":
        self.base = self._stack.enter_context(load.server(self.flags, log_path=self.log, env=self.env,
                                                          ready_timeout=300))
        self.port = int(self.base.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def fault(self, text: str | None) -> None:
        """Arm the hook ("generate", "prefill", "generate 0.05"), or disarm it (None)."""
        if text is None:
            self.trigger.unlink(missing_ok=True)
            return
        part = self.trigger.with_suffix(".part")
        part.write_text(text)
        os.replace(part, self.trigger)

    def metric(self, name: str) -> float:
        return load.metrics(self.base).get(name, 0.0)

    def connect(self, body: dict) -> http.client.HTTPConnection:
        """A connection with the run request sent (the answer not read yet)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", RUN_PATH, body=json.dumps(body), headers={"Content-Type": "application/json"})
        return conn


@functools.lru_cache(maxsize=None)
def _model():
    from serving.cli import add_serve_arguments
    from serving.factory import load_model

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--random-weights", "tiny_gemma3"])
    return load_model(args)


def reference(prompt: str, max_tokens: int) -> tuple[str, int]:
    """(text, completion_tokens) of `prompt` as the default scoped prompt, greedy, computed here."""
    from gemma_jax.tokenizer import format_prompt
    from test_embedded import _reference_greedy

    config, params, tok = _model()
    ids = tok.encode(format_prompt(prompt))
    drawn = _reference_greedy(config, params, ids, max_tokens)  # stops before a stop id
    return tok.decode(drawn), len(drawn) + (len(drawn) < max_tokens)
