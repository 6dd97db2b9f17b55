"""Finetunes through HTTP: create -> upload -> use by id and name -> list -> delete, across restarts.

The fake adapter bank (tests/serving_fakes.py) stands in for the LoRA loader: it accepts a config
with an integer rank r <= 32, and an adapter swapcases the fake's output, so "differs from the base"
is checkable by hand. Restarts are new apps (new backend, new bank) on the same data_dir.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import save as save_safetensors

from serving.app import create_app
from serving_fakes import MODEL, LiveServer, expected_output, fake_backend, run_url

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "model_type": "gemma",
                     "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "google/gemma-7b-it"}).encode()
WEIGHTS = save_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                            np.zeros((8, 16), np.float32)})
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def start(data_dir):
    backend, scheduler, bank = fake_backend()
    live = LiveServer(create_app(backend, data_dir=data_dir))
    live.bank, live.scheduler = bank, scheduler
    return live


def finetunes_url(live, *parts):
    return "/".join([f"{live.url}/client/v4/accounts/acc/ai/finetunes", *parts])


def upload(live, finetune_id, file_name, content):
    return requests.post(finetunes_url(live, finetune_id, "finetune-assets"), data={"file_name": file_name},
                         files={"file": (file_name, content)}, timeout=10)


def create(live, name, model=MODEL, **extra):
    return requests.post(finetunes_url(live), json={"model": model, "name": name, **extra}, timeout=10)


def generate(live, lora=None, prompt="Hello Adapter"):
    body = {"prompt": prompt, "raw": True, **({"lora": lora} if lora else {})}
    return requests.post(run_url(live.url), json=body, timeout=10)


def test_lifecycle_and_restart(tmp_path):
    live = start(tmp_path)
    try:
        r = create(live, "pirate", description="talks like a pirate")
        assert r.status_code == 200, r.text
        record = r.json()["result"]
        assert r.json()["success"] is True
        assert set(record) == {"id", "name", "description", "model", "created_at", "modified_at"}
        assert str(uuid.UUID(record["id"])) == record["id"]
        assert record["name"] == "pirate" and record["model"] == MODEL
        assert record["description"] == "talks like a pirate"
        assert ISO.match(record["created_at"]) and ISO.match(record["modified_at"])
        fid = record["id"]

        # only the config so far: using it is "missing files"
        assert upload(live, fid, "adapter_config.json", CONFIG).status_code == 200
        r = generate(live, "pirate")
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == 3039
        # files cannot be replaced
        r = upload(live, fid, "adapter_config.json", CONFIG)
        assert r.status_code == 400 and "cannot be replaced" in r.json()["errors"][0]["message"]

        r = upload(live, fid, "adapter_model.safetensors", WEIGHTS)
        assert r.status_code == 200, r.text
        assert r.json()["result"]["files"] == ["adapter_config.json", "adapter_model.safetensors"]
        assert fid in live.bank.loaded  # loaded the moment both files validated, no restart

        base = generate(live).json()["result"]["response"]
        by_id = generate(live, fid).json()["result"]["response"]
        by_name = generate(live, "pirate").json()["result"]["response"]
        assert base == expected_output("Hello Adapter", 256) == "retpadA olleH"
        assert by_id == by_name == "RETPADa OLLEh" != base
        assert live.scheduler.requests[-1].adapter == fid  # the engine sees the id, whatever was asked

        listed = requests.get(finetunes_url(live), timeout=10).json()["result"]
        assert [f["id"] for f in listed] == [fid]
        models = requests.get(f"{live.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [MODEL, "pirate"] and models[1]["finetune_id"] == fid
        files = sorted(p.name for p in (tmp_path / "finetunes" / fid).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left
        assert (tmp_path / "finetunes" / fid / "adapter_model.safetensors").read_bytes() == WEIGHTS
    finally:
        live.close()

    live = start(tmp_path)  # restart: a new process would see the same
    try:
        assert fid in live.bank.loaded
        assert generate(live, "pirate").json()["result"]["response"] == "RETPADa OLLEh"
        got = requests.get(finetunes_url(live, fid), timeout=10).json()["result"]
        assert got["name"] == "pirate" and got["files"] == ["adapter_config.json", "adapter_model.safetensors"]

        r = requests.delete(finetunes_url(live, fid), timeout=10)
        assert r.status_code == 200 and r.json()["result"]["id"] == fid
        assert fid not in live.bank.loaded and not (tmp_path / "finetunes" / fid).exists()
        r = generate(live, "pirate")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == 3037
        assert requests.get(finetunes_url(live), timeout=10).json()["result"] == []
        r = requests.delete(finetunes_url(live, fid), timeout=10)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == 3037
    finally:
        live.close()

    live = start(tmp_path)
    try:
        assert live.bank.loaded == {} and requests.get(finetunes_url(live), timeout=10).json()["result"] == []
    finally:
        live.close()


@pytest.fixture
def live(tmp_path):
    server = start(tmp_path)
    yield server
    server.close()


def test_create_errors(live):
    assert create(live, "one").status_code == 200
    r = create(live, "one")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    assert "already exists" in r.json()["errors"][0]["message"]
    r = create(live, "two", model="@cf/meta/llama-3-8b-instruct")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5007
    for bad in ("", 5, None, "a/b", "x" * 129):
        r = create(live, bad)
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006, bad
    r = requests.post(finetunes_url(live), data=b"not json", timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006


def test_upload_errors_keep_nothing(live, tmp_path):
    fid = create(live, "bad").json()["result"]["id"]
    folder = tmp_path / "finetunes" / fid
    r = upload(live, str(uuid.uuid4()), "adapter_config.json", CONFIG)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == 3037
    r = upload(live, fid, "model.bin", b"x")
    assert r.status_code == 400 and "file_name must be one of" in r.json()["errors"][0]["message"]
    r = requests.post(finetunes_url(live, fid, "finetune-assets"), data={"file_name": "adapter_config.json"},
                      timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    r = upload(live, fid, "adapter_config.json", b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["errors"][0]["message"]
    r = upload(live, fid, "adapter_model.safetensors", b"\x00" * 4)
    assert r.status_code == 400 and "not a safetensors file" in r.json()["errors"][0]["message"]
    assert list(folder.iterdir()) == []

    # rank 64: the loader refuses when the pair is complete; the file that completed it is not kept
    big_rank = json.dumps({"peft_type": "LORA", "r": 64, "model_type": "gemma"}).encode()
    assert upload(live, fid, "adapter_model.safetensors", WEIGHTS).status_code == 200
    r = upload(live, fid, "adapter_config.json", big_rank)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    assert "invalid adapter: adapter rank r must be an integer in 1..32" in r.json()["errors"][0]["message"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors"]
    assert fid not in live.bank.loaded
    assert upload(live, fid, "adapter_config.json", CONFIG).status_code == 200  # a good one still can
    assert fid in live.bank.loaded


def test_seed_examples_work_with_a_finetune_of_that_name(live):
    """The seed's lora value is not a uuid, so on our server it can be a finetune *name*."""
    seed_lora = "00000000-0000-0000-0000-000000000"
    fid = create(live, seed_lora).json()["result"]["id"]
    upload(live, fid, "adapter_config.json", CONFIG)
    upload(live, fid, "adapter_model.safetensors", WEIGHTS)
    worker = requests.post(run_url(live.url), json={"prompt": "tell me a story", "raw": True, "lora": seed_lora},
                           timeout=10)
    curl = requests.post(run_url(live.url), data=('{\n"prompt": "tell me a story",\n"raw": "true",\n"lora": '
                                                  f'"{seed_lora}"\n}}').encode(),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    for r in (worker, curl):
        assert r.status_code == 200, r.text
        assert r.json()["result"]["response"] == expected_output("tell me a story", 256, adapter=True)
    assert live.scheduler.requests[-1].adapter == fid


def test_registry_is_a_real_sqlite_file(live, tmp_path):
    create(live, "persisted")
    import sqlite3

    db = sqlite3.connect(Path(tmp_path, "finetunes.sqlite3"))
    assert db.execute("SELECT name FROM finetunes").fetchall() == [("persisted",)]
    db.close()
