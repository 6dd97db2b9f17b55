"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

The adapter is chosen by `model`: the served model's name means the base model; a finetune's id or
name means that LoRA adapter (so an OpenAI SDK picks an adapter with no extra field). Streams follow
OpenAI's chunk shapes, with `stream_options.include_usage` adding the final usage chunk, then
`data: [DONE]`. `/v1/completions` sends the prompt verbatim after BOS (no chat template), as
completions APIs do; `/v1/chat/completions` applies Gemma's chat template. Errors use OpenAI's
`{"error": {"message", "type", "param", "code"}}` shape with the same HTTP statuses as Workers AI.

Accepted beyond OpenAI (as vLLM does): `top_k`, `repetition_penalty`. Not supported (400):
`n` > 1, `stop`, `logprobs`, `echo`, `suffix`, tools. Numbers follow the one rule every route
shares (`validation.NUMBERS`): Workers AI's ranges (temperature up to 5, top_p up to 2, top_k 1..50),
OpenAI's for what Workers AI lacks (frequency / presence penalties from -2, seeds up to 2**63 - 1).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify

from serving import errors, sse, validation
from serving.backend import GenerationInput, sampling_from
from serving.generation import Run, usage
from serving.http import read_json, start_generation, state

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          408: "timeout_error", 413: "invalid_request_error", 414: "invalid_request_error",
          417: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error"}


def error_body(e: errors.ApiError) -> dict[str, Any]:
    code = "model_not_found" if e.code == 5007 and e.status == 404 else str(e.code)
    return {"error": {"message": e.message, "type": _TYPES.get(e.status, "server_error"), "param": None,
                      "code": code}}


def _bad(message: str) -> errors.ApiError:
    return errors.bad_input(f"Error: {message}")


def _common(body: Any) -> tuple[str, str | None, dict]:
    """Checks shared by both routes; returns (model, lora, sampling body)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required")
    st = state()
    lora = None
    if not st.backend.serves(model):
        try:
            lora = st.backend.resolve_adapter(model)
        except Exception:
            raise errors.ApiError(404, 5007, f"The model '{model}' does not exist") from None
    validation.check_numbers(body)  # every numeric field, by the rule the run route uses too
    for key in ("stop", "suffix", "tools", "functions"):
        if body.get(key) not in (None, [], ""):
            raise _bad(f"'{key}' is not supported")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo") not in (None, False):
        raise _bad("logprobs and echo are not supported")
    for key in ("stream",):
        if not isinstance(body.get(key, False), bool):
            raise _bad(f"'{key}' must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object")
    seed = body.get("seed")
    sampling = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                         "frequency_penalty", "presence_penalty")}
    if seed is not None:
        sampling["seed"] = seed
    return model, lora, sampling


def _respond(run: Run, body: dict, model: str, kind: str) -> Response:
    created = int(time.time())
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choice: dict | None, **extra) -> dict:
        out = {"id": ident, "object": chunk_object, "created": created, "model": model,
               "choices": [] if choice is None else [{"index": 0, **choice}]}
        if include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def piece(text: str, finish=None) -> dict:
        if kind == "chat":
            return {"delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
        return {"text": text, "logprobs": None, "finish_reason": finish}

    if body.get("stream"):
        items = sse.first_then_rest(run)

        def on_done(r: Run):
            yield chunk(piece("", r.completion.finish_reason))
            if include_usage:
                yield chunk(None, usage=usage(r.completion))

        prelude = [chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None})] if kind == "chat" else []
        stream = sse.generic_stream(run, items, lambda ev: chunk(piece(ev.text)) if ev.text else None,
                                    on_done, error_body, prelude)
        return Response(stream, mimetype="text/event-stream", headers=sse.HEADERS)

    try:
        completion = run.wait()
    finally:
        run.close()
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                  "logprobs": None, "finish_reason": completion.finish_reason}
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None,
                  "finish_reason": completion.finish_reason}
    return jsonify({"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": created, "model": model, "choices": [choice], "usage": usage(completion)})


def _max_tokens(body: dict, default: int | None) -> int | None:
    """max_completion_tokens, else max_tokens (both checked integers: `_common`), else `default`."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    return default if value is None else int(value)


@blueprint.get("/models")
def list_models():
    st = state()
    created = int(time.time())
    base = st.backend.model_name
    data = [{"id": base, "object": "model", "created": created, "owned_by": "gemma-jax"}]
    for finetune_id, name in sorted(st.backend.adapters().items(), key=lambda kv: kv[1]):
        data.append({"id": name, "object": "model", "created": created, "owned_by": "gemma-jax",
                     "parent": base, "root": base, "finetune_id": finetune_id})
    return jsonify({"object": "list", "data": data})


@blueprint.post("/chat/completions")
def chat_completions():
    st = state()
    body = read_json(st.max_body_bytes)
    model, lora, sampling = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), (str, list)):
            raise _bad(f"messages[{i}].content must be a string or an array of text parts")
    gen = GenerationInput(messages=messages, max_tokens=_max_tokens(body, None),
                          sampling=sampling_from(sampling), lora=lora)
    return _respond(start_generation(gen), body, model, "chat")


@blueprint.post("/completions")
def completions():
    st = state()
    body = read_json(st.max_body_bytes)
    model, lora, sampling = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (one prompt per request)")
    gen = GenerationInput(prompt=prompt, raw=True, max_tokens=_max_tokens(body, 16),
                          sampling=sampling_from(sampling), lora=lora)
    return _respond(start_generation(gen), body, model, "completion")
