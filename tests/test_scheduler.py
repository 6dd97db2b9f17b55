"""The scheduler (continuous batching, streams, cancellation, failures, limits) on a tiny paged
engine, with a real sentencepiece tokenizer trained here and the greedy full-recompute reference."""

import threading
import time

import pytest

from engine_reference import naive_greedy, paged_alone, prompts_for, tiny_paged, trained_tokenizer
from gemma_jax.engine import scheduler as scheduler_lib
from gemma_jax.engine.api import (
    InputTooLong, InvalidRequest, QueueFull, Request, RequestFailed, SamplingParams, UnknownAdapter,
)
from gemma_jax.engine.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def setup():
    return tiny_paged("tiny_gemma3", warm=True)


class GatedEngine:
    """The real engine, but each step waits for the test to allow it; `calls` lists each step's
    (running sequences, steps asked for) as it was asked for."""

    def __init__(self, engine):
        self._engine = engine
        self.permits = threading.Semaphore(0)
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self, steps=None):
        self.calls.append((self._engine.running(), steps))
        assert self.permits.acquire(timeout=60), "the test never allowed this dispatch"
        return self._engine.step(steps)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_continuous_batching_gives_each_request_its_solo_tokens(setup, tokenizer):
    config, params, engine = setup
    lengths = [5, 8, 1, 12, 30, 17, 25, 5, 9, 20]
    max_tokens = [10, 20, 12, 3, 20, 25, 9, 40, 1, 15]
    prompts = prompts_for(lengths, seed=11)
    prompts[0] = prompts_for([5])[0]  # greedy draws the stop id as its 6th token
    sampling = [GREEDY] * 10
    sampling[2] = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=123, repetition_penalty=1.2)
    sampling[7] = SamplingParams(temperature=1.3, seed=9, frequency_penalty=0.5, presence_penalty=0.5)
    want = []
    for p, m, s in zip(prompts, max_tokens, sampling):
        alone = paged_alone(engine, p, m, s)
        if s is GREEDY:
            assert alone == naive_greedy(config, params, [p], m)[0]
        want.append(alone)

    scheduler = Scheduler(engine, tokenizer, max_queue=16)
    handles = [scheduler.submit(Request(tuple(p), max_tokens=m, sampling=s))
               for p, m, s in zip(prompts, max_tokens, sampling)]
    with scheduler:  # started with all ten queued: four start together, the others as rows free
        streamed = [list(h) for h in handles[:3]]  # three consumed as streams, the rest by result()
        results = [h.result(timeout=120) for h in handles]
        stats = scheduler.stats()

    for r, w, m in zip(results, want, max_tokens):
        stopped = w[-1] in config.stop_ids
        assert r.token_ids == tuple(w[:-1] if stopped else w)
        assert r.finish_reason == ("stop" if stopped else "length") and r.completion_tokens == len(w)
        assert r.text == tokenizer.decode(r.token_ids)
    for events, r in zip(streamed, results):
        # Whole characters only: a piece that ended inside a multi-byte character would hold U+FFFD
        # where the whole decode (r.text, checked above) has that character, and the join would differ.
        assert "".join(e.text for e in events) == r.text
        assert sum((e.token_ids for e in events), ()) == r.token_ids[: sum(len(e.token_ids) for e in events)]
    assert any(r.finish_reason == "stop" for r in results)
    assert stats["tokens_generated"] == sum(len(w) for w in want)
    assert stats["requests_completed"] == 10 and stats["active_slots"] == 0 and stats["queue_depth"] == 0
    assert stats["requests_admitted"] == 10 and stats["prefill_batches"] <= 7  # the first four together


def test_cancel_frees_the_slot_for_a_waiting_request(setup, tokenizer):
    config, params, engine = setup
    gated = GatedEngine(engine)
    # Four prompts that do not stop at their first token (a stop at prefill would free a slot early).
    candidates = prompts_for([8] * 12, seed=12)
    firsts = naive_greedy(config, params, candidates, 1)
    prompts = [p for p, f in zip(candidates, firsts) if f[0] not in config.stop_ids][:4]
    prompts += prompts_for([10], seed=13)
    max_tokens = [40, 40, 40, 40, 6]
    scheduler = Scheduler(gated, tokenizer).start()
    try:
        handles = [scheduler.submit(Request(tuple(p), max_tokens=m, sampling=GREEDY))
                   for p, m in zip(prompts, max_tokens)]
        # All four rows taken, the fifth request waits; the device thread waits for step 1.
        wait_for(lambda: scheduler.stats()["active_slots"] == 4 and len(gated.calls) == 1)
        assert scheduler.stats()["queue_depth"] == 1
        handles[0].cancel()
        gated.permits.release()  # dispatch 1; before dispatch 2 the cancelled slot goes to request 5
        wait_for(lambda: scheduler.stats()["queue_depth"] == 0 and scheduler.stats()["active_slots"] == 4)
        cancelled = handles[0].result(timeout=60)
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 1
        for _ in range(100):
            gated.permits.release()
        results = [h.result(timeout=120) for h in handles[1:]]
    finally:
        for _ in range(100):
            gated.permits.release()
        scheduler.stop()
    want = naive_greedy(config, params, prompts[1:], 40)
    want[-1] = naive_greedy(config, params, prompts[4:], 6)[0]
    for r, w in zip(results, want):
        assert r.completion_tokens == len(w) and r.token_ids == tuple(t for t in w if t not in config.stop_ids)
    assert scheduler.stats()["requests_cancelled"] == 1


