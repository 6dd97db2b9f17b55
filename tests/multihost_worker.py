"""One process of the multi-host test (tests/test_multihost.py): `python multihost_worker.py
COORDINATOR NUM_PROCESSES PROCESS_ID OUT.json`.

Each of the processes has 4 fake CPU devices; together they make one data=2 x model=4 mesh. Every
process builds the same Engine over it; process 0 runs a Scheduler over a `LeaderEngine` with the
prompts of `PROMPTS` (greedy) and writes the generated token ids to OUT.json, then stops the
followers; the others run `multihost.follow`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax import config as config_lib  # noqa: E402
from gemma_jax.engine import multihost  # noqa: E402
from gemma_jax.engine.api import Request, SamplingParams  # noqa: E402
from gemma_jax.engine.build import build_engine  # noqa: E402
from gemma_jax.engine.scheduler import Scheduler  # noqa: E402
from gemma_jax.params import init_params  # noqa: E402
from gemma_jax.sharding import make_mesh  # noqa: E402

CONFIG = "tiny_mha"
LIMITS = config_lib.Limits(max_input_tokens=48, max_total_tokens=64, max_batch_prefill_tokens=128)
MAX_TOKENS = 12
PROMPT_LENGTHS = (5, 17, 9, 30, 3)


def model():
    config = getattr(config_lib, CONFIG)().replace(limits=LIMITS)
    params = init_params(config, jax.random.key(0), np.float32)  # on this process's first device
    return config, jax.tree.map(np.asarray, params)  # host copies: the engine places them globally


def prompts():
    rng = np.random.default_rng(0)
    return [[2] + rng.integers(3, 512, size=n - 1).tolist() for n in PROMPT_LENGTHS]


class IdTokenizer:
    """Enough of a tokenizer for the scheduler's handles: every id is a character of its own."""

    class sp:  # noqa: N801 - sentencepiece's interface
        IsControl = IsByte = staticmethod(lambda i: False)

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)


def engine(config, params, mesh):
    return build_engine(config, params, mesh=mesh, max_seqs=4, page_size=8, num_pages=40, token_budget=32,
                        decode_steps=4, adapter_slots=2, adapter_rank=8)


def main(coordinator: str, num_processes: int, process_id: int, out: str, after_kill: bool = False) -> None:
    multihost.initialize(coordinator, num_processes, process_id, heartbeat_timeout_s=10)
    mesh = make_mesh(2, 4)  # over the 8 global devices
    config, params = model()
    eng = engine(config, params, mesh)
    if not multihost.is_leader():
        n = multihost.follow(eng)
        print(f"follower {process_id}: {n} commands", flush=True)
        return
    leader = multihost.LeaderEngine(eng)
    with Scheduler(leader, IdTokenizer()) as scheduler:
        handles = [scheduler.submit(Request(tuple(p), MAX_TOKENS, SamplingParams(temperature=0.0)))
                   for p in prompts()]
        tokens = [list(h.result(120).token_ids) for h in handles]
        report = {"tokens": tokens, "devices": jax.device_count(), "processes": jax.process_count()}
        if after_kill:  # adapters (dirs made by the test), then the test kills the follower
            report["shared_adapter"] = leader.load_adapter("shared", os.environ["MH_SHARED_ADAPTER"])
            try:  # a relative path that only the leader's working directory holds
                leader.load_adapter("local", "adapter_local")
                report["local_adapter"] = "loaded"
            except Exception as err:  # noqa: BLE001 - what the finetunes API would report
                report["local_adapter"] = f"{type(err).__name__}: {err}"
            report["adapters"] = leader.adapters()
            # the test kills the follower once it sees OUT.ready, then writes OUT.go
            Path(out + ".ready").write_text("")
            while not Path(out + ".go").exists():
                time.sleep(0.1)
            started = time.monotonic()
            try:
                scheduler.submit(Request(tuple(prompts()[0]), MAX_TOKENS, SamplingParams(temperature=0.0))).result(120)
                report["after_kill"] = "completed"
            except Exception as err:  # noqa: BLE001 - what the client would see
                report["after_kill"] = f"{type(err).__name__}: {err}"
            report["after_kill_s"] = time.monotonic() - started
            with open(out, "w") as f:
                json.dump(report, f)
            os._exit(0)  # the distributed runtime would wait for the dead follower at exit
    leader.stop_followers()
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:] == ["kill"])
