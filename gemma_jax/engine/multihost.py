"""Multi-host serving on JAX's own multi-controller runtime (`jax.distributed`).

JetStream's recipe. Every process runs `jax.distributed.initialize`, builds the same `Engine` over
one global mesh (`jax.devices()` spans every process) and so holds the same jitted device functions.
Process 0, the leader, holds HTTP and the `Scheduler`; its engine is a `LeaderEngine`, which before
each engine call broadcasts a command (the call's name and host arguments: prompt ids, sampling
parameters, limits, a prefill seed, slots, live slots, adapter loads) with
`multihost_utils.broadcast_one_to_all`. The other processes, followers, sit in `follow(engine)`:
they receive each command and make the identical `Engine` call, so every process enqueues the same
SPMD programs in the same order (a multi-controller program needs exactly that). The scheduler never
knows: a `LeaderEngine` has the `Engine`'s interface.

What crosses between processes:
- a command is a small JSON document (`_encode`): a fixed-size int32 header (its length) is
  broadcast first, then the bytes padded to a power of two (so a handful of broadcast shapes, each
  compiled once). JSON, not pickle: a follower never runs code it was sent.
- prefill's sampling keys: the leader draws one seed per prefill from the scheduler's generator and
  both sides build their rows from `np.random.default_rng(seed)`: the same keys on every process.
- tokens the host reads (each prefill's first tokens, each dispatch's [steps, B]) are replicated by
  the engine's pinned output shardings, so `np.asarray` on the leader reads its local copy.
- a LoRA adapter is loaded by path on every process (the directory must be readable by all: a
  shared data dir, or the same files on each host); the processes then agree (`process_allgather`
  of a flag) and if any failed, the leader unloads it everywhere and the load fails.

Failure: when a follower dies its connections close, so the leader's next broadcast fails at once
(gloo: "Connection reset by peer"; tests/test_multihost.py kills one), as does a dispatch whose
programs span it: the `LeaderEngine` raises `FollowerLost`, and every later call fails at once with
the same error. The scheduler fails the requests involved; when its fresh `init_state` fails too its
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
from gemma_jax.engine.engine import Engine
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
    """An `Engine` on process 0 that broadcasts each call to the followers before making it.

    Same interface as `Engine` (whatever it does not override it reads from the engine). One lock
    keeps broadcast and call together, so the followers see calls in the leader's order even when an
    HTTP thread loads an adapter while the device thread dispatches.
    """

    def __init__(self, engine: Engine):
        if not is_leader():
            raise RuntimeError("LeaderEngine runs on process 0; other processes run follow(engine)")
        self.engine = engine
        self._lock = threading.RLock()
        self._prefixes = 0  # prefill sequence number: names a prefix for the followers' insert
        self._stopped = False
        self._lost: BaseException | None = None  # the error that lost a follower; every later call fails

    def __getattr__(self, name):  # everything host-side: limits, buckets, planning, introspection
        return getattr(self.engine, name)

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

    def init_state(self):
        with self._lock:
            self._send("init_state")
            return self.engine.init_state()

    def prefill_prompts(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
                        limits: Sequence[int], adapter_ids: Sequence[int] | None = None,
                        rng: np.random.Generator | None = None):
        rng = rng if rng is not None else np.random.default_rng()
        seed = int(rng.integers(0, 2**62))
        prompts = [[int(t) for t in p] for p in prompts]
        limits = [int(n) for n in limits]
        ids = None if adapter_ids is None else [int(a) for a in adapter_ids]
        with self._lock:
            self._prefixes += 1
            self._send("prefill", id=self._prefixes, prompts=prompts, sampling=[_sampling_to_json(s) for s in sampling],
                       limits=limits, adapter_ids=ids, seed=seed)
            prefix = self.engine.prefill_prompts(prompts, sampling, limits, ids, rng=np.random.default_rng(seed))
            return _Tagged(prefix, self._prefixes)

    def insert(self, prefix, state, slots):
        tag = prefix.id if isinstance(prefix, _Tagged) else None
        if tag is None:
            raise TypeError("LeaderEngine.insert takes a prefix from its own prefill_prompts")
        slots = [int(s) for s in np.asarray(slots).tolist()]
        with self._lock:
            self._send("insert", id=tag, slots=slots)
            return self.engine.insert(prefix.prefix, state, slots)

    def generate(self, state, live: Sequence[int] | None = None):
        live = None if live is None else [int(s) for s in live]
        with self._lock:
            self._send("generate", live=live)
            return self.engine.generate(state, live)

    def release(self, state, slots: Sequence[int]):
        slots = [int(s) for s in slots]
        with self._lock:
            self._send("release", slots=slots)
            return self.engine.release(state, slots)

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


@dataclasses.dataclass
class _Tagged:
    """A leader's Prefix with its prefill sequence number (reads fall through to the Prefix)."""

    prefix: object
    id: int

    def __getattr__(self, name):
        return getattr(self.prefix, name)


# -- the followers ----------------------------------------------------------------------------------
def follow(engine: Engine) -> int:
    """A follower's loop: make every engine call the leader broadcasts, until it says stop.
    Returns how many commands it ran. An engine call that fails here fails on the leader too (same
    programs, same inputs); it is logged and the loop goes on (the leader then starts a fresh state)."""
    state, prefixes, n = None, {}, 0
    while True:
        cmd = json.loads(_broadcast(None))
        op, n = cmd["op"], n + 1
        if op == STOP:
            return n
        try:
            if op == "init_state":
                state = engine.init_state()
                prefixes.clear()
            elif op == "prefill":
                sampling = [_sampling_from_json(s) for s in cmd["sampling"]]
                prefixes[cmd["id"]] = engine.prefill_prompts(cmd["prompts"], sampling, cmd["limits"],
                                                             cmd["adapter_ids"],
                                                             rng=np.random.default_rng(cmd["seed"]))
            elif op == "insert":
                state = engine.insert(prefixes.pop(cmd["id"]), state, cmd["slots"])
            elif op == "generate":
                state, _ = engine.generate(state, cmd["live"])
            elif op == "release":
                state = engine.release(state, cmd["slots"])
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
