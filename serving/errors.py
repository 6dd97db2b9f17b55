"""Workers AI's error envelope and the codes we answer with.

Every error the server sends, on every route of the Workers AI API, is one `ApiError` rendered as
`{"result": {}, "success": false, "errors": [{"code": N, "message": "AiError: ..."}], "messages": []}`
with its HTTP status. The codes come from Cloudflare's published error table (5006, 5007, 3006,
3007, 3037, 3039, 3040, 10000); the few that Cloudflare does not publish for a case we need
(5021's exact text, 7000/7001 for unknown route / wrong method, 3043 for an internal failure) follow
what Cloudflare's API answers in the same situations. The table lives here, once, so the routes,
the stream and the tests speak the same words.
"""

from __future__ import annotations

from typing import Any

from gemma_jax.engine.api import InputTooLong, InvalidRequest, QueueFull, RequestFailed, UnknownAdapter
from serving.backend import AdapterBankFull, AdapterError, BadRequest


class ApiError(Exception):
    """An error answer: HTTP status, Workers AI code, message (always starting `AiError: `)."""

    def __init__(self, status: int, code: int, message: str, *, close: bool = False):
        self.status, self.code, self.close = status, code, close  # close: end the connection after it
        self.message = message if message.startswith("AiError: ") else f"AiError: {message}"
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return envelope_error(self.code, self.message)


def body_for(e: ApiError, path: str) -> dict[str, Any]:
    """The error body for a request to `path`: OpenAI's `{"error"}` under /v1/, else the envelope."""
    if path.startswith("/v1/"):
        from serving.openai import error_body  # noqa: PLC0415 - openai imports this module

        return error_body(e)
    return e.body()


def envelope_ok(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def envelope_error(code: int, message: str) -> dict[str, Any]:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


# -- the table ------------------------------------------------------------------------------------
def bad_input(detail: str) -> ApiError:
    """5006 / 400: the body is not what the schema (or the chat template) admits."""
    return ApiError(400, 5006, f"Bad input: {detail}")


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, 5006, f"Bad input: Error: invalid JSON body: {detail}")


def no_such_model(model: str) -> ApiError:
    return ApiError(400, 5007, f"No such model {model} or task")


def finetune_not_found(name: str) -> ApiError:
    return ApiError(404, 3037, f"Finetune not found: {name}")


def finetune_missing_files(name: str) -> ApiError:
    return ApiError(400, 3039, f"Finetune {name} is missing required files "
                               "(adapter_config.json and adapter_model.safetensors)")


def too_many_tokens(e: InputTooLong) -> ApiError:
    """5021 / 413, with every count so the client can fix its request."""
    total = e.prompt_tokens + e.max_tokens
    return ApiError(413, 5021, (
        f"The estimated number of input and maximum output tokens ({total}) exceeded this model "
        f"context window limit: {e.prompt_tokens} input tokens (at most {e.limit_input}) + "
        f"{e.max_tokens} max_tokens (input + max_tokens at most {e.limit_total})"))


def request_too_large(limit: int) -> ApiError:
    """3006 / 413; the connection is closed after it (the rest of the body is never read)."""
    return ApiError(413, 3006, f"Request is too large (the limit is {limit} bytes)", close=True)


def body_timeout() -> ApiError:
    """3007 / 408 for a body that stopped arriving (serving/worker.py's pacing); closes the connection."""
    return ApiError(408, 3007, "Request timeout: the request body did not arrive in time", close=True)


def malformed_body(detail: str) -> ApiError:
    """5006 / 400 for a body whose framing is broken (a chunk size that is not hex, a chunk without
    its CRLF, a chunked body cut off); the connection is closed after it (its framing is lost)."""
    return ApiError(400, 5006, f"Bad input: Error: malformed request body: {detail}", close=True)


def from_body_read(e: BaseException) -> ApiError:
    """The answer for an exception met while reading the request body: broken chunked framing
    (gunicorn's InvalidChunkSize, ChunkMissingTerminator, ...) or a body the client ended early
    (NoMoreData) is 400 / 5006; a read that timed out (serving/worker.py's pacing) or any other socket
    failure 408 / 3007. werkzeug's LimitedStream turns an OSError into ClientDisconnected raised
    inside its handler, so the chain of contexts is searched for the real cause."""
    from gunicorn.http.errors import NoMoreData, ParseException  # noqa: PLC0415

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, (ParseException, OSError)):
        cause = cause.__context__
    if isinstance(cause, ParseException):
        return malformed_body(str(cause)[:200])
    if isinstance(cause, NoMoreData):
        return malformed_body("the body ended before its end (the client closed its side)")
    return body_timeout()


def malformed_request(detail: str, status: int = 400) -> ApiError:
    """5006 / 400 (or 417 for an unknown Expect) for a request gunicorn's parser refuses before the
    app sees it: request line, HTTP version, header syntax, Content-Length, Transfer-Encoding."""
    return ApiError(status, 5006, f"Bad input: Error: malformed request: {detail}", close=True)


def uri_too_long(detail: str) -> ApiError:
    """3006 / 414: the request line is over gunicorn's `limit_request_line`."""
    return ApiError(414, 3006, f"Request is too large: the request line is too long ({detail})", close=True)


def headers_too_large(detail: str) -> ApiError:
    """3006 / 431: a header line over `limit_request_field_size`, or more than `limit_request_fields`."""
    return ApiError(431, 3006, f"Request is too large: the header fields are too large ({detail})", close=True)


def timeout() -> ApiError:
    return ApiError(408, 3007, "Request timeout")


def out_of_capacity() -> ApiError:
    return ApiError(429, 3040, "Capacity temporarily exceeded, please try again.")


def warming_up(detail: str) -> ApiError:
    """503 / 3040 while the server starts (serving/startup.py): capacity that is not there yet."""
    return ApiError(503, 3040, f"Capacity temporarily exceeded: the model is starting ({detail}); retry later")


def adapter_bank_full(detail: str) -> ApiError:
    """429 / 3040: every LoRA slot of the engine holds an adapter (a finetune must be deleted first)."""
    return ApiError(429, 3040, f"Capacity temporarily exceeded: {detail}")


def authentication_error() -> ApiError:
    return ApiError(401, 10000, "Authentication error")


def not_found() -> ApiError:
    return ApiError(404, 7000, "No route for that URI")


def method_not_allowed(method: str) -> ApiError:
    return ApiError(405, 7001, f"Method {method} not allowed for this route")


def internal_error(detail: str = "") -> ApiError:
    """Something failed on our side (never caused by a schema-valid body)."""
    return ApiError(500, 3043, "Internal server error" + (f": {detail}" if detail else ""))


def from_exception(e: BaseException) -> ApiError:
    """The answer for an exception raised by the backend, the scheduler or a handle."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InputTooLong):
        return too_many_tokens(e)
    if isinstance(e, QueueFull):
        return out_of_capacity()
    if isinstance(e, UnknownAdapter):
        return finetune_not_found(str(e.args[0]) if e.args else "")
    if isinstance(e, AdapterBankFull):
        return adapter_bank_full(str(e))
    if isinstance(e, (BadRequest, AdapterError, InvalidRequest)):
        return bad_input(f"Error: {e}")
    if isinstance(e, TimeoutError):
        return timeout()
    if isinstance(e, RequestFailed):
        return internal_error(str(e))
    return internal_error(type(e).__name__)
