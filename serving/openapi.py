"""`GET /openapi.json`: an OpenAPI 3.1 document of every route the app serves.

The Workers AI run route's request body is the very JSON Schema the server validates with
(`validation.input_schema()`, Workers AI's own for gemma-7b-it); the OpenAI routes, which validate by
hand in serving/openai.py, are described here by schemas that admit what those checks admit (the fuzz
test sends bodies drawn from them and expects no 400). Responses are described by schemas a test
checks real answers against. The table `OPERATIONS` is keyed by Flask rule and method; a test
compares it with `app.url_map` both ways, so a route cannot be added without its description.
"""

from __future__ import annotations

import copy
from typing import Any

from serving import validation
from serving.adapter_files import CONFIG_NAME, WEIGHTS_NAME

OPENAPI_VERSION = "3.1.0"
ACCOUNT = "/client/v4/accounts/<account_id>/ai"
JSON = "application/json"
SSE = "text/event-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **rules) -> dict[str, Any]:
    return {"type": [kind, "null"], **rules}


_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_ERROR_ITEM = {"type": "object", "required": ["code", "message"],
               "properties": {"code": {"type": "integer"}, "message": {"type": "string", "pattern": "^AiError: "}}}
_FINETUNE = {"type": "object", "required": ["id", "name", "description", "model", "created_at", "modified_at"],
             "properties": {"id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                            "description": {"type": "string"}, "model": {"type": "string"},
                            "created_at": {"type": "string"}, "modified_at": {"type": "string"}}}


def _envelope(result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["result", "success", "errors", "messages"],
            "properties": {"result": result, "success": {"const": True}, "errors": {"type": "array", "maxItems": 0},
                           "messages": {"type": "array"}}}


_OPENAI_SAMPLING = {
    "model": {"type": "string", "minLength": 1,
              "description": "the served model's name, or a finetune's id or name (its LoRA adapter)"},
    **{name: _nullable("integer" if rule.integer else "number", minimum=rule.lo, maximum=rule.hi)
       for name, rule in validation.NUMBERS.items() if rule.lo is not None and name != "n"},  # the one rule
    "max_tokens": _nullable("integer", minimum=1),
    "max_completion_tokens": _nullable("integer", minimum=1),
    "n": {"enum": [None, 1], "description": "only one choice per request"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {"enum": [None, "", []], "description": "not supported"},
    "suffix": {"enum": [None, "", []], "description": "not supported"},
    "tools": {"enum": [None, "", []], "description": "not supported"},
    "functions": {"enum": [None, "", []], "description": "not supported"},
    "logprobs": {"enum": [None, False, 0], "description": "not supported"},
    "echo": {"enum": [None, False], "description": "not supported"},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "WorkersAiInput": validation.input_schema(),
    "Usage": _USAGE,
    "ErrorEnvelope": {
        "type": "object", "required": ["result", "success", "errors", "messages"],
        "properties": {"result": {"type": "object", "maxProperties": 0}, "success": {"const": False},
                       "errors": {"type": "array", "minItems": 1, "items": _ERROR_ITEM},
                       "messages": {"type": "array"}}},
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                 "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                "param": {"type": "null"}, "code": {"type": "string"}}}}},
    "RunResult": _envelope({"type": "object", "required": ["response", "usage"],
                            "properties": {"response": {"type": "string"}, "usage": _ref("Usage")}}),
    "Finetune": _FINETUNE,
    "FinetuneWithFiles": {"allOf": [_ref("Finetune"), {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"enum": [CONFIG_NAME, WEIGHTS_NAME]}}}}]},
    "FinetuneResult": _envelope(_ref("Finetune")),
    "FinetuneWithFilesResult": _envelope(_ref("FinetuneWithFiles")),
    "FinetuneList": _envelope({"type": "array", "items": _ref("Finetune")}),
    "CreateFinetune": {"type": "object", "required": ["model", "name"],
                       "properties": {"model": {"type": "string"},
                                      "name": {"type": "string", "minLength": 1, "maxLength": 128},
                                      "description": {"type": ["string", "null"], "maxLength": 4096}}},
    "UploadAsset": {"type": "object", "required": ["file_name", "file"],
                    "properties": {"file_name": {"enum": [CONFIG_NAME, WEIGHTS_NAME]},
                                   "file": {"type": "string", "contentMediaType": "application/octet-stream"}}},
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {**_OPENAI_SAMPLING, "messages": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["role", "content"],
                      "properties": {"role": {"enum": ["system", "user", "assistant", "model"]},
                                     "content": {"type": "string"}}}}}},
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"],
        "properties": {**_OPENAI_SAMPLING, "prompt": {
            "oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}}]}}},
    "ChatCompletion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {"object": {"const": "chat.completion"}, "usage": _ref("Usage"),
                       "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                           "type": "object", "required": ["index", "message", "finish_reason"],
                           "properties": {"message": {"type": "object", "required": ["role", "content"]}}}}}},
    "Completion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {"object": {"const": "text_completion"}, "usage": _ref("Usage"),
                       "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                           "type": "object", "required": ["index", "text", "finish_reason"]}}}},
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                      "type": "object", "required": ["id", "object", "created", "owned_by"]}}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"enum": ["ok", "unavailable"]}, "model": {"type": "string"},
                              "adapters": {"type": "integer"}, "scheduler": {"type": "object"}}},
}