def test_a_waiting_request_gets_in_at_the_next_step(setup, tokenizer):
    """While a request waits in the queue the scheduler asks for one step per dispatch (so it starts
    at the next), and for the engine's multi-step dispatch otherwise."""
    config, params, engine = setup
    gated = GatedEngine(engine)
    candidates = prompts_for([9] * 12, seed=31)
    firsts = naive_greedy(config, params, candidates, 1)
    prompts = [p for p, f in zip(candidates, firsts) if f[0] not in config.stop_ids][:5]
    want = [paged_alone(engine, p, 12) for p in prompts]
    scheduler = Scheduler(gated, tokenizer).start()
    try:
        handles = [scheduler.submit(Request(tuple(p), max_tokens=12, sampling=GREEDY)) for p in prompts]
        wait_for(lambda: len(gated.calls) == 1)
        assert gated.calls[0] == (4, 1)  # four rows, the fifth waits: one step
        for _ in range(200):
            gated.permits.release()
        results = [h.result(timeout=60) for h in handles]
    finally:
        for _ in range(200):
            gated.permits.release()
        scheduler.stop()
    assert any(steps is None for _, steps in gated.calls)  # nothing waiting: the engine's decode steps
    for r, w in zip(results, want):
        assert r.token_ids == tuple(t for t in w if t not in config.stop_ids) and r.completion_tokens == len(w)


def test_the_engine_says_why_a_request_finished(setup, tokenizer):
    """The scheduler takes the engine's finish reasons as given: it does not count tokens itself."""
    config, params, engine = setup

    class Cut:
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def step(self, steps=None):
            events = self._engine.step(steps)
            for e in events:
                if e.finish is None:  # the engine says "length" after the first step, whatever the limit
                    self._engine.cancel(e.seq)
                    e.finish = "length"
            return events

    prompt = prompts_for([7], seed=3)[0]
    with Scheduler(Cut(engine), tokenizer) as scheduler:
        result = scheduler.submit(Request(tuple(prompt), max_tokens=30, sampling=GREEDY)).result(60)
    first = paged_alone(engine, prompt, 30)[:len(result.token_ids)]
    assert result.finish_reason == "length" and 1 <= result.completion_tokens <= 4
    assert list(result.token_ids) == first


def test_a_failing_request_fails_alone(setup, tokenizer):
    config, params, engine = setup
    candidates = prompts_for([6] * 12, seed=13)
    firsts = [naive_greedy(config, params, [p], 1)[0][0] for p in candidates]
    # The poisoned prompt: its first token is drawn by no other prompt we send (in 8 greedy tokens).
    others = candidates[:3]
    refs = naive_greedy(config, params, others, 8)
    poisoned = next(p for p, f in zip(candidates[3:], firsts[3:])
                    if f not in config.stop_ids and all(f not in r for r in refs))
    poison = naive_greedy(config, params, [poisoned], 1)[0][0]

    class PoisonedTokenizer:
        sp = tokenizer.sp  # the incremental decoder asks sentencepiece which ids are bytes

        def decode(self, ids):
            if poison in list(ids):
                raise RuntimeError("cannot decode")
            return tokenizer.decode(ids)

    with Scheduler(engine, PoisonedTokenizer()) as scheduler:
        with pytest.raises(InvalidRequest, match=r"prompt token ids must lie in \[0, "):  # refused at once
            scheduler.submit(Request((2, 5, config.vocab_size + 7), max_tokens=8, sampling=GREEDY))
        bad_text = scheduler.submit(Request(tuple(poisoned), max_tokens=30, sampling=GREEDY))
        good = [scheduler.submit(Request(tuple(p), max_tokens=8, sampling=GREEDY)) for p in others]
        with pytest.raises(RequestFailed):
            list(bad_text)
        with pytest.raises(RequestFailed):  # and it stays failed
            bad_text.result(timeout=60)
        for h, r in zip(good, refs):
            assert h.result(timeout=60).completion_tokens == len(r)
        wait_for(lambda: scheduler.stats()["active_slots"] == 0)  # the failed stream's slot was freed
        after = scheduler.submit(Request(tuple(others[0]), max_tokens=8, sampling=GREEDY))
        assert after.result(timeout=60).completion_tokens == len(refs[0])
        stats = scheduler.stats()
        assert stats["requests_failed"] == 1 and stats["requests_cancelled"] == 0
        assert stats["requests_completed"] == 4


