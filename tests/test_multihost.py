"""Multi-host serving (gemma_jax/engine/multihost.py) on this machine: two processes x 4 fake CPU
devices, gloo collectives, the coordinator on 127.0.0.1. Process 0 runs the Scheduler over a
LeaderEngine (data=2 x model=4 over the 8 global devices), process 1 follows; the greedy tokens of a
batch must equal an independent reference: the plain model forward with no cache, recomputed for
every token (`engine_reference.naive_greedy`), on the same random weights, in this process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=HERE, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_processes_match_the_single_process_reference(tmp_path):
    sys.path.insert(0, str(HERE))
    import multihost_worker as w
    from engine_reference import naive_greedy

    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "tokens.json"
    procs = [start([coordinator, 2, i, out], tmp_path / f"p{i}.log") for i in (0, 1)]
    try:
        codes = [p.wait(timeout=170) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = "\n".join((tmp_path / f"p{i}.log").read_text()[-3000:] for i in (0, 1))
    assert codes == [0, 0], logs
    got = json.loads(out.read_text())
    assert got["processes"] == 2 and got["devices"] == 8
    config, params = w.model()
    want = naive_greedy(config, params, w.prompts(), w.MAX_TOKENS)
    assert got["tokens"] == want
    assert "follower 1:" in logs
