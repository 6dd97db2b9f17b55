"""Property-based fuzzing of every route of the production server (gunicorn + the fake backend, on
127.0.0.1): bodies drawn from the documented JSON Schemas (hypothesis-jsonschema), arbitrary JSON,
arbitrary bytes under arbitrary content types, random paths and methods, and hand-picked hostile cases
(NaN/Infinity, lone surrogates, NUL bytes, duplicate keys, 100k nested '[', 10 MB bodies).

The properties: no answer is a 5xx; every error is the documented error shape of its route (Workers AI's
envelope, or OpenAI's `{"error": ...}` under /v1/); every 200 matches its documented schema; a body the
documented request schema admits is never refused as bad input (5006) on the OpenAI routes and the
prompt branch of the run route. Bounded: about 200 examples in all, well under 90 s."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from raw_http import post_raw
from serving.openapi import document, openapi_path
from serving_fakes import MODEL, FakeTokenizer, expected_output, run_url
from server_group import ServerGroup

DOC = document(MODEL)
SCHEMAS = DOC["components"]["schemas"]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ACC = "/client/v4/accounts/{account_id}/ai"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerGroup(tmp_path_factory.mktemp("fuzz-data"), extra_args=("--request-timeout", "20")) as group:
        base = f"{group.url}/client/v4/accounts/acc/ai/finetunes"
        r = requests.post(base, json={"model": MODEL, "name": "fuzzed"}, timeout=10)
        group.finetune_id = r.json()["result"]["id"]
        yield group
    assert not any("Traceback" in line for line in group.lines), "".join(group.lines)


def _validator(schema):
    return jsonschema.Draft202012Validator({**schema, "components": DOC["components"]})


def _documented(path_template: str, method: str, status: int):
    return DOC["paths"][path_template][method]["responses"].get(str(status))


def check_answer(r: requests.Response, path_template: str, method: str) -> None:
    """No 5xx; an error has its route's documented error shape; a JSON 200 matches its schema."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    ctype = r.headers.get("Content-Type", "")
    if r.status_code >= 400:
        error_schema = SCHEMAS["OpenAIError" if path_template.startswith("/v1/") else "ErrorEnvelope"]
        _validator(error_schema).validate(r.json())
        return
    if ctype.startswith("text/event-stream"):
        events = [b[6:] for b in r.text.split("\n\n") if b.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for data in events[:-1]:
            assert "errors" not in json.loads(data) and "error" not in json.loads(data), data
        return
    documented = _documented(path_template, method, r.status_code)
    assert documented is not None, (path_template, method, r.status_code)
    if ctype.startswith("application/json"):
        _validator(documented["content"]["application/json"]["schema"]).validate(r.json())


def post_json(server, url: str, body, template: str) -> requests.Response:
    r = requests.post(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                      timeout=30)
    check_answer(r, template, "post")
    return r


# -- bodies the documented schemas admit --------------------------------------------------------------
PROMPT_BRANCH = {**SCHEMAS["WorkersAiInput"]["oneOf"][0], "type": "object"}


@FUZZ
@given(body=from_schema(SCHEMAS["WorkersAiInput"]))
def test_run_with_schema_bodies(server, body):
    body.pop("lora", None)  # an unknown finetune is a 404, tested elsewhere
    r = post_json(server, run_url(server.url), body, f"{ACC}/run/{{model}}")
    if r.status_code == 400:  # admitted by the schema: only the chat template's role order may refuse it
        message = r.json()["errors"][0]["message"]
        assert "messages" in body or "max_tokens" in body, message


@FUZZ
@given(body=from_schema(PROMPT_BRANCH), max_tokens=st.integers(1, 64))
def test_run_prompt_bodies_are_served(server, body, max_tokens):
    body.pop("lora", None)
    body.update(prompt=body["prompt"][:200], max_tokens=max_tokens)
    r = post_json(server, run_url(server.url), body, f"{ACC}/run/{{model}}")
    assert r.status_code == 200, r.text


@FUZZ
@given(body=from_schema(SCHEMAS["ChatCompletionRequest"]), kind=st.sampled_from(["chat", "completion"]),
       prompt=from_schema(SCHEMAS["CompletionRequest"]["properties"]["prompt"]))
def test_openai_with_schema_bodies(server, body, kind, prompt):
    body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            body[key] = min(body[key], 64)
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": m["content"][:100]} for m in body["messages"][:1]]
        path = "/v1/chat/completions"
    else:
        del body["messages"]
        body["prompt"] = prompt
        path = "/v1/completions"
    r = post_json(server, server.url + path, body, path)
    assert r.status_code == 200, (body, r.text)


@FUZZ
@given(body=from_schema(SCHEMAS["CreateFinetune"]))
def test_create_finetune_with_schema_bodies(server, body):
    post_json(server, f"{server.url}/client/v4/accounts/acc/ai/finetunes", body, f"{ACC}/finetunes")


# -- arbitrary JSON, bytes, content types, paths ------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
KEYS = st.sampled_from(["prompt", "messages", "model", "name", "stream", "max_tokens", "raw", "lora", "temperature",
                        "top_k", "seed", "role", "content", "description", "stream_options", "n"])
BODIES = st.dictionaries(KEYS, JSON_VALUES, max_size=6) | JSON_VALUES
POST_ROUTES = [(run_url("{base}"), f"{ACC}/run/{{model}}"),
               ("{base}/client/v4/accounts/acc/ai/finetunes", f"{ACC}/finetunes"),
               ("{base}/v1/chat/completions", "/v1/chat/completions"),
               ("{base}/v1/completions", "/v1/completions")]


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), body=BODIES)
def test_arbitrary_json(server, route, body):
    url, template = route
    post_json(server, url.format(base=server.url), body, template)


CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=zz", "multipart/form-data", "application/xml",
                                 "", "application/json; charset=latin-1"])


@FUZZ
@given(route=st.sampled_from(POST_ROUTES + [("{base}/client/v4/accounts/acc/ai/finetunes/{fid}/finetune-assets",
                                             f"{ACC}/finetunes/{{finetune_id}}/finetune-assets")]),
       data=st.binary(max_size=512), ctype=CONTENT_TYPES)
def test_arbitrary_bytes_and_content_types(server, route, data, ctype):
    url, template = route
    r = requests.post(url.format(base=server.url, fid=server.finetune_id), data=data,
                      headers={"Content-Type": ctype}, timeout=30)
    check_answer(r, template, "post")


@FUZZ
@given(file_name=st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "../x", "", "a\0b"]),
       content=st.binary(max_size=256))
def test_arbitrary_uploads(server, file_name, content):
    url = f"{server.url}/client/v4/accounts/acc/ai/finetunes/{server.finetune_id}/finetune-assets"
    r = requests.post(url, data={"file_name": file_name}, files={"file": ("f", content)}, timeout=30)
    check_answer(r, f"{ACC}/finetunes/{{finetune_id}}/finetune-assets", "post")
    assert r.status_code == 400, r.text  # nothing random is a valid adapter file


SEGMENTS = st.text(st.characters(codec="ascii", exclude_characters="/?#%"), max_size=8)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(parts=st.lists(SEGMENTS, max_size=6), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       prefix=st.sampled_from(["", "/client/v4/accounts/a/ai", "/v1", "/client/v4/accounts/a/ai/finetunes"]))
def test_random_paths_and_methods(server, parts, method, prefix):
    path = prefix + "/" + "/".join(requests.utils.quote(p, safe="") for p in parts)
    r = requests.request(method, server.url + path, data=b"{}", timeout=30)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    if r.status_code >= 400 and not path.startswith("/static/"):
        _validator(SCHEMAS["OpenAIError" if path.startswith("/v1/") else "ErrorEnvelope"]).validate(r.json())