def test_a_text_failure_after_the_device_finished_counts_once(setup, tokenizer):
    config, params, engine = setup
    prompt = tuple(prompts_for([6], seed=21)[0])

    class BrokenTokenizer:
        sp = tokenizer.sp

        def decode(self, ids):
            raise RuntimeError("cannot decode")

    with Scheduler(engine, BrokenTokenizer()) as scheduler:
        handle = scheduler.submit(Request(prompt, max_tokens=5, sampling=GREEDY))
        # The device thread never decodes: it finishes the request and counts it completed...
        wait_for(lambda: scheduler.stats()["requests_completed"] == 1)
        assert scheduler.stats()["active_slots"] == 0
        # ...then its consumer fails on the text: the same request now counts as failed instead.
        with pytest.raises(RequestFailed, match="cannot decode"):
            handle.result(timeout=60)
        with pytest.raises(RequestFailed):  # it stays failed, and is not counted again
            handle.next(0)
        stats = scheduler.stats()
    assert stats["requests_submitted"] == 1 and stats["requests_failed"] == 1
    assert stats["requests_completed"] == 0 and stats["requests_cancelled"] == 0


def test_next_waits_at_most_its_timeout_and_ends_with_none(setup, tokenizer):
    config, params, engine = setup
    prompt = prompts_for([7], seed=22)[0]
    want = naive_greedy(config, params, [prompt], 6)[0]
    scheduler = Scheduler(engine, tokenizer)  # not started yet: nothing can arrive
    handle = scheduler.submit(Request(tuple(prompt), max_tokens=6, sampling=GREEDY))
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.next(0.2)
    assert 0.2 <= time.monotonic() - start < 5
    with scheduler:
        events = []
        while (event := handle.next(60)) is not None:
            events.append(event)
        assert handle.next(0) is None and handle.next(None) is None  # finished stays finished
        result = handle.result(timeout=0)
    assert result.token_ids == tuple(t for t in want if t not in config.stop_ids)
    assert "".join(e.text for e in events) == result.text == tokenizer.decode(result.token_ids)
    assert sum((e.token_ids for e in events), ()) == result.token_ids


def test_check_is_the_engines_and_none_means_the_rest_of_the_context(setup, tokenizer):
    config, params, engine = setup
    scheduler = Scheduler(engine, tokenizer)
    assert (engine.max_input, engine.max_total) == (32, 64)
    assert scheduler.check(20, 44) == 44 == engine.check(20, 44)
    assert scheduler.check(20, None) == 44  # 64 - 20
    for prompt_tokens, max_tokens in ((33, 1), (20, 45), (33, None)):
        with pytest.raises(InputTooLong):
            engine.check(prompt_tokens, max_tokens or 1)
        with pytest.raises(InputTooLong):
            scheduler.check(prompt_tokens, max_tokens)
    for prompt_tokens, max_tokens in ((0, 4), (4, 0), (4, -1)):
        with pytest.raises(ValueError):
            scheduler.check(prompt_tokens, max_tokens)


def test_queue_full_limits_adapters_and_stop(setup, tokenizer):
    config, params, engine = setup
    scheduler = Scheduler(engine, tokenizer, max_queue=2)  # not started: requests stay queued
    first = scheduler.submit(Request((2, 10, 11), max_tokens=4))
    second = scheduler.submit(Request((2, 12), max_tokens=4))
    with pytest.raises(QueueFull):
        scheduler.submit(Request((2, 13), max_tokens=4))
    assert scheduler.stats()["queue_depth"] == 2
    with pytest.raises(InputTooLong):
        scheduler.submit(Request(tuple(range(2, 35)), max_tokens=1))  # 33 > 32 input tokens
    with pytest.raises(InputTooLong):
        scheduler.submit(Request(tuple(range(2, 22)), max_tokens=45))  # 20 + 45 > 64 total
    with pytest.raises(UnknownAdapter):
        scheduler.submit(Request((2, 10), max_tokens=4, adapter="no-such-lora"))
    scheduler.stop()
    for h in (first, second):
        with pytest.raises(RequestFailed):
            h.result(timeout=10)
    assert scheduler.stats()["requests_failed"] == 2

    scheduler = Scheduler(engine, tokenizer)
    cancelled = scheduler.submit(Request((2, 10, 11), max_tokens=4))
    cancelled.cancel()  # cancelled while queued: never takes a slot
    done = scheduler.submit(Request((2, 10, 11), max_tokens=4, sampling=GREEDY))
    with scheduler:
        result = done.result(timeout=60)
        assert cancelled.result(timeout=60).finish_reason == "cancelled"
        stats = scheduler.stats()
    assert stats["requests_cancelled"] == 1 and stats["requests_completed"] == 1
    want = naive_greedy(config, params, [[2, 10, 11]], 4)[0]
    assert result.token_ids == tuple(t for t in want if t not in config.stop_ids)


