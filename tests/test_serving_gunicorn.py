"""The production server process: gunicorn (1 gthread worker) with the fake backend, on a free port.

Checks the readiness line, a request, a stream, a mid-stream disconnect freeing its slot (/metrics),
the JSON access log, then SIGTERM -> the scheduler is stopped in the worker and the master exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from serving_fakes import run_url

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(argv, env, ready_timeout: float, cwd=None):
    """Run a server subprocess until its 'gemma-jax ready' line; yields (proc, stderr lines so far,
    still filling). Afterwards the process is killed if it still runs and its stderr is drained."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line)
            if "gemma-jax ready" in line:
                ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(ready_timeout), "".join(lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)


def metric(base: str, name: str) -> float | None:
    text = requests.get(f"{base}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_gunicorn_serves_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEMMA_JAX_API_TOKEN": "tok", "FAKE_DELAY": "0.01"}
    argv = [sys.executable, str(ROOT / "tests" / "serving_fakes.py"), "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(tmp_path), "--threads", "4", "--graceful-timeout", "5"]
    with server_process(argv, env, 30) as (proc, lines):
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer tok"}
        r = requests.post(run_url(base), json={"prompt": "served", "raw": True}, headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["result"]["response"] == "devres"
        assert requests.post(run_url(base), json={"prompt": "x"}, timeout=10).status_code == 401
        r = requests.post(run_url(base), json={"prompt": "abc", "raw": True, "stream": True}, headers=auth,
                          timeout=10)
        data = [b[6:] for b in r.text.split("\n\n") if b.startswith("data: ")]
        assert [json.loads(d)["response"] for d in data[:3]] == ["c", "b", "a"] and data[-1] == "[DONE]"
        assert "Transfer-Encoding" in r.headers or "Content-Length" not in r.headers

        # a client that leaves mid-stream frees its slot (the fake needs 4 s for 400 tokens)
        r = requests.post(run_url(base), json={"prompt": "y" * 400, "raw": True, "stream": True},
                          headers=auth, stream=True, timeout=10)
        next(r.iter_content(chunk_size=None))
        assert metric(base, "gemma_jax_scheduler_active_slots") == 1.0
        r.close()
        deadline = time.monotonic() + 3
        while metric(base, "gemma_jax_scheduler_active_slots") != 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(base, "gemma_jax_scheduler_active_slots") == 0.0
        assert metric(base, 'gemma_jax_generations_total{outcome="cancelled"}') == 1.0
        assert metric(base, "gemma_jax_scheduler_tokens_generated") < 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    log = "".join(lines)
    ready_line = next(line for line in lines if "gemma-jax ready" in line)
    assert f"serving @hf/google/gemma-7b-it on http://127.0.0.1:{port}" in ready_line
    assert "fake scheduler stopped" in log and "gemma-jax stopped" in log
    access = [json.loads(line.split("serving.access: ", 1)[1]) for line in lines if "serving.access: " in line]
    run_route = "/client/v4/accounts/<account_id>/ai/run/<path:model>"
    assert [(a["route"], a["status"], a["stream"]) for a in access if a["route"] != "/metrics"] == [
        (run_route, 200, False), (run_route, 401, False), (run_route, 200, True), (run_route, 200, True)]
    assert all(a["method"] == "GET" and a["status"] == 200 for a in access if a["route"] == "/metrics")


def test_serve_flags_env_and_defaults(monkeypatch):
    import argparse

    from serving.cli import add_serve_arguments, app_kwargs

    for name in ("HOST", "PORT", "API_TOKEN", "DATA_DIR", "MAX_BATCH", "THREADS", "STREAM_PADDING",
                 "CHECKPOINT", "RANDOM_WEIGHTS", "MODEL_NAME", "REQUEST_TIMEOUT"):
        monkeypatch.delenv(f"GEMMA_JAX_{name}", raising=False)
    defaults = add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    assert (defaults.host, defaults.port, defaults.api_token, defaults.max_batch) == ("127.0.0.1", 8080, None, 8)
    assert defaults.no_stream_padding is False and defaults.checkpoint is None and defaults.random_weights is None
    assert defaults.model_name == "@hf/google/gemma-7b-it"

    monkeypatch.setenv("GEMMA_JAX_PORT", "9999")
    monkeypatch.setenv("GEMMA_JAX_API_TOKEN", "from-env")
    monkeypatch.setenv("GEMMA_JAX_STREAM_PADDING", "0")
    monkeypatch.setenv("GEMMA_JAX_MAX_BATCH", "32")
    monkeypatch.setenv("GEMMA_JAX_RANDOM_WEIGHTS", "gemma_2b")
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--port", "1234", "--data-dir", "/d"])
    assert args.port == 1234  # the flag wins over the environment
    assert (args.api_token, args.no_stream_padding, args.max_batch, args.random_weights) == (
        "from-env", True, 32, "gemma_2b")
    assert app_kwargs(args) == {"api_token": "from-env", "data_dir": "/d", "stream_padding": False,
                                "max_body_bytes": 1 << 20, "max_upload_bytes": 100 << 20,
                                "request_timeout": 600.0, "protect_metrics": False}
