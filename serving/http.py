"""Helpers shared by the Workers AI and OpenAI routes: the app's state, bounded body reads,
turning a GenerationInput into a running generation."""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import current_app, request

from gemma_jax.engine.api import EngineError, UnknownAdapter
from serving import errors, validation
from serving.backend import Backend, GenerationInput
from serving.finetunes import FinetuneStore
from serving.generation import Run
from serving.metrics import Metrics

_READ_CHUNK = 64 * 1024


@dataclasses.dataclass
class ServerState:
    backend: Backend
    metrics: Metrics
    store: FinetuneStore
    api_token: str | None
    stream_padding: bool
    max_body_bytes: int
    max_upload_bytes: int
    request_timeout: float | None
    heartbeat: float
    protect_metrics: bool = False


def state() -> ServerState:
    return current_app.extensions["gemma_jax"]


def read_body(limit: int) -> bytes:
    """The request body, at most `limit` bytes (3006 beyond: Content-Length is checked before a byte is
    read, a chunked body is cut off at the limit), read without trusting the client: broken chunked
    framing (gunicorn's parser errors, or the body ending before its last chunk) is 400 / 5006, a body
    that stops arriving 408 / 3007; both close the connection."""
    from gunicorn.http.errors import ParseException  # noqa: PLC0415 - gunicorn's framing errors
    from werkzeug.exceptions import ClientDisconnected  # noqa: PLC0415

    length = request.content_length
    if length is not None and length > limit:
        raise errors.request_too_large(limit)
    stream = request.stream
    parts, size = [], 0
    try:
        while chunk := stream.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise errors.request_too_large(limit)
            parts.append(chunk)
    except (ParseException, OSError, ClientDisconnected) as e:  # broken framing, a timeout, EOF
        raise errors.from_body_read(e) from None
    return b"".join(parts)


def read_json(limit: int) -> Any:
    return validation.parse_json(read_body(limit))


def start_generation(gen: GenerationInput) -> Run:
    """Build, check and submit; every refusal becomes an ApiError with its status."""
    st = state()
    try:
        req = st.backend.make_request(gen)
        handle = st.backend.submit(req)
    except UnknownAdapter:
        raise unknown_adapter(gen.lora or "") from None
    except EngineError as e:
        raise errors.from_exception(e) from None
    except ValueError as e:  # BadRequest, or values the engine refuses (max_tokens < 1): the client's to fix
        raise errors.bad_input(f"Error: {e}") from None
    return Run(handle, st.metrics, timeout=st.request_timeout, heartbeat=st.heartbeat,
               prompt_tokens=len(req.prompt_ids))


def unknown_adapter(lora: str) -> errors.ApiError:
    """3039 if the finetune exists but is not complete yet, 3037 if there is no such finetune."""
    record = state().store.find(lora)
    if record is not None and not state().store.complete(record["id"]):
        return errors.finetune_missing_files(lora)
    return errors.finetune_not_found(lora)