class AddSpy:
    """The real engine; each `add` call's prompt is recorded, and adding `poison` raises as an engine
    that cannot start a request would."""

    def __init__(self, engine, poison=None):
        self._engine, self.poison, self.calls = engine, poison, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add(self, prompt, *args, **kw):
        self.calls.append(tuple(prompt))
        if self.poison is not None and tuple(self.poison) == self.calls[-1]:
            raise RuntimeError("device fault on the poisoned prompt")
        return self._engine.add(prompt, *args, **kw)


SEEDED = SamplingParams(temperature=0.9, top_k=20, seed=1234)


def _alone(engine, tokenizer, prompt, sampling, max_tokens=8) -> tuple[int, ...]:
    with Scheduler(engine, tokenizer) as scheduler:
        return scheduler.submit(Request(tuple(prompt), max_tokens=max_tokens, sampling=sampling)).result(60).token_ids


@pytest.mark.parametrize("bad", [
    SamplingParams(top_k=2**31), SamplingParams(top_k=-1), SamplingParams(temperature=float("nan")),
    SamplingParams(temperature=1e39), SamplingParams(top_p=float("inf")), SamplingParams(temperature=-1.0),
    SamplingParams(repetition_penalty=10**400), SamplingParams(seed=2**64), SamplingParams(seed=1.5),
    SamplingParams(top_k=True), SamplingParams(presence_penalty="1"),
], ids=lambda p: ",".join(f"{k}={v!r}" for k, v in vars(p).items() if v != getattr(SamplingParams(), k)))
def test_a_request_no_row_can_hold_fails_alone(setup, tokenizer, bad, monkeypatch):
    """Refused by submit (InvalidRequest, the server's 5006); and if it gets past submit, it fails
    alone at admission and the requests admitted with it get their solo tokens."""
    config, params, engine = setup
    good_prompts = prompts_for([5, 9, 7], seed=21)
    good_sampling = [GREEDY, SEEDED, GREEDY]
    solo = [_alone(engine, tokenizer, p, s) for p, s in zip(good_prompts, good_sampling)]
    spy = AddSpy(engine)
    scheduler = Scheduler(spy, tokenizer)
    with pytest.raises(InvalidRequest):
        scheduler.submit(Request((2, 7, 9), max_tokens=8, sampling=bad))
    with monkeypatch.context() as m:  # the edge let it through: submit skips the check this once
        m.setattr(scheduler_lib, "check_params", lambda p: None)
        handle = scheduler.submit(Request((2, 7, 9), max_tokens=8, sampling=bad))
    good = [scheduler.submit(Request(tuple(p), max_tokens=8, sampling=s)) for p, s in zip(good_prompts, good_sampling)]
    with scheduler:  # all four were queued before the device thread started: admitted together
        with pytest.raises(InvalidRequest) as e:
            handle.result(timeout=60)
        assert str(e.value).split(" must ")[0] in {k for k, v in vars(bad).items() if v != getattr(SamplingParams(), k)}
        assert [h.result(timeout=60).token_ids for h in good] == solo
    assert spy.calls == [tuple(p) for p in good_prompts]  # the three started, it never reached the engine
    assert scheduler.stats()["requests_failed"] == 1 and scheduler.stats()["requests_completed"] == 3


def test_a_request_the_engine_cannot_start_fails_alone(setup, tokenizer):
    config, params, engine = setup
    prompts = prompts_for([6, 11, 4, 8], seed=5)
    sampling = [GREEDY, SEEDED, GREEDY, GREEDY]
    solo = [_alone(engine, tokenizer, p, s) for p, s in zip(prompts, sampling)]
    spy = AddSpy(engine, poison=prompts[1])
    scheduler = Scheduler(spy, tokenizer)
    handles = [scheduler.submit(Request(tuple(p), max_tokens=8, sampling=s)) for p, s in zip(prompts, sampling)]
    with scheduler:
        with pytest.raises(RequestFailed, match="device fault on the poisoned prompt"):
            handles[1].result(timeout=60)
        for i in (0, 2, 3):
            assert handles[i].result(timeout=60).token_ids == solo[i]
    assert spy.calls == [tuple(p) for p in prompts]  # in queue order, the culprit among them
    stats = scheduler.stats()
    assert stats["prefill_failures"] == 1 and stats["requests_failed"] == 1 and stats["requests_completed"] == 3
