"""The Flask app: Workers AI's REST API (run + finetunes), OpenAI routes, health, metrics, playground.

`create_app(backend, ...)` builds everything from one `Backend` (serving/backend.py); the app holds
no global state, so tests build as many apps as they like, each with its own metrics registry and
finetunes database. Anything written for Workers AI's REST API works against it with only the base
URL changed: same paths, same bodies (the seed's exact JSON schema), same envelope and error codes.

Cross-cutting rules, applied here once:
- auth: with an `api_token`, every route under /client/v4/ and /v1/ (and /metrics with
  `protect_metrics`) needs `Authorization: Bearer <token>`, compared with `hmac.compare_digest`, else
  10000/401, before routing (no probing of routes without the token); /, /static, /openapi.json and
  /health stay open;
- sizes: JSON bodies are read with a byte budget (Content-Length checked first, a chunked body cut off
  at the limit: 3006/413); multipart uploads are buffered into `<data_dir>/incoming/` (never TMPDIR)
  and refused over `max_upload_bytes` (3006/413); every 3006 answer closes the connection, so the
  rest of a refused body is never read;
- errors: every failure, including unknown routes (404) and wrong methods (405), is an `ApiError`
  rendered as the Workers AI envelope (OpenAI's `{"error": {...}}` shape under /v1/);
- access log: one JSON line per request on the `serving.access` logger; every error answer is also
  logged at WARNING on `serving` with its reason (a stream's late error by serving/sse.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid

import tempfile

from flask import Flask, Request, Response, g, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import ClientDisconnected, HTTPException

from serving import errors, openapi, sse, validation
from serving.adapter_files import CONFIG_NAME, MAX_CONFIG_BYTES
from serving.backend import AdapterBankFull, AdapterError, Backend
from serving.finetunes import FinetuneError, FinetuneStore
from serving.http import ServerState, read_json, start_generation, state
from serving.metrics import Metrics
from serving.generation import HEARTBEAT_S, usage

log = logging.getLogger("serving")
access_log = logging.getLogger("serving.access")

ACCOUNT = "/client/v4/accounts/<account_id>/ai"
PROTECTED_PREFIXES = ("/client/v4/", "/v1/")
MULTIPART_SLACK = 1 << 20  # multipart framing and the file_name field, on top of the file itself
DEFAULT_MAX_UPLOAD_BYTES = 100 << 20  # Workers AI's documented limit for a LoRA adapter file


class _Request(Request):
    """Flask's request, but a multipart file part is buffered in `<data_dir>/incoming/` (an unnamed
    file there, gone when closed or when the process dies) instead of TMPDIR or memory."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return tempfile.TemporaryFile("wb+", dir=state().store.incoming)


def create_app(
    backend: Backend,
    *,
    api_token: str | None = None,
    data_dir: str | os.PathLike = "./gemma-jax-data",
    stream_padding: bool = True,
    max_body_bytes: int = 1 << 20,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    request_timeout: float | None = 600.0,
    heartbeat: float = HEARTBEAT_S,
    reload_finetunes: bool = True,
    protect_metrics: bool = False,
) -> Flask:
    if protect_metrics and not api_token:
        raise ValueError("protect_metrics needs an api_token (the token /metrics would ask for)")
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.request_class = _Request
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes + MULTIPART_SLACK
    store = FinetuneStore(data_dir, backend.model_name)
    st = ServerState(backend=backend, metrics=Metrics(backend.stats), store=store,
                     api_token=api_token or None, stream_padding=stream_padding,
                     max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
                     request_timeout=request_timeout, heartbeat=heartbeat, protect_metrics=protect_metrics)
    app.extensions["gemma_jax"] = st
    if reload_finetunes:
        loaded = store.reload_all(backend)
        if loaded:
            log.info("reloaded %d finetune(s): %s", len(loaded), ", ".join(loaded))

    _install_hooks(app)
    _install_error_handlers(app)
    _install_workers_ai_routes(app)
    from serving.openai import blueprint  # noqa: PLC0415 - a route module, registered per app

    app.register_blueprint(blueprint)
    _install_operations_routes(app)
    app.extensions["gemma_jax_openapi"] = openapi.document(backend.model_name)
    return app


