"""Server-sent events in Workers AI's format.

    data: {"response":"Once","p":"abcdefgh"}

    data: {"response":"","usage":{"prompt_tokens":..,"completion_tokens":..,"total_tokens":..}}

    data: [DONE]

`p` is Cloudflare's random-length padding, which hides the length of each token from someone who
can only see encrypted record sizes; clients ignore it. It is on by default and can be switched off.
Keep-alive comments (`: keep-alive`) are sent every heartbeat while a request waits (in the queue,
or between tokens), which SSE clients ignore; the response head goes out with the first of them.
An error after the stream has begun becomes one last event, `{"response":"","errors":[...]}`, and
the stream ends without `[DONE]`, so a client can tell a complete answer from a cut one.

The generators here are handed straight to the WSGI server (no buffering in between); when the
client goes away, the server closes the generator and `finally` cancels the generation.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gemma_jax.engine.api import StreamEvent
from serving import errors
from serving.generation import Run, usage

log = logging.getLogger("serving")
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
_PAD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def padding() -> str:
    """A random-length (0..63) padding string."""
    n = secrets.randbelow(64)
    return "".join(_PAD_ALPHABET[i % len(_PAD_ALPHABET)] for i in range(n))


def event(obj: dict[str, Any], pad: bool = False) -> bytes:
    if pad:
        obj = {**obj, "p": padding()}
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def first_then_rest(run: Run) -> Iterator[StreamEvent | None]:
    """Wait for the first item before anything is sent: a text event, the end, or the first
    keep-alive tick (`Run.heartbeat` seconds, 5 by default), whichever comes first. So errors found
    before generation starts (a failed prefill, an invalid request) still get their HTTP status,
    while a stream that waits in the queue gets its response head and `: keep-alive` comments every
    heartbeat instead of silence until its first token (a proxy's read timeout never cuts it).
    Returns an iterator that replays that first item. If waiting fails, the run is closed (its
    generation cancelled) before the error propagates."""
    items = run.items()
    try:
        head = list(itertools.islice(items, 1))  # raises ApiError here, before the response starts
    except BaseException:
        run.close()
        raise
    return _chain(head, items)


def _chain(head: Iterable, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def workers_ai_stream(run: Run, items: Iterator[StreamEvent | None], pad: bool) -> Iterator[bytes]:
    try:
        for item in items:
            if item is None:
                yield KEEPALIVE
            elif item.text:
                yield event({"response": item.text}, pad)
        assert run.completion is not None
        yield event({"response": "", "usage": usage(run.completion)}, pad)
        yield DONE
    except errors.ApiError as e:
        _log_late(e)
        yield event({"response": "", "errors": [{"code": e.code, "message": e.message}]}, pad)
    finally:
        run.close()


def generic_stream(run: Run, items: Iterator[StreamEvent | None],
                   on_event: Callable[[StreamEvent], dict | None],
                   on_done: Callable[[Run], Iterable[dict]],
                   on_error: Callable[[errors.ApiError], dict],
                   prelude: Iterable[dict] = ()) -> Iterator[bytes]:
    """The same loop for other event shapes (OpenAI chunks)."""
    try:
        for obj in prelude:
            yield event(obj)
        for item in items:
            if item is None:
                yield KEEPALIVE
                continue
            obj = on_event(item)
            if obj is not None:
                yield event(obj)
        for obj in on_done(run):
            yield event(obj)
        yield DONE
    except errors.ApiError as e:
        _log_late(e)
        yield event(on_error(e))
    finally:
        run.close()


def _log_late(e: errors.ApiError) -> None:
    """A stream's error after its head went out (its status was 200): logged like any error answer."""
    if e.status != 499:  # the client went away: nobody to answer, not a failure
        log.warning("stream ended by an error: %d / %d %s", e.status, e.code, e.message)
