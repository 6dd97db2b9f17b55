"""Security: with a token every API route refuses a missing or wrong one (401 / 10000, decided by
`hmac.compare_digest`), /health and /openapi.json stay open, /metrics is protectable; uploads spool
into the data dir; nothing in the code base unpickles."""

from __future__ import annotations

import hmac
import io
import json
import os
import re
from pathlib import Path

import pytest
import requests

from serving.app import create_app
from serving.openapi import document
from serving_fakes import MODEL, LiveServer, fake_backend

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-3f9a"
WRONG = ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
         {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
         {"Authorization": f"Bearer {TOKEN}0"}, {"Authorization": f"bearer  {TOKEN} x"})
OPEN = {"/health", "/openapi.json", "/", "/static/{filename}"}


def _concrete(path: str) -> str:
    return (path.replace("{account_id}", "acc").replace("{model}", MODEL)
            .replace("{finetune_id}", "00000000-0000-4000-8000-000000000000").replace("{filename}", "playground.js"))


def _api_operations(protect_metrics: bool):
    doc = document(MODEL)
    for path, item in doc["paths"].items():
        for method in item:
            if path in OPEN or (path == "/metrics" and not protect_metrics):
                continue
            yield method.upper(), _concrete(path)


@pytest.mark.parametrize("protect_metrics", [False, True])
def test_every_api_route_needs_the_token(tmp_path, monkeypatch, protect_metrics):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    backend, scheduler, _ = fake_backend()
    app = create_app(backend, api_token=TOKEN, data_dir=tmp_path, protect_metrics=protect_metrics)
    operations = list(_api_operations(protect_metrics))
    assert len(operations) == 9 + protect_metrics  # every /client/v4 and /v1 route (+ /metrics)
    with LiveServer(app) as live:
        for method, path in operations:
            for headers in WRONG:
                r = requests.request(method, live.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.text)
                body = r.json()
                code = body["error"]["code"] if path.startswith("/v1/") else body["errors"][0]["code"]
                assert str(code) == "10000", body
            good = requests.request(method, live.url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                                    json={"prompt": "x", "model": MODEL, "name": "n", "messages": [
                                        {"role": "user", "content": "x"}]}, timeout=10)
            assert good.status_code != 401, (method, path, good.text)
        assert scheduler.requests  # the right token reached the model
        for path in ("/health", "/openapi.json", "/", "/static/playground.js"):
            assert requests.get(live.url + path, timeout=10).status_code == 200, path
        metrics = requests.get(f"{live.url}/metrics", timeout=10).status_code
        assert metrics == (401 if protect_metrics else 200)
    assert calls and all(isinstance(a, bytes) and b == TOKEN.encode() for a, b in calls)


def test_protect_metrics_needs_a_token(tmp_path):
    backend, _, _ = fake_backend()
    with pytest.raises(ValueError, match="api_token"):
        create_app(backend, data_dir=tmp_path, protect_metrics=True)


def test_protect_metrics_is_a_documented_flag():
    from serving.cli import add_serve_arguments
    import argparse

    parser = add_serve_arguments(argparse.ArgumentParser())
    assert "--protect-metrics" in parser.format_help()
    assert parser.parse_args(["--protect-metrics"]).protect_metrics is True
    assert parser.parse_args([]).max_upload_bytes == 100 << 20
    for doc in ("README.md", "serving/README.md"):
        assert "--protect-metrics" in (ROOT / doc).read_text(), doc


def test_uploads_spool_into_the_data_dir(tmp_path, monkeypatch):
    """The multipart file part is an unnamed file in <data-dir>/incoming/, not in TMPDIR or memory."""
    from serving.finetunes import FinetuneStore

    seen = []
    real = FinetuneStore.add_asset

    def spy(self, finetune_id, file_name, stream, backend, max_bytes):
        seen.append(os.readlink(f"/proc/self/fd/{stream.fileno()}"))
        return real(self, finetune_id, file_name, stream, backend, max_bytes)

    monkeypatch.setattr(FinetuneStore, "add_asset", spy)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    backend, _, _ = fake_backend()
    with LiveServer(create_app(backend, data_dir=tmp_path / "data")) as live:
        base = f"{live.url}/client/v4/accounts/a/ai/finetunes"
        fid = requests.post(base, json={"model": MODEL, "name": "spool"}, timeout=10).json()["result"]["id"]
        r = requests.post(f"{base}/{fid}/finetune-assets", data={"file_name": "adapter_config.json"},
                          files={"file": ("c", io.BytesIO(json.dumps({"r": 4}).encode()))}, timeout=10)
        assert r.status_code == 200, r.text
    assert len(seen) == 1 and seen[0].startswith(str(tmp_path / "data" / "incoming") + "/"), seen
    assert seen[0].endswith("(deleted)")  # unnamed: gone with the process, whatever happens


UNPICKLERS = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|torch\.load\(|"
                        r"allow_pickle\s*=\s*True|\bnp\.load\(|\bnumpy\.load\(|joblib\.load\(|\bmarshal\.loads?\(")


def test_nothing_unpickles():
    hits = []
    for folder in ("gemma_jax", "serving", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if UNPICKLERS.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == [], hits
