"""Multi-host serving (gemma_jax/engine/multihost.py) on this machine: two processes x 4 fake CPU
devices, gloo collectives, the coordinator on 127.0.0.1.

Process 0 runs the Scheduler over a LeaderEngine (data=2 x model=4 over the 8 global devices),
process 1 follows (tests/multihost_worker.py). The greedy tokens of a batch must equal an
independent reference: the plain model forward with no cache, recomputed for every token
(`engine_reference.naive_greedy`), on the same random weights, in this process. Then the test kills
the follower: the leader's next request must fail with FollowerLost within seconds, not hang.
Before that, a LoRA adapter that only the leader can read is refused and loaded nowhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
WORKER = HERE / "multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log: Path, cwd: Path = HERE, **env_extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        assert all(p.poll() is None for p in procs), "a process exited early"
        time.sleep(0.2)


def test_two_processes_match_the_reference_and_a_lost_follower_fails_requests(tmp_path):
    sys.path.insert(0, str(HERE))
    import multihost_worker as w
    from engine_reference import naive_greedy

    import jax
    from gemma_jax.finetune import init_adapter
    from gemma_jax.weights.peft import save_adapter

    # A LoRA adapter every process can read, and one only the leader's working directory holds.
    config, _ = w.model()
    adapter = init_adapter(config, jax.random.key(1), rank=4)
    shared = save_adapter(adapter, tmp_path / "shared_adapter", base_model_name="tiny")
    cwd = {name: tmp_path / name for name in ("leader_cwd", "follower_cwd")}
    for path in cwd.values():
        path.mkdir()
    save_adapter(adapter, cwd["leader_cwd"] / "adapter_local", base_model_name="tiny")

    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "report.json"
    leader = start([coordinator, 2, 0, out, "kill"], tmp_path / "leader.log", cwd["leader_cwd"],
                   MH_SHARED_ADAPTER=shared)
    follower = start([coordinator, 2, 1, out], tmp_path / "follower.log", cwd["follower_cwd"],
                     MH_SHARED_ADAPTER=shared)
    logs = lambda: "\n".join(p.read_text()[-3000:] for p in (tmp_path / "leader.log", tmp_path / "follower.log"))
    try:
        try:
            wait_for(Path(f"{out}.ready"), (leader, follower), 170)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{logs()}") from None
        follower.send_signal(signal.SIGKILL)
        follower.wait(10)
        Path(f"{out}.go").write_text("")
        assert leader.wait(timeout=60) == 0, logs()
    finally:
        for p in (leader, follower):
            p.kill()
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["devices"] == 8

    config, params = w.model()
    assert report["tokens"] == naive_greedy(config, params, w.prompts(), w.MAX_TOKENS)

    # An adapter loads on every process or on none: the leader-only one is refused and unloaded.
    assert report["shared_adapter"] >= 1
    assert report["local_adapter"].startswith("LoraError") and "every process" in report["local_adapter"], report
    assert report["adapters"] == {"shared": report["shared_adapter"]}

    # The request after the kill failed, clearly and quickly: no hang, no garbage tokens.
    assert report["after_kill"].startswith("RequestFailed") and "FollowerLost" in report["after_kill"], report
    assert report["after_kill_s"] < 30, report


def test_serve_with_a_coordinator_answers_over_http_from_process_0(tmp_path, gguf_file):
    """`gemma-jax serve --coordinator 127.0.0.1:P --num-processes 2 --process-id I` in two processes
    (one CPU device each: a data=1 x model=2 mesh across them): a request to process 0 gets the text
    an independent greedy loop gives on the same random weights; SIGTERM to the leader stops the
    follower too."""
    sys.path.insert(0, str(HERE))
    import requests
    from tiny_server import RUN_PATH, load, reference

    coordinator = f"127.0.0.1:{free_port()}"
    flags = ["--random-weights", "tiny_gemma3", "--lora-slots", "0", "--no-warmup", "--data-dir",
             str(tmp_path / "data"), "--coordinator", coordinator, "--num-processes", "2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(GEMMA_JAX_CACHE=str(gguf_file.parent), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    follower_log = tmp_path / "follower.log"
    follower = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", *flags, "--process-id", "1"],
                                cwd=HERE.parent, env=env, stdout=follower_log.open("w"), stderr=subprocess.STDOUT)
    try:
        with load.server([*flags, "--process-id", "0"], log_path=tmp_path / "leader.log", ready_timeout=170,
                         env={"GEMMA_JAX_CACHE": str(gguf_file.parent)}) as base:
            r = requests.post(base + RUN_PATH, json={"prompt": "Tell me a story", "max_tokens": 8, "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
            text, n = reference("Tell me a story", 8)
            assert r.json()["result"]["response"] == text
            assert r.json()["result"]["usage"]["completion_tokens"] == n
        assert follower.wait(timeout=60) == 0, follower_log.read_text()[-3000:]
    finally:
        follower.kill()
    assert "multi-host follower 1 of 2 ready" in follower_log.read_text()
    assert "multi-host follower 1: the leader stopped after" in follower_log.read_text()
