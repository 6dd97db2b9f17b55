"""The host side of the engine: one thread owns the device, requests come and go between dispatches.

    Scheduler(engine, tokenizer).start(); handle = scheduler.submit(Request(...))
    for event in handle: ...          # StreamEvents of whole UTF-8 characters
    handle.next(timeout)              # or one at a time: the next event, None at the end
    handle.result(timeout)            # or wait for the Completion; handle.cancel() to stop early

Continuous batching over a step engine (`api.StepEngine`: `paged.PagedEngine`, or its multi-host
`LeaderEngine`): before every step, cancelled requests are dropped and queued requests start, in
order, while the engine has a free row and pages for their prompts (`can_add`); a request that must
wait for pages waits in the queue, never failing later (the engine preempts and restarts a sequence
when its pool runs short). Each step is one dispatch; while a request waits it runs one step (so
the request starts at the next), otherwise up to the engine's `decode_steps`. The engine says which
sequences finished and why (a stop token, their length); the scheduler takes that as given.

The device thread only moves token ids: each request's handle turns them into text itself
(`IncrementalDecoder`, in whichever thread consumes the handle), so detokenizing never delays the
device. A request the engine cannot serve as asked (a sampling parameter no row can hold, a token
id outside the vocabulary) is refused by `submit` with `InvalidRequest`, and checked again as it is
admitted: there it fails alone. A request the engine refuses to start (`add` raises) fails alone and
its neighbours are admitted; an error while decoding a request's text fails that request alone
with `RequestFailed`; a failure of a whole dispatch fails the requests in it, and the loop goes on
with a fresh cache (`engine.reset()`). Every failed request is logged at WARNING with its reason. `stats()`
counts each request once, as what it ended as (completed, cancelled or failed), even when its text
fails to decode after the device finished with it. If the
device thread itself dies (say a fresh cache cannot be made), every request it held fails and
`submit` refuses new ones with RequestFailed: nothing waits forever on a thread that is gone.

Faults, for tests only: `Scheduler(fault=f)` calls `f("prefill")` where a request is about to start
(join the engine) and `f("generate")` where a step is about to be dispatched; whatever `f` raises there is
what a failing device would raise (sleeping there is a slow device). Without `fault=`, the
`GEMMA_JAX_TEST_FAULT` environment variable (`fault_from_env`) gives a real server process the same
hook: a trigger file that a test writes when it wants the next dispatch to fail.

Token accounting: `completion_tokens` counts every drawn token, a final stop token included (as TGI
counts `generated_tokens`); the stop token is neither in `token_ids` nor in the text.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import sys
import threading
import time
from typing import Callable, Iterator

from gemma_jax.engine.api import (
    Completion, InvalidRequest, QueueFull, Request, RequestFailed, StepEngine, StreamEvent,
)
from gemma_jax.sampling import check_params
from gemma_jax.tokenizer import IncrementalDecoder

log = logging.getLogger("gemma_jax.scheduler")

_TOKENS, _DONE, _ERROR = "tokens", "done", "error"
FAULT_ENV = "GEMMA_JAX_TEST_FAULT"
FAULT_STAGES = ("prefill", "generate")
_STAT = {"completed": "requests_completed", "cancelled": "requests_cancelled", "failed": "requests_failed"}


class Handle:
    """A request's stream (the api.RequestHandle protocol).

    The device thread fills it with token ids (`push`, `finish`, `fail`); whoever consumes it
    (`next`, iteration or `result`, one consumer at a time) turns them into text. The request's
    outcome ("completed", "cancelled" or "failed") is settled under the handle's own lock and reported
    to `on_outcome(previous, outcome)`: if the text fails to decode after the device finished, the
    consumer turns "completed" into "failed", so every request is counted once, as what it ended as.
    """

    def __init__(self, request: Request, tokenizer, request_id: int, *, on_cancel: Callable[[], None],
                 on_outcome: Callable[[str | None, str], None]):
        self.request = request
        self.id = request_id
        self.cancelled = threading.Event()
        self._on_cancel, self._on_outcome = on_cancel, on_outcome
        self._items: queue.SimpleQueue = queue.SimpleQueue()  # (kind, payload) from the device thread
        self._outcome_lock = threading.Lock()
        self._outcome: str | None = None
        # The consumer's state, guarded by `_consumer` (one consumer at a time):
        self._consumer = threading.Lock()
        self._decoder = IncrementalDecoder(tokenizer)
        self._ids: list[int] = []  # generated ids, stop token excluded
        self._pending: list[int] = []  # ids whose text is not yet emitted
        self._text: list[str] = []
        self._completion: Completion | None = None
        self._error: RequestFailed | None = None

    # -- the device thread's side ---------------------------------------------------------------
    def push(self, ids: list[int]) -> None:
        """Newly drawn ids (stop token excluded)."""
        self._items.put((_TOKENS, ids))

    def finish(self, reason: str, completion_tokens: int) -> None:
        """The device is done with the request: "stop", "length" or "cancelled"."""
        self._settle("cancelled" if reason == "cancelled" else "completed")
        self._items.put((_DONE, (reason, completion_tokens)))

    def fail(self, error: BaseException) -> None:
        """The request failed on the device side (its prefill, its dispatch, the scheduler stopped)."""
        self._settle("failed")
        self._items.put((_ERROR, error))

    def _settle(self, outcome: str) -> None:
        """Record the outcome once; only "failed" may replace an earlier one (see the class docstring)."""
        with self._outcome_lock:
            previous = self._outcome
            if previous == "failed" or (previous is not None and outcome != "failed"):
                return
            self._outcome = outcome
            self._on_outcome(previous, outcome)

    # -- the consumer's side --------------------------------------------------------------------
    def next(self, timeout: float | None = None) -> StreamEvent | None:
        """The next piece of text, None once the request finished. Raises TimeoutError if nothing
        arrives within `timeout` seconds (the request goes on), RequestFailed if it failed."""
        with self._consumer:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._error is not None:
                    raise self._error
                if self._completion is not None:
                    return None
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    kind, payload = self._items.get(timeout=wait)
                except queue.Empty:
                    raise TimeoutError(f"request {self.id}: nothing within {timeout} s") from None
                if kind == _ERROR:
                    if isinstance(payload, InvalidRequest):  # the request's own fault: said as is (5006)
                        self._error = payload
                        raise self._error
                    self._error = RequestFailed(f"request {self.id} failed: {payload!r}")
                    raise self._error from payload
                try:
                    event = self._apply(kind, payload)
                except Exception as err:  # e.g. the tokenizer failed on this request's ids
                    self._error = RequestFailed(f"request {self.id} failed: {err!r}")
                    self._settle("failed")
                    self.cancel()  # stop generating for a stream nobody can read
                    raise self._error from err
                if event is not None:
                    return event

    def _apply(self, kind: str, payload) -> StreamEvent | None:
        if kind == _TOKENS:
            pieces = []
            for token in payload:
                self._ids.append(token)
                self._pending.append(token)
                pieces.append(self._decoder.push(token))
            return self._emit("".join(pieces))
        reason, completion_tokens = payload
        event = self._emit(self._decoder.flush())
        self._completion = Completion(
            text="".join(self._text), token_ids=tuple(self._ids), prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=completion_tokens, finish_reason=reason)
        return event

    def _emit(self, text: str) -> StreamEvent | None:
        if not text:
            return None
        self._text.append(text)
        event = StreamEvent(text=text, token_ids=tuple(self._pending))
        self._pending = []
        return event

    def __iter__(self) -> Iterator[StreamEvent]:
        while (event := self.next(None)) is not None:
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        """The whole completion (what the stream has not consumed yet is consumed here)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.next(None if deadline is None else max(0.0, deadline - time.monotonic())) is not None:
            pass
        with self._consumer:
            return self._completion

    def cancel(self) -> None:
        """Stop generating: the slot frees before the next dispatch; the result is "cancelled"."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel()


@dataclasses.dataclass
class _Running:
    """Host bookkeeping of one request the engine is running."""

    handle: Handle
    seq: int  # the engine's sequence id
    drawn: int = 0  # tokens drawn so far (a stop token included)


@dataclasses.dataclass
class _Queued:
    handle: Handle
    limit: int
    adapter_id: int


class InjectedFault(RuntimeError):
    """What the test-only fault hook raises in place of a device failure."""


def fault_from_env(environ=os.environ) -> Callable[[str], None] | None:
    """The test-only fault hook of a real server process, or None when `GEMMA_JAX_TEST_FAULT` is unset.

    `GEMMA_JAX_TEST_FAULT=<path>` names a trigger file, looked at (only while the variable is set)
    each time the device thread reaches a stage. A file holding one word, a stage ("prefill" or
    "generate"), makes the next such stage raise InjectedFault, once: the device thread removes
    the file as it fires. "<stage> <seconds>" instead sleeps at each such stage for as long as the
    file exists (a slow device, for deadline tests); "<stage> hold" waits at the stage until the file
    is removed (requests queue meanwhile, to be admitted together). Write the file atomically
    (write, then rename).
    """
    path = environ.get(FAULT_ENV)
    if not path:
        return None

    def fault(stage: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                words = f.read().split()
        except OSError:  # no trigger now
            return
        if not words or words[0] != stage:
            return
        if words[1:] == ["hold"]:
            while os.path.exists(path):
                time.sleep(0.01)
            return
        if len(words) > 1:
            time.sleep(float(words[1]))
            return
        try:
            os.remove(path)
        except FileNotFoundError:  # someone else consumed it
            return
        raise InjectedFault(f"injected fault in {stage} (test hook {FAULT_ENV})")

    return fault


class Scheduler:
    """Owns the engine's device from one thread; see the module docstring."""

    def __init__(self, engine: StepEngine, tokenizer, *, max_queue: int = 256, seed: int | None = None,
                 fault: Callable[[str], None] | None = None):
        """fault: the test-only hook (module docstring); None: `fault_from_env()`, normally nothing.
        seed: accepted for compatibility; a request's unseeded key is drawn by the engine."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = int(max_queue)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._running: dict[int, _Running] = {}  # engine sequence id -> request
        self._started = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._stats = collections.Counter()
        self._fault = fault if fault is not None else fault_from_env()
        self._dead: BaseException | None = None  # why the device thread died, if it did

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        with self._cond:
            if self._started:
                return self
            self._started = True
            self._dead = None
        self._thread = threading.Thread(target=self._run, name="gemma-jax-device", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the device thread; requests still queued or running fail with RequestFailed."""
        with self._cond:
            self._started = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            pending = [q.handle for q in self._queue] + [r.handle for r in self._running.values()]
            self._queue.clear()
            running, self._running = list(self._running), {}
        for seq in running:
            self.engine.cancel(seq)
        for handle in pending:
            handle.fail(RequestFailed("the scheduler stopped"))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self, prompt_tokens: int, max_tokens: int | None = None) -> int:
        """The engine's limits check (`check`: InputTooLong, ValueError); returns how many tokens
        the request may draw. max_tokens None: what the context window leaves (at least 1)."""
        if max_tokens is None:
            return self.engine.check(prompt_tokens, sys.maxsize, clip=True)
        return self.engine.check(prompt_tokens, max_tokens)

    def submit(self, request: Request) -> Handle:
        """Queue a request: the one place a request's limits, sampling, token ids and adapter are
        checked (max_tokens None: what the context window leaves). Raises InputTooLong,
        UnknownAdapter, QueueFull, InvalidRequest, ValueError (max_tokens < 1) at once."""
        limit = self.check(len(request.prompt_ids), request.max_tokens)
        reason = self._invalid(request)
        if reason is not None:
            raise InvalidRequest(reason)
        adapter_id = 0 if request.adapter is None else self.engine.adapter_id(request.adapter)
        handle = Handle(request, self.tokenizer, next(self._ids), on_cancel=self._wake, on_outcome=self._counted)
        with self._cond:
            if self._dead is not None:
                raise RequestFailed(f"the device thread died: {self._dead!r}")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._queue.append(_Queued(handle, limit, adapter_id))
            self._stats["requests_submitted"] += 1
            self._cond.notify_all()
        return handle

    def stats(self) -> dict:
        """Requests by outcome, queue, running sequences, compiles, and the engine's own counters
        (`PagedEngine.stats`: pages, prefix-cache hits / misses / evictions, preemptions)."""
        with self._cond:
            out = dict(self._stats)
            out.update(queue_depth=len(self._queue), active_slots=len(self._running), slots=self.engine.max_seqs,
                       max_queue=self.max_queue, running=self._started and self._dead is None,
                       compiles=sum(self.engine.compile_counts().values()))
        try:
            out.update({k: v for k, v in self.engine.stats().items() if k != "running"})
        except Exception:  # noqa: BLE001 - stats never fail because the engine is being reset
            pass
        for key in ("tokens_generated", "requests_completed", "requests_failed", "requests_cancelled",
                    "dispatches", "prefill_batches", "dispatch_failures", "prefill_failures"):
            out.setdefault(key, 0)
        return out

    # -- internals --------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._stats[key] += n

    def _counted(self, previous: str | None, outcome: str) -> None:
        """A handle settled its outcome (see Handle): count it, uncounting what it was before."""
        with self._cond:
            if previous is not None:
                self._stats[_STAT[previous]] -= 1
            self._stats[_STAT[outcome]] += 1

    def _run(self) -> None:
        """The device thread: `_loop`, and if it ever raises, fail everything rather than hang."""
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - the thread is gone: say so to every waiter
            log.exception("the scheduler's device thread died")
            with self._cond:
                self._dead = err
                pending = [q.handle for q in self._queue] + [r.handle for r in self._running.values()]
                self._queue.clear()
                self._running = {}
            for handle in pending:
                handle.fail(RequestFailed(f"the device thread died: {err!r}"))

    def _fault_point(self, stage: str) -> None:
        if self._fault is not None:
            self._fault(stage)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while self._started and not self._queue and not self._running:
                    self._cond.wait()
                if not self._started:
                    return
            try:
                self._cancel_running()
                self._admit()
                if not self._running:
                    continue
                self._fault_point("generate")
                with self._cond:
                    waiting = bool(self._queue)
                events = engine.step(steps=1 if waiting else None)  # one step when a request waits
                self._count("dispatches")
                self._deliver(events)
            except Exception as err:  # a whole step failed: fail its requests, start afresh
                with self._cond:
                    owners, self._running = list(self._running.values()), {}
                log.warning("a dispatch failed (%r): failing its %d request(s)", err, len(owners))
                self._count("dispatch_failures")
                for r in owners:
                    r.handle.fail(err)
                engine.reset()  # if even this fails, `_run` fails everything

    def _cancel_running(self) -> None:
        for seq, r in list(self._running.items()):
            if r.handle.cancelled.is_set():
                self.engine.cancel(seq)
                self._finish(r, "cancelled")

    def _next_queued(self) -> _Queued | None:
        """The queue's head, taken, if the engine can start it now (cancelled ones are finished on
        the way); None when the queue is empty or the head must wait for rows or pages."""
        cancelled, taken = [], None
        with self._cond:
            while self._queue and self._queue[0].handle.cancelled.is_set():
                cancelled.append(self._queue.popleft().handle)
            if self._queue and self.engine.can_add(len(self._queue[0].handle.request.prompt_ids)):
                taken = self._queue.popleft()
        for handle in cancelled:  # outside the lock: a handle reports its outcome under it
            handle.finish("cancelled", 0)
        return taken

    def _admit(self) -> None:
        """Start queued requests, in order, while the engine has a free row and pages for them.

        Isolation: a request that cannot start (invalid, or the engine refuses it) fails alone;
        the others are admitted."""
        admitted = 0
        while (q := self._next_queued()) is not None:
            try:
                self._fault_point("prefill")
                if not self._valid(q):
                    continue
                request = q.handle.request
                seq = self.engine.add(request.prompt_ids, q.limit, request.sampling, q.adapter_id)
            except Exception as err:  # noqa: BLE001 - this request alone
                self._count("prefill_failures")
                self._fail(q.handle, err)
                continue
            with self._cond:
                self._running[seq] = _Running(q.handle, seq)
            admitted += 1
        if admitted:
            self._count("prefill_batches")
            self._count("requests_admitted", admitted)

    def _invalid(self, request: Request) -> str | None:
        """Why the engine cannot serve `request` as asked (its token ids, its sampling), or None."""
        vocab = self.engine.config.vocab_size
        try:
            if not all(0 <= int(i) < vocab for i in request.prompt_ids):
                return f"prompt token ids must lie in [0, {vocab})"
            check_params(request.sampling)
        except (ValueError, TypeError, OverflowError) as err:
            return str(err) or type(err).__name__
        return None

    def _valid(self, q: _Queued) -> bool:
        """Checked again at admission: an invalid request fails alone (InvalidRequest), never its neighbours."""
        reason = self._invalid(q.handle.request)
        if reason is None:
            return True
        self._fail(q.handle, InvalidRequest(reason))
        return False

    def _fail(self, handle: Handle, err: BaseException) -> None:
        log.warning("request %d failed: %s", handle.id, err if isinstance(err, InvalidRequest) else repr(err))
        handle.fail(err)

    def _deliver(self, events) -> None:
        """Hand each sequence's drawn tokens to its request; the engine says which finished and why
        (a "stop" finish's last token is the stop token: counted, not shown)."""
        for event in events:
            r = self._running.get(event.seq)
            if r is None:
                continue
            keep = event.tokens[:-1] if event.finish == "stop" else event.tokens
            r.drawn += len(event.tokens)
            self._count("tokens_generated", len(event.tokens))
            if keep:
                r.handle.push(list(keep))
            if event.finish is not None:
                self._finish(r, event.finish)

    def _finish(self, r: _Running, reason: str) -> None:
        with self._cond:
            self._running.pop(r.seq, None)
        r.handle.finish(reason, r.drawn)