_WORKERS_AI_ERRORS = {"400": "Bad input (5006), no such model (5007), finetune incomplete (3039)",
                      "401": "Missing or wrong bearer token (10000)", "404": "Finetune not found (3037)",
                      "408": "Request timeout (3007)",
                      "413": "Body over the limit (3006, connection closed) or too many tokens (5021)",
                      "429": "Capacity temporarily exceeded (3040)", "500": "Internal error (3043)"}


def _json(schema_name: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema_name)}}}


def _errors(codes, schema_name: str = "ErrorEnvelope") -> dict[str, Any]:
    return {code: _json(schema_name, _WORKERS_AI_ERRORS[code]) for code in codes}


def _body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}


_STREAM_NOTE = ("With `stream: true` the answer is `text/event-stream`: `data: {json}` events, keep-alive "
                "comments while waiting, then `data: [DONE]`; a failure after the first byte is an event "
                "carrying `errors` (Workers AI) or `error` (OpenAI).")
_ALL_RUN = ("400", "401", "404", "408", "413", "429", "500")

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    (f"{ACCOUNT}/run/<path:model>", "post"): {
        "summary": "Run the model (Workers AI text generation)", "description": _STREAM_NOTE,
        "tags": ["Workers AI"], "requestBody": _body("WorkersAiInput"),
        "responses": {"200": {"description": "The completion (or an event stream)", "content": {
            JSON: {"schema": _ref("RunResult")}, SSE: {"schema": {"type": "string"}}}}, **_errors(_ALL_RUN)}},
    (f"{ACCOUNT}/finetunes", "post"): {
        "summary": "Create a finetune (a named LoRA adapter, files uploaded next)", "tags": ["Finetunes"],
        "requestBody": _body("CreateFinetune"),
        "responses": {"200": _json("FinetuneResult"), **_errors(("400", "401", "413"))}},
    (f"{ACCOUNT}/finetunes", "get"): {
        "summary": "List finetunes", "tags": ["Finetunes"],
        "responses": {"200": _json("FinetuneList"), **_errors(("401",))}},
    (f"{ACCOUNT}/finetunes/<finetune_id>", "get"): {
        "summary": "A finetune (by id or name) and its uploaded files", "tags": ["Finetunes"],
        "responses": {"200": _json("FinetuneWithFilesResult"), **_errors(("401", "404"))}},
    (f"{ACCOUNT}/finetunes/<finetune_id>", "delete"): {
        "summary": "Delete a finetune and its files", "tags": ["Finetunes"],
        "responses": {"200": _json("FinetuneResult"), **_errors(("401", "404"))}},
    (f"{ACCOUNT}/finetunes/<finetune_id>/finetune-assets", "post"): {
        "summary": "Upload adapter_config.json or adapter_model.safetensors", "tags": ["Finetunes"],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _ref("UploadAsset")}}},
        "responses": {"200": _json("FinetuneWithFilesResult"), **_errors(("400", "401", "404", "413"))}},
    ("/v1/models", "get"): {
        "summary": "Models: the base model and each loaded finetune", "tags": ["OpenAI"],
        "responses": {"200": _json("ModelList"), "401": _json("OpenAIError", "Missing or wrong token")}},
    ("/v1/chat/completions", "post"): {
        "summary": "Chat completion (Gemma's chat template: roles alternate user / model (assistant), "
                   "starting with user, after an optional first system message; else 400)", "description": _STREAM_NOTE, "tags": ["OpenAI"],
        "requestBody": _body("ChatCompletionRequest"),
        "responses": {"200": {"description": "The completion (or an event stream)", "content": {
            JSON: {"schema": _ref("ChatCompletion")}, SSE: {"schema": {"type": "string"}}}},
            **{c: _json("OpenAIError", d) for c, d in _WORKERS_AI_ERRORS.items()}}},
    ("/v1/completions", "post"): {
        "summary": "Text completion (the prompt verbatim after BOS)", "description": _STREAM_NOTE,
        "tags": ["OpenAI"], "requestBody": _body("CompletionRequest"),
        "responses": {"200": {"description": "The completion (or an event stream)", "content": {
            JSON: {"schema": _ref("Completion")}, SSE: {"schema": {"type": "string"}}}},
            **{c: _json("OpenAIError", d) for c, d in _WORKERS_AI_ERRORS.items()}}},
    ("/health", "get"): {
        "summary": "Liveness and scheduler stats (never needs a token)", "tags": ["Operations"], "security": [],
        "responses": {"200": _json("Health"), "503": _json("Health", "The scheduler is not answering")}},
    ("/metrics", "get"): {
        "summary": "Prometheus metrics (needs the token when started with --protect-metrics)",
        "tags": ["Operations"],
        "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {
            "schema": {"type": "string"}}}}, **_errors(("401",))}},
    ("/openapi.json", "get"): {
        "summary": "This document", "tags": ["Operations"], "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}}},
    ("/", "get"): {
        "summary": "The playground (HTML)", "tags": ["Playground"], "security": [],
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}},
    ("/static/<path:filename>", "get"): {
        "summary": "The playground's static files", "tags": ["Playground"], "security": [],
        "responses": {"200": {"description": "A file"}, "404": _json("ErrorEnvelope", "No such file (7000)")}},
}


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: `<path:model>` -> `{model}`."""
    out, rest = [], rule
    while "<" in rest:
        head, _, tail = rest.partition("<")
        name, _, rest = tail.partition(">")
        out.append(head + "{" + name.split(":")[-1] + "}")
    return "".join(out) + rest


def _parameters(rule: str) -> list[dict[str, Any]]:
    names = [part.split(">")[0].split(":")[-1] for part in rule.split("<")[1:]]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def document(model_name: str = "") -> dict[str, Any]:
    """The OpenAPI document (a fresh dict)."""
    paths: dict[str, dict[str, Any]] = {}
    for (rule, method), operation in OPERATIONS.items():
        op = copy.deepcopy(operation)
        if _parameters(rule):
            op["parameters"] = _parameters(rule)
        op["operationId"] = f"{method}_{openapi_path(rule).strip('/').replace('/', '_').replace('{', '').replace('}', '') or 'root'}"
        paths.setdefault(openapi_path(rule), {})[method] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "gemma-jax", "version": "0.1.0",
                 "description": "Cloudflare Workers AI's text-generation and finetunes API (and OpenAI-compatible "
                                f"routes) serving {model_name or 'Gemma'}. Errors use Workers AI's envelope "
                                "(OpenAI's error shape under /v1/)."},
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Needed only when started with --api-token"}}},
        "security": [{"bearer": []}, {}],
    }