# -- auth, access log, request metrics ------------------------------------------------------------
def _authorized(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def _protected(path: str, st: ServerState) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or (st.protect_metrics and path == "/metrics")


def _install_hooks(app: Flask) -> None:
    @app.before_request
    def _before():
        g.request_id = uuid.uuid4().hex
        g.started = time.monotonic()
        st = state()
        if st.api_token and _protected(request.path, st) and not _authorized(st.api_token):
            return _render(errors.authentication_error())
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        state().metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        response.headers["X-Request-Id"] = g.get("request_id", "")
        access_log.info(json.dumps({
            "request_id": g.get("request_id"), "remote": request.remote_addr, "method": request.method,
            "path": request.path, "route": route, "status": response.status_code,
            "duration_ms": round((time.monotonic() - g.get("started", time.monotonic())) * 1000, 2),
            "bytes_in": request.content_length, "stream": response.is_streamed,
            "user_agent": request.headers.get("User-Agent")}))
        return response


def _render(e: errors.ApiError) -> Response:
    """The error answer for `e` (the envelope, OpenAI's shape under /v1/), logged at WARNING."""
    log.warning("request %s: %s %s -> %d / %d %s", g.get("request_id"), request.method, request.path,
                e.status, e.code, e.message)
    response = jsonify(errors.body_for(e, request.path))
    response.status_code = e.status
    if e.close:  # the rest of the body stays unread: end the connection (serving/worker.py obeys)
        response.headers["Connection"] = "close"
    return response


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(errors.ApiError)
    def _api_error(e: errors.ApiError):
        return _render(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if isinstance(e, ClientDisconnected):  # the body stopped (read timeout), broke or ended early
            return _render(errors.from_body_read(e))
        if e.code == 404:
            return _render(errors.not_found())
        if e.code == 405:
            return _render(errors.method_not_allowed(request.method))
        if e.code == 413:
            return _render(errors.request_too_large(app.config["MAX_CONTENT_LENGTH"]))
        if e.code == 400:
            return _render(errors.bad_input(f"Error: {e.description}"))
        return _render(errors.ApiError(e.code or 500, e.code or 500, e.description or e.name))

    from gunicorn.http.errors import ParseException  # noqa: PLC0415 - gunicorn's request framing errors

    @app.errorhandler(ParseException)
    def _malformed_body(e: ParseException):
        # wsgi.input raised it: the body's chunked framing is broken (read_body turns it into the same
        # answer; this catches it where another reader, the multipart parser, met it)
        return _render(errors.from_body_read(e))

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _render(errors.internal_error())


# -- Workers AI -----------------------------------------------------------------------------------
def _install_workers_ai_routes(app: Flask) -> None:
    @app.post(f"{ACCOUNT}/run/<path:model>")
    def run_model(account_id: str, model: str):
        st = state()
        if not st.backend.serves(model):
            raise errors.no_such_model(model)
        body = validation.validate_input(read_json(st.max_body_bytes))
        run = start_generation(st.backend.input_from_body(body))
        if body.get("stream"):
            items = sse.first_then_rest(run)
            return Response(sse.workers_ai_stream(run, items, st.stream_padding),
                            mimetype="text/event-stream", headers=sse.HEADERS)
        try:
            completion = run.wait()
        finally:
            run.close()
        return jsonify(errors.envelope_ok({"response": completion.text, "usage": usage(completion)}))

    @app.post(f"{ACCOUNT}/finetunes")
    def create_finetune(account_id: str):
        st = state()
        body = read_json(st.max_body_bytes)
        if not isinstance(body, dict):
            raise errors.bad_input("Error: the body must be a JSON object with model and name")
        model = body.get("model")
        if not isinstance(model, str):
            raise errors.bad_input("Error: required properties at '/' are 'model,name'")
        if not st.backend.serves(model):
            raise errors.no_such_model(model)
        try:
            record = st.store.create(body.get("name"), body.get("description"))
        except FinetuneError as e:
            raise errors.bad_input(f"Error: {e}") from None
        return jsonify(errors.envelope_ok(record))

    @app.get(f"{ACCOUNT}/finetunes")
    def list_finetunes(account_id: str):
        return jsonify(errors.envelope_ok(state().store.list()))

    @app.get(f"{ACCOUNT}/finetunes/<finetune_id>")
    def get_finetune(account_id: str, finetune_id: str):
        store = state().store
        record = _find_finetune(finetune_id)
        return jsonify(errors.envelope_ok({**record, "files": store.files(record["id"])}))

    @app.post(f"{ACCOUNT}/finetunes/<finetune_id>/finetune-assets")
    def upload_asset(account_id: str, finetune_id: str):
        st = state()
        record = _find_finetune(finetune_id)
        try:
            upload = request.files.get("file")
            file_name = request.form.get("file_name") or (upload.filename if upload else None)
        except OSError:  # the body stopped arriving (a read timed out)
            raise errors.body_timeout() from None
        if upload is None or not file_name:
            raise errors.bad_input("Error: multipart fields 'file_name' and 'file' are required")
        limit = min(st.max_upload_bytes, MAX_CONFIG_BYTES) if file_name == CONFIG_NAME else st.max_upload_bytes
        if upload.stream.seek(0, os.SEEK_END) > limit:  # inside the multipart slack, over the file limit
            raise errors.request_too_large(limit)
        upload.stream.seek(0)
        try:
            result = st.store.add_asset(record["id"], file_name, upload.stream, st.backend,
                                        st.max_upload_bytes)
        except FinetuneError as e:
            raise errors.bad_input(f"Error: {e}") from None
        except AdapterBankFull as e:  # a valid adapter with nowhere to go: capacity, not bad input
            raise errors.adapter_bank_full(str(e)) from None
        except AdapterError as e:
            raise errors.bad_input(f"Error: invalid adapter: {e}") from None
        return jsonify(errors.envelope_ok(result))

    @app.delete(f"{ACCOUNT}/finetunes/<finetune_id>")
    def delete_finetune(account_id: str, finetune_id: str):
        st = state()
        record = _find_finetune(finetune_id)
        return jsonify(errors.envelope_ok(st.store.delete(record["id"], st.backend)))


def _find_finetune(id_or_name: str) -> dict:
    record = state().store.find(id_or_name)
    if record is None:
        raise errors.finetune_not_found(id_or_name)
    return record


# -- operations -----------------------------------------------------------------------------------
def _install_operations_routes(app: Flask) -> None:
    @app.get("/health")
    def health():
        st = state()
        try:
            stats = st.backend.stats()
        except Exception as e:  # noqa: BLE001 - report, don't crash
            return jsonify({"status": "unavailable", "error": str(e)}), 503
        return jsonify({"status": "ok", "model": st.backend.model_name,
                        "adapters": len(st.backend.adapters()), "scheduler": stats})

    @app.get("/openapi.json")
    def openapi_document():
        return jsonify(app.extensions["gemma_jax_openapi"])

    @app.get("/metrics")
    def metrics():
        return Response(state().metrics.render(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/")
    def playground():
        return send_from_directory(app.static_folder, "index.html")


__all__ = ["create_app"]
