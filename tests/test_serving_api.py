"""Workers AI run route over real HTTP on 127.0.0.1, against the hand-computable fake backend.

Expected answers are written out by hand from the fake's rules (tests/serving_fakes.py: one token per
character, BOS = id 2, output = prompt text reversed and cut to max_tokens) and from Workers AI's
published schema, envelope and error codes.
"""

from __future__ import annotations

import json

import pytest
import requests

from gemma_jax.engine.api import SamplingParams
from serving_fakes import MODEL, LiveServer, expected_output, fake_backend, run_url

TOKEN = "s3cret-token"
SCOPED = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"  # Gemma's one-turn template
ONEOF0 = "AiError: Bad input: Error: oneOf at '/' not met, 0 matches: "


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backend, scheduler, _ = fake_backend()
    from serving.app import create_app

    app = create_app(backend, data_dir=tmp_path_factory.mktemp("data"), max_body_bytes=64 * 1024)
    with LiveServer(app) as live:
        live.scheduler = scheduler
        yield live


def post(server, body, **kw):
    return requests.post(run_url(server.url), json=body, timeout=30, **kw)


def assert_error(r, status, code, message=None, contains=()):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"result", "success", "errors", "messages"}
    assert body["result"] == {} and body["success"] is False and body["messages"] == []
    assert len(body["errors"]) == 1 and body["errors"][0]["code"] == code
    got = body["errors"][0]["message"]
    assert got.startswith("AiError: ")
    if message is not None:
        assert got == message
    for part in contains:
        assert part in got, got


# -- success shapes -----------------------------------------------------------------------------------
def test_raw_prompt_answer_and_usage(server):
    r = post(server, {"prompt": "hello world", "raw": True})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"result": {"response": "dlrow olleh",
                                   "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23}},
                        "success": True, "errors": [], "messages": []}
    assert server.scheduler.requests[-1].prompt_ids == (2, *map(ord, "hello world"))


def test_prompt_gets_default_scoped_prompt(server):
    r = post(server, {"prompt": "hi", "max_tokens": 500})
    text = SCOPED.format("hi")
    assert server.scheduler.requests[-1].prompt_ids == (2, *map(ord, text))
    assert r.json()["result"]["response"] == text[::-1]
    assert r.json()["result"]["usage"]["prompt_tokens"] == len(text) + 1


