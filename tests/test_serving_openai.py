"""OpenAI-compatible routes over real HTTP: request/response and stream chunk shapes, adapter by model."""

from __future__ import annotations

import json

import pytest
import requests

from serving.app import create_app
from serving_fakes import MODEL, LiveServer, fake_backend

SCOPED = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    backend, scheduler, bank = fake_backend()
    server = LiveServer(create_app(backend, data_dir=tmp_path_factory.mktemp("data")))
    server.scheduler, server.backend = scheduler, backend
    # an adapter, loaded the way the finetunes route does it
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    backend.load_adapter("11111111-2222-3333-4444-555555555555", "shouty", folder)
    yield server
    server.close()


def chunks(response):
    out = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            out.append(block[6:] if block == "data: [DONE]" else json.loads(block[6:]))
    return out


def test_models_lists_base_and_adapters(live):
    r = requests.get(f"{live.url}/v1/models", timeout=10).json()
    assert r["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in r["data"]] == [
        (MODEL, "model", "gemma-jax"), ("shouty", "model", "gemma-jax")]
    assert all(isinstance(m["created"], int) for m in r["data"])


def test_chat_completion_shape(live):
    r = requests.post(f"{live.url}/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.2,
        "top_p": 0.9, "seed": 3, "frequency_penalty": -0.5, "presence_penalty": 1, "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MODEL
    text = SCOPED.format("Hi")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text[::-1][:5]},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(text) + 1, "completion_tokens": 5,
                             "total_tokens": len(text) + 6}
    s = live.scheduler.requests[-1].sampling
    assert (s.temperature, s.top_p, s.seed, s.frequency_penalty, s.presence_penalty) == (0.2, 0.9, 3, -0.5, 1.0)


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(live):
    requests.post(f"{live.url}/v1/chat/completions", timeout=10,
                  json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    req = live.scheduler.requests[-1]
    assert req.max_tokens == 2048 - len(req.prompt_ids)


def test_chat_stream_with_usage(live):
    r = requests.post(f"{live.url}/v1/chat/completions", timeout=10, json={
        "model": "shouty", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = chunks(r)
    assert events[-1] == "[DONE]"
    first, *middle, finish, usage = events[:-1]
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "shouty" for e in events[:-1])
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}] and first["usage"] is None
    expected = SCOPED.format("ab")[::-1][:3].swapcase()  # the adapter's output
    assert "".join(e["choices"][0]["delta"]["content"] for e in middle) == expected
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert live.scheduler.requests[-1].adapter == "11111111-2222-3333-4444-555555555555"


def test_completions_raw_prompt(live):
    r = requests.post(f"{live.url}/v1/completions", timeout=10, json={"model": MODEL, "prompt": ["abc"]})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "cba", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert live.scheduler.requests[-1].max_tokens == 16  # OpenAI's default for completions


def test_completions_stream_without_usage(live):
    r = requests.post(f"{live.url}/v1/completions", timeout=10,
                      json={"model": MODEL, "prompt": "xyz", "max_tokens": 2, "stream": True})
    events = chunks(r)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["z", "y", ""]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in events[0]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("body,status,code", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "5006"),
    ({"model": MODEL, "messages": []}, 400, "5006"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 6}, 400, "5006"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "5006"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "5006"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, 400, "5006"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, 413, "5021"),
    ({"model": MODEL, "messages": [{"role": "model", "content": "x"}]}, 400, "5006"),
])
def test_openai_errors_use_openai_shape(live, body, status, code):
    r = requests.post(f"{live.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["message"].startswith("AiError: ") and isinstance(err["type"], str)


def test_openai_404_route(live):
    r = requests.get(f"{live.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "7000"
