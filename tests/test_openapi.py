"""`/openapi.json`: every route and method the Flask app serves is documented and nothing else is; the
document is valid OpenAPI (openapi-spec-validator); the run route's body schema is the schema file the
server validates with; real answers of every documented route match their documented schemas."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate

from serving.app import create_app
from serving.openapi import document, openapi_path
from serving_fakes import MODEL, LiveServer, fake_backend, run_url

ROOT = Path(__file__).resolve().parents[1]
AUTOMATIC = {"HEAD", "OPTIONS"}  # werkzeug answers these for every route by itself
TOKEN = "s3cret"


@pytest.fixture
def app(tmp_path):
    backend, _, _ = fake_backend()
    return create_app(backend, data_dir=tmp_path, api_token=TOKEN)


def served_operations(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods - AUTOMATIC:
            out.add((openapi_path(rule.rule), method.lower()))
    return out


def documented_operations(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item}


def test_every_served_route_is_documented_and_nothing_else(app):
    doc = document(MODEL)
    served, documented = served_operations(app), documented_operations(doc)
    assert served - documented == set(), "routes without a description in serving/openapi.py"
    assert documented - served == set(), "described routes the app does not serve"
    assert len(served) == 14
    # the only methods beyond the documented ones are werkzeug's automatic HEAD / OPTIONS
    for rule in app.url_map.iter_rules():
        assert rule.methods - {m.upper() for (p, m) in documented if p == openapi_path(rule.rule)} <= AUTOMATIC


def test_document_is_valid_openapi_and_served_without_a_token(app):
    doc = document(MODEL)
    validate(doc)  # openapi-spec-validator: OpenAPI 3.1 structure, $refs resolve
    with LiveServer(app) as live:
        r = requests.get(f"{live.url}/openapi.json", timeout=10)
        assert r.status_code == 200 and r.json() == json.loads(json.dumps(doc))
        for path, item in doc["paths"].items():  # a path parameter is declared for each {name}
            for op in item.values():
                declared = {p["name"] for p in op.get("parameters", [])}
                assert declared == {part.split("}")[0] for part in path.split("{")[1:]}, path


def test_run_route_schema_is_the_file_the_server_validates_with():
    on_disk = json.loads((ROOT / "serving" / "schemas" / "gemma-7b-it.input.schema.json").read_text())
    doc = document(MODEL)
    op = doc["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert doc["components"]["schemas"][ref.rsplit("/", 1)[1]] == on_disk


def schema_check(doc, path: str, method: str, status: int, content_type: str = "application/json"):
    """A jsonschema validator for the documented response of (path, method, status)."""
    response = doc["paths"][path][method]["responses"][str(status)]
    schema = response["content"][content_type]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def test_real_answers_match_their_documented_schemas(app, tmp_path):
    doc = document(MODEL)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    acc = "/client/v4/accounts/{account_id}/ai"
    seen: set[tuple[str, str]] = set()

    def check(path, method, r, content_type="application/json"):
        body = r.json()
        schema_check(doc, path, method, r.status_code, content_type).validate(body)
        seen.add((path, method))
        return body

    with LiveServer(app) as live:
        base = f"{live.url}/client/v4/accounts/a/ai"
        check(f"{acc}/run/{{model}}", "post",
              requests.post(run_url(live.url), json={"prompt": "hi"}, headers=auth, timeout=10))
        check(f"{acc}/run/{{model}}", "post", requests.post(run_url(live.url), json={}, headers=auth, timeout=10))
        check(f"{acc}/run/{{model}}", "post", requests.post(run_url(live.url), json={"prompt": "x"}, timeout=10))
        stream = requests.post(run_url(live.url), json={"prompt": "hi", "stream": True}, headers=auth, timeout=10)
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert "text/event-stream" in doc["paths"][f"{acc}/run/{{model}}"]["post"]["responses"]["200"]["content"]
        created = check(f"{acc}/finetunes", "post", requests.post(
            f"{base}/finetunes", json={"model": MODEL, "name": "ft"}, headers=auth, timeout=10))
        fid = created["result"]["id"]
        check(f"{acc}/finetunes", "get", requests.get(f"{base}/finetunes", headers=auth, timeout=10))
        check(f"{acc}/finetunes/{{finetune_id}}", "get",
              requests.get(f"{base}/finetunes/{fid}", headers=auth, timeout=10))
        check(f"{acc}/finetunes/{{finetune_id}}", "get",
              requests.get(f"{base}/finetunes/nope", headers=auth, timeout=10))
        check(f"{acc}/finetunes/{{finetune_id}}/finetune-assets", "post", requests.post(
            f"{base}/finetunes/{fid}/finetune-assets", data={"file_name": "adapter_config.json"},
            files={"file": ("c", io.BytesIO(json.dumps({"r": 4, "model_type": "gemma"}).encode()))},
            headers=auth, timeout=10))
        check(f"{acc}/finetunes/{{finetune_id}}/finetune-assets", "post", requests.post(
            f"{base}/finetunes/{fid}/finetune-assets", data={"file_name": "other.bin"},
            files={"file": ("c", io.BytesIO(b"x"))}, headers=auth, timeout=10))
        check(f"{acc}/finetunes/{{finetune_id}}", "delete",
              requests.delete(f"{base}/finetunes/{fid}", headers=auth, timeout=10))
        check("/v1/models", "get", requests.get(f"{live.url}/v1/models", headers=auth, timeout=10))
        check("/v1/chat/completions", "post", requests.post(f"{live.url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, headers=auth, timeout=10))
        check("/v1/chat/completions", "post", requests.post(f"{live.url}/v1/chat/completions", json={
            "model": MODEL, "messages": []}, headers=auth, timeout=10))
        check("/v1/completions", "post", requests.post(f"{live.url}/v1/completions", json={
            "model": MODEL, "prompt": "hi"}, headers=auth, timeout=10))
        check("/health", "get", requests.get(f"{live.url}/health", timeout=10))
        check("/openapi.json", "get", requests.get(f"{live.url}/openapi.json", timeout=10))
        metrics = requests.get(f"{live.url}/metrics", timeout=10)
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        page = requests.get(f"{live.url}/", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        check("/static/{filename}", "get", requests.get(f"{live.url}/static/nothing-here.js", timeout=10))
        assert requests.get(f"{live.url}/static/playground.js", timeout=10).status_code == 200
    json_routes = {op for op in documented_operations(doc)
                   if op not in {("/metrics", "get"), ("/", "get")}}
    assert json_routes == seen