# -- hand-picked hostile bodies -----------------------------------------------------------------------
HOSTILE = {
    "NaN": b'{"prompt": "x", "temperature": NaN}',
    "Infinity": b'{"prompt": "x", "temperature": Infinity}',
    "-Infinity": b'{"prompt": "x", "top_p": -Infinity}',
    "lone surrogate": b'{"prompt": "\\ud800"}',
    "lone surrogate key": b'{"\\udc00": 1, "prompt": "x"}',
    "surrogate bytes": b'{"prompt": "\xed\xa0\x80"}',
    "duplicate keys": b'{"prompt": "x", "prompt": "y"}',
    "deep nesting": b"[" * 100_000,
    "deep objects": b'{"a":' * 50_000,
    "nested messages": b'{"messages": ' + b"[" * 500 + b"]" * 500 + b"}",
    "latin-1": '{"prompt": "caf\u00e9"}'.encode("latin-1"),
    "empty": b"",
    "bom": b'\xef\xbb\xbf{"prompt": "x"}',
    "huge number": b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
    "huge float": b'{"prompt": "x", "temperature": 1e999}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bodies_are_5006(server, name):
    for url, template in POST_ROUTES:
        r = requests.post(url.format(base=server.url), data=HOSTILE[name],
                          headers={"Content-Type": "application/json"}, timeout=30)
        check_answer(r, template, "post")
        assert r.status_code == 400, (name, url, r.text[:300])
        code = r.json()["error"]["code"] if template.startswith("/v1/") else r.json()["errors"][0]["code"]
        assert str(code) == "5006", (name, r.text[:300])


def test_nul_bytes_are_text(server):
    """NUL is a valid character in a JSON string: it reaches the tokenizer (the fake's decode drops ids
    0..2, so its reversal has no NUL) and the answer is served."""
    tok = FakeTokenizer()
    assert tok.encode("a\u0000b") == [2, 97, 0, 98]
    r = requests.post(run_url(server.url), json={"prompt": "a\u0000b", "raw": True}, timeout=30)
    assert r.status_code == 200
    assert r.json()["result"]["response"] == expected_output(tok.decode(tok.encode("a\u0000b")[1:]), 256) == "ba"
    base = f"{server.url}/client/v4/accounts/acc/ai/finetunes"
    r = requests.post(base, json={"model": MODEL, "name": "nul\u0000name"}, timeout=30)
    check_answer(r, f"{ACC}/finetunes", "post")
    assert r.status_code == 400  # control characters in names are refused


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("route", ["/client/v4/accounts/acc/ai/run/" + MODEL, "/v1/chat/completions"])
def test_10mb_body_refused_413_without_reading_it(server, framing, route):
    size, block = 10 * 10**6, b" " * (1 << 16)
    if framing == "content-length":
        head = {"Content-Type": "application/json", "Content-Length": str(size)}
        chunks = (block for _ in range(size // len(block)))
    else:
        head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        chunks = (b"%x\r\n%s\r\n" % (len(block), block) for _ in range(size // len(block)))
    sent, seconds, answer = post_raw(server.port, route, head, chunks)
    status_line, rest = answer.split(b"\r\n", 1)
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    headers = rest.split(b"\r\n\r\n", 1)[0].lower()
    assert b"connection: close" in headers, headers
    assert b"3006" in answer and seconds < 5, (answer[-300:], seconds)
    # the server stopped reading near the 1 MiB limit: what we sent is that plus the socket buffers
    assert sent < (1 << 20) + (8 << 20), sent
    after = requests.post(run_url(server.url), json={"prompt": "ok", "raw": True}, timeout=10)
    assert after.status_code == 200 and after.json()["result"]["response"] == "ko"


def test_every_route_was_fuzzed():
    """The POST routes above plus the GET/DELETE routes the random-path test reaches cover the document."""
    fuzzed = {openapi_path(t) for _, t in POST_ROUTES} | {f"{ACC}/finetunes/{{finetune_id}}/finetune-assets"}
    post_paths = {p for p, item in DOC["paths"].items() if "post" in item}
    assert post_paths == fuzzed
