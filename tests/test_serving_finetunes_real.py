"""Finetunes through HTTP against the REAL engine with its LoRA bank (not the fake bank).

The adapters are written by peft itself: `peft.get_peft_model(..., init_lora_weights=False)` on the
transformers GemmaForCausalLM with our tiny config (`hf_reference.py`), `save_pretrained`, plus the
`model_type` Workers AI requires. The stack is what `gemma-jax serve` builds
(`serving.factory.make_backend` over an Engine with a LoRA bank; `tests/real_backend.py`). The
reference for a request with `lora` is independent of the bank's per-row deltas: the adapter merged
into the weights (`gemma_jax.lora.merge_lora`) and a plain greedy loop over the full forward
(`engine_reference.naive_greedy`).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from engine_reference import naive_greedy
from gemma_jax.lora import LoraError, merge_lora
from gemma_jax.weights.peft import load_adapter
from hf_reference import random_hf_gemma
from real_backend import make_engine, serve, tiny_model, train_tokenizer
from serving_fakes import MODEL, run_url
from test_lora import _peft_adapter
from test_serving_finetunes import create, finetunes_url, upload

MAX_RANK = 8
MAX_TOKENS = 12
PROMPT = "hello world"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """tokenizer, config, params, an engine with a 2-slot rank-8 LoRA bank, and peft adapter dirs."""
    tok = train_tokenizer(tmp_path_factory.mktemp("spm"))
    config, params = tiny_model(tok)
    engine = make_engine(config, params, adapter_slots=2, adapter_rank=MAX_RANK)
    hf = random_hf_gemma(config)
    adapters = {}
    for name, r, alpha, seed in (("pirate", 4, 8, 1), ("poet", 8, 8, 2), ("too-big", 16, 16, 3)):
        directory = tmp_path_factory.mktemp(name)
        _peft_adapter(hf, directory, r=r, alpha=alpha, seed=seed, model_type="gemma")
        adapters[name] = directory
    return tok, config, params, engine, adapters


def greedy_text(tok, config, params, ids) -> tuple[str, int]:
    drawn = naive_greedy(config, params, [ids], MAX_TOKENS)[0]
    return tok.decode([i for i in drawn if i not in config.stop_ids]), len(drawn)


def run(server, lora=None, **extra):
    body = {"prompt": PROMPT, "raw": True, "temperature": 0, "max_tokens": MAX_TOKENS,
            **({"lora": lora} if lora is not None else {}), **extra}
    return requests.post(run_url(server.url), json=body, timeout=120)


def upload_dir(server, finetune_id, directory, files=FILES):
    for file_name in files:
        r = upload(server, finetune_id, file_name, (Path(directory) / file_name).read_bytes())
        assert r.status_code == 200, r.text
    return r


def test_lifecycle_against_merged_weights_and_restart(real, tmp_path):
    tok, config, params, engine, adapters = real
    ids = tok.encode(PROMPT)
    base_text, _ = greedy_text(tok, config, params, ids)
    want = {name: greedy_text(tok, config, merge_lora(params, load_adapter(adapters[name], config)), ids)
            for name in ("pirate", "poet")}
    assert len({base_text, want["pirate"][0], want["poet"][0]}) == 3  # the adapters change the output

    with serve(engine, tok, tmp_path) as (server, backend):
        assert run(server).json()["result"]["response"] == base_text
        records = {}
        for name in ("pirate", "poet"):
            r = create(server, name, description=f"talks like a {name}")
            assert r.status_code == 200, r.text
            records[name] = r.json()["result"]
            assert str(uuid.UUID(records[name]["id"])) == records[name]["id"]
            r = upload_dir(server, records[name]["id"], adapters[name])
            assert r.json()["result"]["files"] == list(FILES)
        pirate, poet = records["pirate"]["id"], records["poet"]["id"]
        assert set(engine.adapters()) == {pirate, poet}  # in the bank the moment both files validated

        for lora in (pirate, "pirate"):  # by id and by name
            r = run(server, lora)
            assert r.status_code == 200, r.text
            text, n = want["pirate"]
            assert r.json()["result"] == {"response": text, "usage": {
                "prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}
        assert run(server, "poet").json()["result"]["response"] == want["poet"][0]
        r = run(server, "pirate", stream=True)
        events = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: ") and b != "data: [DONE]"]
        assert "".join(e["response"] for e in events) == want["pirate"][0]
        r = requests.post(f"{server.url}/v1/completions", timeout=120,  # OpenAI: the adapter is the model
                          json={"model": "poet", "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS})
        assert r.json()["choices"][0]["text"] == want["poet"][0]

        listed = requests.get(finetunes_url(server), timeout=10).json()["result"]
        assert [(f["id"], f["name"], f["model"]) for f in listed] == [(pirate, "pirate", MODEL), (poet, "poet", MODEL)]

        r = requests.delete(finetunes_url(server, pirate), timeout=10)
        assert r.status_code == 200 and r.json()["result"]["id"] == pirate
        assert set(engine.adapters()) == {poet} and not (tmp_path / "finetunes" / pirate).exists()
        for lora in (pirate, "pirate"):
            r = run(server, lora)
            assert r.status_code == 404, r.text
            assert r.json()["errors"] == [{"code": 3037, "message": f"AiError: Finetune not found: {lora}"}]
        assert run(server, "poet").json()["result"]["response"] == want["poet"][0]
    assert engine.adapters() == {}  # a stopped backend gives its adapters back to the engine's bank

    # restart: a new app, backend and scheduler over the same engine and data_dir reload from the files
    with serve(engine, tok, tmp_path) as (server, backend):
        assert engine.adapters().keys() == {poet} and backend.adapters() == {poet: "poet"}
        assert [f["name"] for f in requests.get(finetunes_url(server), timeout=10).json()["result"]] == ["poet"]
        for lora in (poet, "poet"):
            assert run(server, lora).json()["result"]["response"] == want["poet"][0]
        assert run(server).json()["result"]["response"] == base_text
        r = run(server, "pirate")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == 3037


def test_refused_adapters_are_not_kept(real, tmp_path):
    tok, config, params, engine, adapters = real
    with pytest.raises(LoraError) as loader:  # the loader's own words for a rank above the bank's
        load_adapter(adapters["too-big"], config, max_rank=MAX_RANK)
    assert str(loader.value) == f"adapter rank r=16 exceeds the maximum rank {MAX_RANK}"

    with serve(engine, tok, tmp_path) as (server, backend):
        fid = create(server, "too-big").json()["result"]["id"]
        folder = tmp_path / "finetunes" / fid
        upload_dir(server, fid, adapters["too-big"], files=["adapter_model.safetensors"])
        r = upload(server, fid, "adapter_config.json", (adapters["too-big"] / "adapter_config.json").read_bytes())
        assert r.status_code == 400
        assert r.json() == {"result": {}, "success": False, "messages": [], "errors": [{
            "code": 5006, "message": f"AiError: Bad input: Error: invalid adapter: {loader.value}"}]}
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors"]  # no config, no temp file
        got = requests.get(finetunes_url(server, fid), timeout=10).json()["result"]
        assert got["files"] == ["adapter_model.safetensors"]
        assert engine.adapters() == {}
        r = run(server, "too-big")
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == 3039

        # Workers AI requires model_type: peft does not write it, so a bare peft config is refused
        fid = create(server, "no-model-type").json()["result"]["id"]
        bare = json.loads((adapters["poet"] / "adapter_config.json").read_text())
        del bare["model_type"]
        upload_dir(server, fid, adapters["poet"], files=["adapter_model.safetensors"])
        r = upload(server, fid, "adapter_config.json", json.dumps(bare).encode())
        assert r.status_code == 400
        assert r.json()["errors"][0]["message"] == (
            "AiError: Bad input: Error: invalid adapter: adapter_config.json must give model_type ('gemma')")
        assert sorted(p.name for p in (tmp_path / "finetunes" / fid).iterdir()) == ["adapter_model.safetensors"]

        # a header that is a JSON object but not safetensors' layout: the client's error (400), never a 500;
        # serving/adapter_files.py refuses it before the loader opens it
        fid = create(server, "bad-header").json()["result"]["id"]
        upload_dir(server, fid, adapters["poet"], files=["adapter_config.json"])
        header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": 5}).encode()
        r = upload(server, fid, "adapter_model.safetensors", len(header).to_bytes(8, "little") + header)
        assert r.status_code == 400, r.text
        assert r.json()["errors"][0]["message"] == (
            "AiError: Bad input: Error: adapter_model.safetensors is not a safetensors file: tensor "
            "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' must have exactly dtype, shape "
            "and data_offsets")
        assert sorted(p.name for p in (tmp_path / "finetunes" / fid).iterdir()) == ["adapter_config.json"]
        assert engine.adapters() == {}


def test_a_full_bank_is_a_capacity_answer_and_nothing_is_kept(real, tmp_path):
    """Every LoRA slot taken: a valid third adapter gets 429 / 3040 (capacity), not 5006 (bad input);
    its completing file is not kept; once a finetune is deleted the same upload succeeds and serves
    the adapter's merged-weights output."""
    tok, config, params, engine, adapters = real
    ids = tok.encode(PROMPT)
    want = greedy_text(tok, config, merge_lora(params, load_adapter(adapters["poet"], config)), ids)[0]
    with serve(engine, tok, tmp_path) as (server, backend):
        held = {}
        for name in ("pirate", "poet"):  # the engine's two slots
            held[name] = create(server, name).json()["result"]["id"]
            upload_dir(server, held[name], adapters[name])
        third = create(server, "third").json()["result"]["id"]
        upload_dir(server, third, adapters["poet"], files=["adapter_model.safetensors"])
        config_bytes = (adapters["poet"] / "adapter_config.json").read_bytes()
        r = upload(server, third, "adapter_config.json", config_bytes)
        assert r.status_code == 429, r.text
        [error] = r.json()["errors"]
        assert error["code"] == 3040 and r.json()["success"] is False
        assert error["message"] == ("AiError: Capacity temporarily exceeded: the adapter bank is full (2 adapters "
                                    "loaded); delete a finetune, or start the server with more --lora-slots")
        assert sorted(p.name for p in (tmp_path / "finetunes" / third).iterdir()) == ["adapter_model.safetensors"]
        assert set(engine.adapters()) == set(held.values())
        assert run(server, "third").json()["errors"][0]["code"] == 3039  # still incomplete

        r = requests.delete(finetunes_url(server, held["pirate"]), timeout=10)
        assert r.status_code == 200, r.text
        assert upload(server, third, "adapter_config.json", config_bytes).status_code == 200
        assert run(server, "third").json()["result"]["response"] == want
    assert engine.adapters() == {}