def test_messages_use_chat_template_with_system_folded(server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]
    r = post(server, {"messages": msgs, "max_tokens": 1000})
    assert r.status_code == 200, r.text
    text = ("<start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nhi<end_of_turn>\n"
            "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    assert server.scheduler.requests[-1].prompt_ids == (2, *map(ord, text))


def test_bad_role_order_is_bad_input(server):
    r = post(server, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert_error(r, 400, 5006, contains=["AiError: Bad input: Error: messages:", "alternate"])


def test_every_sampling_parameter_reaches_the_engine(server):
    body = {"prompt": "abc", "raw": True, "max_tokens": 2, "temperature": 0, "top_p": 2, "top_k": 5.0,
            "seed": 9999999999, "repetition_penalty": 0, "frequency_penalty": 2, "presence_penalty": 0.5}
    r = post(server, body)
    assert r.status_code == 200 and r.json()["result"]["response"] == "cb"
    req = server.scheduler.requests[-1]
    assert req.max_tokens == 2 and req.adapter is None
    assert req.sampling == SamplingParams(temperature=0.0, top_p=2.0, top_k=5, seed=9999999999,
                                          repetition_penalty=0.0, frequency_penalty=2.0, presence_penalty=0.5)
    assert type(req.sampling.top_k) is int and type(req.sampling.temperature) is float


def test_defaults_are_workers_ai_defaults(server):
    post(server, {"prompt": "x", "raw": True})
    req = server.scheduler.requests[-1]
    assert req.max_tokens == 256 and req.sampling == SamplingParams()


@pytest.mark.parametrize("edge", [{"temperature": 5}, {"top_p": 0}, {"top_k": 50}, {"top_k": 1}, {"seed": 1},
                                  {"max_tokens": 1}, {"presence_penalty": 2}, {"stream": False},
                                  {"raw": False}, {"unknown_field": [1, 2]}])
def test_schema_edge_values_are_served(server, edge):
    r = post(server, {"prompt": "ok", "raw": True, **edge})
    assert r.status_code == 200, r.text


def test_utf8_round_trip(server):
    r = post(server, {"prompt": "héllo 🌍 日本", "raw": True})
    assert r.json()["result"]["response"] == "本日 🌍 olléh"


# -- the bad-input table --------------------------------------------------------------------------
TYPE_CASES = [
    ({"prompt": 5}, "Type mismatch of '/prompt', 'integer' not in 'string'"),
    ({"prompt": "x", "temperature": "hot"}, "Type mismatch of '/temperature', 'string' not in 'number'"),
    ({"prompt": "x", "stream": "yes"}, "Type mismatch of '/stream', 'string' not in 'boolean'"),
    ({"prompt": "x", "raw": 1}, "Type mismatch of '/raw', 'integer' not in 'boolean'"),
    ({"prompt": "x", "max_tokens": 1.5}, "Type mismatch of '/max_tokens', 'number' not in 'integer'"),
    ({"prompt": "x", "max_tokens": "10"}, "Type mismatch of '/max_tokens', 'string' not in 'integer'"),
    ({"prompt": "x", "top_k": 2.5}, "Type mismatch of '/top_k', 'number' not in 'integer'"),
    ({"prompt": "x", "seed": True}, "Type mismatch of '/seed', 'boolean' not in 'integer'"),
    ({"prompt": "x", "lora": 7}, "Type mismatch of '/lora', 'integer' not in 'string'"),
    ({"prompt": None}, "Type mismatch of '/prompt', 'null' not in 'string'"),
]


@pytest.mark.parametrize("body,detail", TYPE_CASES)
def test_wrong_types(server, body, detail):
    r = post(server, body)
    assert_error(r, 400, 5006, contains=[ONEOF0, detail])


RANGE_CASES = [
    ("temperature", -0.1, ">= 0"), ("temperature", 5.01, "<= 5"),
    ("top_p", -1, ">= 0"), ("top_p", 2.5, "<= 2"),
    ("top_k", 0, ">= 1"), ("top_k", 51, "<= 50"),
    ("seed", 0, ">= 1"), ("seed", 10000000000, "<= 9999999999"),
    ("repetition_penalty", -0.5, ">= 0"), ("repetition_penalty", 2.01, "<= 2"),
    ("frequency_penalty", -1, ">= 0"), ("frequency_penalty", 3, "<= 2"),
    ("presence_penalty", -2, ">= 0"), ("presence_penalty", 2.1, "<= 2"),
]


@pytest.mark.parametrize("key,value,bound", RANGE_CASES)
def test_out_of_range_values(server, key, value, bound):
    r = post(server, {"prompt": "x", key: value})
    # both branches of oneOf fail on the value (named once), the messages branch also on `required`
    detail = f"Value of '/{key}' is {value}, must be {bound}"
    assert_error(r, 400, 5006, message=f"{ONEOF0}{detail}, required properties at '/' are 'messages'")


def test_missing_prompt_exact_message(server):
    assert_error(post(server, {}), 400, 5006, message=(
        ONEOF0 + "required properties at '/' are 'prompt', required properties at '/' are 'messages'"))


def test_both_prompt_and_messages(server):
    r = post(server, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert_error(r, 400, 5006, message="AiError: Bad input: Error: oneOf at '/' not met, 2 matches")


def test_prompt_length_limits(server):
    assert_error(post(server, {"prompt": "a" * 6145}), 400, 5006,
                 contains=[ONEOF0, "Length of '/prompt' is 6145, must be <= 6144"])
    assert_error(post(server, {"prompt": ""}), 400, 5006, contains=["Length of '/prompt' is 0, must be >= 1"])
    msgs = [{"role": "user", "content": "a" * 6145}]
    assert_error(post(server, {"messages": msgs}), 400, 5006,
                 contains=["Length of '/messages/0/content' is 6145, must be <= 6144"])


def test_message_items_shape(server):
    r = post(server, {"messages": [{"role": "user"}, 3]})
    assert_error(r, 400, 5006, message=(
        ONEOF0 + "required properties at '/' are 'prompt', required properties at '/messages/0' are "
        "'role,content', Type mismatch of '/messages/1', 'integer' not in 'object'"))


def test_6144_chars_is_schema_valid_but_over_the_token_limit(server):
    r = post(server, {"prompt": "a" * 6144, "raw": True})
    assert_error(r, 413, 5021, contains=["6145 input tokens (at most 1512)"])


def test_1513_token_prompt_is_refused_with_counts(server):
    r = post(server, {"prompt": "a" * 1512, "raw": True})  # 1512 chars + BOS = 1513 tokens
    assert_error(r, 413, 5021, message=(
        "AiError: The estimated number of input and maximum output tokens (1769) exceeded this model context "
        "window limit: 1513 input tokens (at most 1512) + 256 max_tokens (input + max_tokens at most 2048)"))
    ok = post(server, {"prompt": "a" * 1511, "raw": True, "max_tokens": 1})  # 1512 tokens: allowed
    assert ok.status_code == 200


def test_prompt_plus_max_tokens_over_total(server):
    r = post(server, {"prompt": "a" * 999, "raw": True, "max_tokens": 1049})  # 1000 + 1049 = 2049
    assert_error(r, 413, 5021, contains=["(2049)", "1000 input tokens", "1049 max_tokens"])
    assert post(server, {"prompt": "a" * 999, "raw": True, "max_tokens": 1048}).status_code == 200
    huge = post(server, {"prompt": "a", "max_tokens": 10**15})
    assert_error(huge, 413, 5021)


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_max_tokens(server, value):
    assert_error(post(server, {"prompt": "x", "max_tokens": value}), 400, 5006,
                 message=f"AiError: Bad input: Error: max_tokens must be positive, got {value}")


def test_unknown_lora(server):
    assert_error(post(server, {"prompt": "x", "lora": "no-such-adapter"}), 404, 3037,
                 message="AiError: Finetune not found: no-such-adapter")


def test_unknown_model(server):
    r = requests.post(run_url(server.url, "@cf/meta/llama-3-8b-instruct"), json={"prompt": "x"}, timeout=10)
    assert_error(r, 400, 5007, message="AiError: No such model @cf/meta/llama-3-8b-instruct or task")


@pytest.mark.parametrize("data", [b"{bad", b"", b'{"prompt": "x", "temperature": NaN}',
                                  b'{"prompt": "x", "top_p": Infinity}', b"\xff\xfe{}"])
def test_invalid_json(server, data):
    r = requests.post(run_url(server.url), data=data, headers={"Content-Type": "application/json"}, timeout=10)
    assert_error(r, 400, 5006, contains=["AiError: Bad input: Error: invalid JSON body: "])


def test_non_object_body(server):
    r = post(server, ["prompt"])
    assert_error(r, 400, 5006, contains=["Type mismatch of '/', 'array' not in 'object'"])


def test_huge_body(server):
    r = requests.post(run_url(server.url), data=b'{"prompt": "' + b"a" * 200_000 + b'"}', timeout=10)
    assert_error(r, 413, 3006, message="AiError: Request is too large (the limit is 65536 bytes)")


def test_unknown_route_and_wrong_method(server):
    assert_error(requests.get(f"{server.url}/client/v4/nothing", timeout=10), 404, 7000,
                 message="AiError: No route for that URI")
    assert_error(requests.get(run_url(server.url), timeout=10), 405, 7001,
                 message="AiError: Method GET not allowed for this route")
    assert_error(requests.put(f"{server.url}/client/v4/accounts/a/ai/finetunes", timeout=10), 405, 7001)


# -- the seed's own examples --------------------------------------------------------------------------
SEED_LORA = "00000000-0000-0000-0000-000000000"
SEED_CURL_BODY = ('{\n"prompt": "tell me a story",\n"raw": "true",\n"lora": "00000000-0000-0000-0000-000000000"\n}')


def test_seed_examples_with_unknown_lora_get_3037(server):
    worker = {"prompt": "tell me a story", "raw": True, "lora": SEED_LORA}  # env.AI.run(...) body
    assert_error(post(server, worker), 404, 3037, message=f"AiError: Finetune not found: {SEED_LORA}")
    # curl -d sends the text as written, as application/x-www-form-urlencoded
    r = requests.post(run_url(server.url), data=SEED_CURL_BODY.encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert_error(r, 404, 3037, message=f"AiError: Finetune not found: {SEED_LORA}")


def test_seed_curl_raw_string_is_coerced(server):
    body = json.loads(SEED_CURL_BODY)
    del body["lora"]
    r = post(server, body)
    assert r.status_code == 200
    assert r.json()["result"]["response"] == expected_output("tell me a story", 256)  # raw: no template
    assert server.scheduler.requests[-1].prompt_ids == (2, *map(ord, "tell me a story"))
    r = post(server, {"prompt": "x", "raw": "yes"})
    assert_error(r, 400, 5006, contains=["Type mismatch of '/raw', 'string' not in 'boolean'"])


# -- auth, capacity, timeout, failures ------------------------------------------------------------
def test_bearer_token(tmp_path):
    backend, _, _ = fake_backend()
    from serving.app import create_app

    with LiveServer(create_app(backend, api_token=TOKEN, data_dir=tmp_path)) as live:
        url = run_url(live.url)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            assert_error(requests.post(url, json={"prompt": "x"}, headers=headers, timeout=10), 401, 10000,
                         message="AiError: Authentication error")
        ok = requests.post(url, json={"prompt": "x"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert ok.status_code == 200
        assert requests.get(f"{live.url}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"{live.url}/client/v4/accounts/a/ai/finetunes", timeout=10).status_code == 401
        # auth comes before routing: no probing of routes without a token
        assert_error(requests.get(f"{live.url}/client/v4/nothing", timeout=10), 401, 10000)
        for open_path in ("/health", "/metrics", "/"):
            assert requests.get(live.url + open_path, timeout=10).status_code == 200


def test_queue_full_is_3040(tmp_path):
    backend, _, _ = fake_backend(full=True)
    from serving.app import create_app

    with LiveServer(create_app(backend, data_dir=tmp_path)) as live:
        assert_error(requests.post(run_url(live.url), json={"prompt": "x"}, timeout=10), 429, 3040)
        assert_error(requests.post(run_url(live.url), json={"prompt": "x", "stream": True}, timeout=10), 429, 3040)


def test_timeout_is_3007_and_cancels(tmp_path):
    backend, scheduler, _ = fake_backend(delay=0.1)
    from serving.app import create_app

    with LiveServer(create_app(backend, data_dir=tmp_path, request_timeout=0.35)) as live:
        r = requests.post(run_url(live.url), json={"prompt": "abcdefghijklmnop", "raw": True}, timeout=10)
        assert_error(r, 408, 3007, message="AiError: Request timeout")
        assert scheduler.handles[-1].cancelled.wait(2)


def test_engine_failure_is_an_internal_error(tmp_path):
    backend, _, _ = fake_backend(fail_after=2)
    from serving.app import create_app

    with LiveServer(create_app(backend, data_dir=tmp_path)) as live:
        r = requests.post(run_url(live.url), json={"prompt": "abcdef", "raw": True}, timeout=10)
        assert_error(r, 500, 3043, message="AiError: Internal server error: fake failure mid-generation")


def test_health_and_metrics(server):
    post(server, {"prompt": "abc", "raw": True})
    post(server, {})
    h = requests.get(f"{server.url}/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["scheduler"]["slots"] == 4
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    route = "/client/v4/accounts/<account_id>/ai/run/<path:model>"
    for needle in (f'gemma_jax_http_requests_total{{method="POST",route="{route}",status="200"}}',
                   f'gemma_jax_http_requests_total{{method="POST",route="{route}",status="400"}}',
                   "gemma_jax_scheduler_queue_depth 0.0", "gemma_jax_scheduler_active_slots 0.0",
                   "gemma_jax_scheduler_slots 4.0", "gemma_jax_time_to_first_token_seconds_count",
                   "gemma_jax_inter_token_latency_seconds_bucket", "gemma_jax_generated_tokens_total"):
        assert needle in text, needle
    assert "X-Request-Id" in requests.get(f"{server.url}/health", timeout=10).headers


def test_fields_the_schema_does_not_name_are_ignored_not_range_checked(server):
    """The run route reads only the seed schema's fields (Workers AI ignores others): an OpenAI-style
    `n` or `max_completion_tokens` riding along is not refused by the numeric rule the OpenAI routes apply."""
    r = post(server, {"prompt": "x", "max_tokens": 3, "n": 2, "max_completion_tokens": "many"})
    assert r.status_code == 200, r.text
    assert_error(post(server, {"prompt": "x", "top_k": 2**31}), 400, 5006,
                 contains=["Value of '/top_k' is 2147483648, must be <= 50"])
