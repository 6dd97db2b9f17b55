"""Multi-host serving on JAX's own multi-controller runtime (`jax.distributed`).

JetStream's recipe. Every process runs `jax.distributed.initialize`, builds the same `PagedEngine`
over one global mesh (`jax.devices()` spans every process) and so holds the same jitted step.
Process 0, the leader, holds HTTP and the `Scheduler`; its engine is a `LeaderEngine`, which before
each engine call that matters broadcasts a command (the call's name and host arguments: a new
sequence's prompt ids, limit, sampling parameters with their seed, adapter id; a cancellation; a
step and its decode steps; a reset; adapter loads) with `multihost_utils.broadcast_one_to_all`. The
other processes, followers, sit in `follow(engine)`: they receive each command and make the
identical call. The engine's host logic (page tables, prefix cache, preemption, the plan of each
step) is deterministic, so every process builds the same step inputs and enqueues the same SPMD
programs in the same order (a multi-controller program needs exactly that). The scheduler never
knows: a `LeaderEngine` implements the same engine interface (`api.StepEngine`).

What crosses between processes:
- a command is a small JSON document (`_encode`): a fixed-size int32 header (its length) is
  broadcast first, then the bytes padded to a power of two (so a handful of broadcast shapes, each
  compiled once). JSON, not pickle: a follower never runs code it was sent.
- sampling keys: the leader draws the seed of an unseeded request and sends it with the request:
  the same key on every process.
- what the host reads of a step (drawn tokens, finish reasons) is replicated by the engine's pinned
  output shardings, so every process reads the same values from its local copy.
- a LoRA adapter is loaded by path on every process (the directory must be readable by all: a
  shared data dir, or the same files on each host); the processes then agree (`process_allgather`
  of a flag) and if any failed, the leader unloads it everywhere and the load fails.

Failure: when a follower dies its connections close, so the leader's next broadcast fails at once
(gloo: "Connection reset by peer"; tests/test_multihost.py kills one), as does a dispatch whose
programs span it: the `LeaderEngine` raises `FollowerLost`, and every later call fails at once with
the same error. The scheduler fails the requests involved; when its `reset` fails too its
device thread stops, and `submit` refuses each new request with RequestFailed naming FollowerLost
(the processes no longer run the same programs: restart them all). A follower that hangs
without dying leaves the collective waiting; what ends that wait is `jax.distributed`'s heartbeat
(`heartbeat_timeout_s`), not tested here. See docs/multihost.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Sequence

import jax
import numpy as np

from gemma_jax.engine.api import SamplingParams
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.lora import LoraError

log = logging.getLogger("gemma_jax.multihost")

_HEADER = 4  # int32 words: [payload bytes, 0, 0, 0] (room to grow without a new broadcast shape)
_MIN_PAYLOAD = 256
STOP = "stop"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> None:
    """`jax.distributed.initialize`, before anything touches a device. With no arguments JAX finds
    the cluster itself (a TPU VM slice, SLURM, ...). CPU collectives go through gloo (fake-device
    tests); the setting is ignored by TPU and GPU backends. `jax_enable_recoverability` is on: when a
    follower dies, JAX's coordination service would otherwise abort the leader too (after the
    heartbeat timeout), dropping its HTTP connections; with it the leader lives on and answers each
    request with an error (`FollowerLost`)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    # JAX's preemption service catches SIGTERM (TPU maintenance) and keeps it from the HTTP server's
    # graceful stop; the leader stops the followers itself (`LeaderEngine.stop_followers`).
    jax.config.update("jax_enable_preemption_service", False)
    kwargs = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                  initialization_timeout=int(initialization_timeout_s))
    if coordinator is None and num_processes is None and process_id is None:
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    log.info("jax.distributed: process %d of %d, %d devices (%d local)", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())


def is_leader() -> bool:
    return jax.process_index() == 0


# -- the wire ---------------------------------------------------------------------------------------
def _encode(op: str, **args) -> bytes:
    return json.dumps({"op": op, **args}, separators=(",", ":")).encode()


def _padded(n: int) -> int:
    size = _MIN_PAYLOAD
    while size < n:
        size *= 2
    return size


def _broadcast(payload: bytes | None) -> bytes:
    """Process 0 sends `payload`; every process returns it. A collective: all must call it."""
    from jax.experimental import multihost_utils

    leader = is_leader()
    header = np.zeros((_HEADER,), np.int32)
    if leader:
        header[0] = len(payload)
    header = np.asarray(multihost_utils.broadcast_one_to_all(header, is_source=leader))
    n = int(header[0])
    buf = np.zeros((_padded(n),), np.uint8)
    if leader:
        buf[:n] = np.frombuffer(payload, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=leader))
    return buf[:n].tobytes()


def _agree(ok: bool) -> bool:
    """Whether `ok` holds on every process. A collective: all must call it."""
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def _sampling_to_json(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)


def _sampling_from_json(d: dict) -> SamplingParams:
    return SamplingParams(**d)


class FollowerLost(RuntimeError):
    """A command could not reach the followers: the processes no longer run the same programs."""


# -- the leader -------------------------------------------------------------------------------------
class LeaderEngine:
    """A `PagedEngine` on process 0 that broadcasts each call to the followers before making it.

    It implements the scheduler's engine interface (`api.StepEngine`) explicitly: the calls that run
    device programs or change host state the next step depends on (add, cancel, step, reset,
    warmup, adapter loads) are broadcast; the rest read the leader's engine. One lock keeps
    broadcast and call together, so the followers see calls in the leader's order even when an
    HTTP thread loads an adapter while the device thread steps. An unseeded request's seed is drawn
    here and sent, so every process samples with the same key.
    """

    def __init__(self, engine: PagedEngine, seed: int | None = None):
        if not is_leader():
            raise RuntimeError("LeaderEngine runs on process 0; other processes run follow(engine)")
        self.engine = engine
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._stopped = False
        self._lost: BaseException | None = None  # the error that lost a follower; every later call fails

    # -- what the leader alone answers ---------------------------------------------------------
    config = property(lambda self: self.engine.config)
    max_seqs = property(lambda self: self.engine.max_seqs)
    bank = property(lambda self: self.engine.bank)
    num_pages = property(lambda self: self.engine.num_pages)
    page_size = property(lambda self: self.engine.page_size)
    budget = property(lambda self: self.engine.budget)
    decode_steps = property(lambda self: self.engine.decode_steps)

    def check(self, prompt_tokens: int, max_tokens: int, *, clip: bool = False) -> int:
        return self.engine.check(prompt_tokens, max_tokens, clip=clip)

    def can_add(self, prompt_tokens: int) -> bool:
        return self.engine.can_add(prompt_tokens)

    def busy(self) -> bool:
        return self.engine.busy()

    def compile_counts(self) -> dict[str, int]:
        return self.engine.compile_counts()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def adapter_id(self, name: str) -> int:
        return self.engine.adapter_id(name)

    def adapters(self) -> dict[str, int]:
        return self.engine.adapters()

    # -- what every process does ---------------------------------------------------------------
    def _send(self, op: str, **args) -> None:
        if self._stopped:
            raise RuntimeError("the followers were stopped")
        if self._lost is not None:
            raise FollowerLost(f"multi-host: a follower process was lost ({self._lost!r}); restart every process")
        try:
            _broadcast(_encode(op, **args))
        except Exception as err:  # a dead peer: gloo closes the connection; TPU/GPU: the runtime's error
            self._lost = err
            raise FollowerLost(f"multi-host: the broadcast of {op!r} to the followers failed ({err!r}); "
                               "restart every process") from err

    def add(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
            adapter: int = 0) -> int:
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int(self._rng.integers(0, 2**63)))
        prompt = [int(t) for t in prompt_ids]
        with self._lock:
            self._send("add", prompt=prompt, max_tokens=int(max_tokens), sampling=_sampling_to_json(sampling),
                       adapter=int(adapter))
            return self.engine.add(prompt, int(max_tokens), sampling, int(adapter))

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._send("cancel", seq=int(seq_id))
            self.engine.cancel(int(seq_id))

    def step(self, steps: int | None = None):
        with self._lock:
            self._send("step", steps=None if steps is None else int(steps))
            return self.engine.step(steps)

    def reset(self) -> list[int]:
        with self._lock:
            self._send("reset")
            return self.engine.reset()

    def warmup(self, progress=None) -> None:
        with self._lock:
            self._send("warmup")
            self.engine.warmup(progress)  # the followers compile the same, unreported

    def load_adapter(self, name: str, adapter, *, require_model_type: bool = False) -> int:
        """Load by path on every process; if any process fails, unload it everywhere and raise
        (a bank that differs between processes would decode wrongly, silently)."""
        if not isinstance(adapter, (str, os.PathLike)):
            raise TypeError("multi-host: load adapters by path (every process reads the same directory)")
        with self._lock:
            self._send("load_adapter", name=name, path=os.fspath(adapter), require_model_type=require_model_type)
            try:
                index, error = self.engine.load_adapter(name, adapter, require_model_type=require_model_type), None
            except Exception as err:  # noqa: BLE001 - agreed on below, then raised
                index, error = None, err
            if _agree(error is None):
                return index
            if error is None:  # loaded here, not on some follower
                self._send("unload_adapter", name=name)
                self.engine.unload_adapter(name)
                error = LoraError(f"adapter {name!r} could not be loaded on every process "
                                  "(multi-host: the adapter directory must be readable by all)")
            raise error

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self._send("unload_adapter", name=name)
            self.engine.unload_adapter(name)

    def stop_followers(self) -> None:
        """Tell every follower to return from `follow` (the leader's last collective)."""
        with self._lock:
            if not self._stopped:
                self._send(STOP)
                self._stopped = True


# -- the followers ----------------------------------------------------------------------------------
def follow(engine: PagedEngine) -> int:
    """A follower's loop: make every engine call the leader broadcasts, until it says stop.
    Returns how many commands it ran. The host logic is deterministic, so the same calls in the
    same order give the same page tables, sequence ids and steps as the leader's. An engine call
    that fails here fails on the leader too (same programs, same inputs); it is logged and the loop
    goes on (the leader then resets)."""
    n = 0
    while True:
        cmd = json.loads(_broadcast(None))
        op, n = cmd["op"], n + 1
        if op == STOP:
            return n
        try:
            if op == "add":
                engine.add(cmd["prompt"], cmd["max_tokens"], _sampling_from_json(cmd["sampling"]), cmd["adapter"])
            elif op == "cancel":
                engine.cancel(cmd["seq"])
            elif op == "step":
                engine.step(cmd["steps"])
            elif op == "reset":
                engine.reset()
            elif op == "warmup":
                engine.warmup()
            elif op == "load_adapter":
                try:
                    engine.load_adapter(cmd["name"], cmd["path"], require_model_type=cmd["require_model_type"])
                    ok = True
                except Exception:  # noqa: BLE001 - reported to the leader, which decides
                    log.exception("follower: loading adapter %r failed", cmd["name"])
                    ok = False
                _agree(ok)
            elif op == "unload_adapter":
                engine.unload_adapter(cmd["name"])
            else:
                raise ValueError(f"unknown multi-host command {op!r}")
        except Exception:  # noqa: BLE001 - the leader sees the same failure and recovers
            log.exception("follower: %s failed", op)
