"""Hostile finetune uploads are refused with clear errors, leave nothing behind, write nothing outside --data-dir.

Against the real gunicorn server process (fake backend, `tests/server_group.py`) started with
`--max-upload-bytes 104857600` (100 MiB, Workers AI's documented adapter limit), its own TMPDIR and
cwd inside a sandbox folder, so after every refusal the test can check: the finetune's folder holds
only what it held, `incoming/` is empty, and nothing exists in the sandbox outside the data dir.
Malformed safetensors files are also given to the safetensors library itself, the independent
reference: what it cannot read we refuse too; what it reads but we refuse (int64, NaN) is policy.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import uuid
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import requests
import safetensors
from safetensors.numpy import save as st_save

from serving.adapter_files import (MAX_CONFIG_BYTES, MAX_HEADER_BYTES, AdapterFileError, check_config,
                                   check_safetensors)
from serving.app import create_app
from raw_http import post_raw
from server_group import ServerGroup
from serving_fakes import MODEL, LiveServer, fake_backend
from test_serving_finetunes import CONFIG

LIMIT = 100 << 20
MULTIPART_LIMIT = LIMIT + (1 << 20)  # app.py: MAX_CONTENT_LENGTH = max_upload_bytes + 1 MiB of multipart
NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
GOOD = st_save({NAME: np.ones((8, 16), np.float32)})
CFG, ST = "adapter_config.json", "adapter_model.safetensors"


def raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


class Marker:
    """Unpickling this creates `path` (what a hostile pickle could do); the file must never appear."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    (root / "tmp").mkdir()
    with ServerGroup(root / "data", cwd=root, tmpdir=root / "tmp",
                     extra_args=["--max-upload-bytes", str(LIMIT)]) as server:
        server.root, server.data = root, root / "data"
        server.marker = root / "unpickled"
        yield server


def api(server, *parts):
    return "/".join([f"{server.url}/client/v4/accounts/acc/ai/finetunes", *parts])


def new_finetune(server, with_config: bool) -> str:
    fid = requests.post(api(server), json={"model": MODEL, "name": uuid.uuid4().hex}, timeout=10).json()["result"]["id"]
    if with_config:
        assert upload(server, fid, CFG, CONFIG).status_code == 200
    return fid


def upload(server, fid, file_name, content, filename=None):
    return requests.post(api(server, fid, "finetune-assets"), data={"file_name": file_name},
                         files={"file": (filename or "f", content)}, timeout=30)


def outside_data(server) -> list[str]:
    """Everything in the sandbox that is not the data dir or the (empty) TMPDIR."""
    found = []
    for dirpath, dirnames, filenames in os.walk(server.root):
        rel = Path(dirpath).relative_to(server.root)
        if rel.parts[:1] == ("data",):
            continue
        found += [str(rel / n) for n in filenames]
        found += [str(rel / n) for n in dirnames if (rel / n).parts[:1] not in (("data",), ("tmp",))]
    return found


def assert_nothing_kept(server, fid, kept):
    assert sorted(p.name for p in (server.data / "finetunes" / fid).iterdir()) == kept
    got = requests.get(api(server, fid), timeout=10).json()["result"]["files"]
    assert got == kept
    assert list((server.data / "incoming").iterdir()) == []
    assert outside_data(server) == []
    assert not server.marker.exists()


def expect_refusal(r, message, status=400, code=5006):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] == {}
    assert body["errors"] == [{"code": code, "message": message}]


def bad(reason):
    return f"AiError: Bad input: Error: adapter_model.safetensors is not a safetensors file: {reason}"


def pickle_bytes(marker):
    return pickle.dumps(Marker(marker))


def torch_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return buffer.getvalue()


NAN_BF16 = raw_safetensors({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                           np.array([1.0, np.nan], ml_dtypes.bfloat16).tobytes())
# (id, content (or a function of the marker path), expected message, the safetensors library refuses it too)
SAFETENSORS_CASES = [
    ("truncated", GOOD[:-10], bad("truncated: the tensors need 512 bytes of data, the file holds 502"), True),
    ("header-2^63", struct.pack("<Q", 1 << 63) + b"{}",
     bad(f"header length {1 << 63} is over the limit of {MAX_HEADER_BYTES} bytes"), True),
    ("header-over-100MB", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
     bad(f"header length {MAX_HEADER_BYTES + 1} is over the limit of {MAX_HEADER_BYTES} bytes"), True),
    ("header-past-end", struct.pack("<Q", 1000) + b"{}",
     bad("header length 1000 is past the end of the file (10 bytes)"), True),
    ("too-short", b"\x01\x00", bad("2 bytes is shorter than the 8-byte header length"), True),
    ("header-not-json", struct.pack("<Q", 4) + b"abcd", bad("the header is not a JSON object"), True),
    ("no-tensors", raw_safetensors({}, b""), bad("it holds no tensors"), False),
    ("overlap", raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     bad("tensor 'b' starts at byte 0, expected 8 (gap or overlap)"), True),
    ("shape-vs-offsets", raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
     bad("tensor 'a' of F32 [4] needs 16 bytes, its offsets give 8"), True),
    ("int64", st_save({"x": np.ones((2, 2), np.int64)}),
     "AiError: Bad input: Error: adapter_model.safetensors: tensor 'x' has dtype 'I64'; adapter weights must be "
     "one of F32, F16, BF16", False),
    ("unknown-dtype", raw_safetensors({"x": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"),
     "AiError: Bad input: Error: adapter_model.safetensors: tensor 'x' has dtype 'Q4_K'; adapter weights must be "
     "one of F32, F16, BF16", True),
    ("nan-f32", st_save({"x": np.array([0.0, np.nan], np.float32)}),
     "AiError: Bad input: Error: adapter_model.safetensors: tensor 'x' holds NaN or infinite values", False),
    ("inf-f16", st_save({"x": np.array([np.inf, 1.0], np.float16)}),
     "AiError: Bad input: Error: adapter_model.safetensors: tensor 'x' holds NaN or infinite values", False),
    ("nan-bf16", NAN_BF16,
     "AiError: Bad input: Error: adapter_model.safetensors: tensor 'x' holds NaN or infinite values", False),
    ("pickle-renamed", pickle_bytes,
     bad("it is a Python pickle (pickles are never loaded; save with safetensors)"), True),
    ("torch-zip", torch_zip(),
     bad("it is a zip archive such as torch.save writes (never loaded; save with safetensors)"), True),
]


@pytest.mark.parametrize("content, message, library_refuses", [c[1:] for c in SAFETENSORS_CASES],
                         ids=[c[0] for c in SAFETENSORS_CASES])
def test_hostile_safetensors_refused_and_nothing_kept(sandbox, content, message, library_refuses):
    if callable(content):
        content = content(sandbox.marker)
    if library_refuses:  # the safetensors library's own (Rust) parser
        with pytest.raises(safetensors.SafetensorError):
            safetensors.deserialize(content)
    else:
        safetensors.deserialize(content)  # readable by the library: refusing it is our policy
    fid = new_finetune(sandbox, with_config=True)
    expect_refusal(upload(sandbox, fid, ST, content), message)
    assert_nothing_kept(sandbox, fid, [CFG])
    r = requests.post(f"{sandbox.url}/client/v4/accounts/acc/ai/run/{MODEL}",
                      json={"prompt": "x", "lora": fid}, timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 3039  # still missing its weights
    assert upload(sandbox, fid, ST, GOOD).status_code == 200  # the finetune still takes a good file


class Raw(str):
    """JSON text put into a config as it is (`1e999`, a 401-digit integer): json.dumps cannot write these."""


def config_with(**fields) -> bytes:
    """The good CONFIG with `fields` set (a `Raw` value is spliced in as written)."""
    raw = {f"@raw{i}@": v for i, v in enumerate(v for v in fields.values() if isinstance(v, Raw))}
    marks = iter(raw)
    text = json.dumps({**json.loads(CONFIG), **{k: next(marks) if isinstance(v, Raw) else v
                                                for k, v in fields.items()}})
    for mark, value in raw.items():
        text = text.replace(json.dumps(mark), value)
    return text.encode()


KEY = "invalid rank_pattern / alpha_pattern key"
CONFIG_CASES = [  # (id, content, what the message says after "adapter_config.json")
    ("not-json", b"{not json", " is not valid JSON: Expecting property name enclosed in double quotes: "
                               "line 1 column 2 (char 1)"),
    ("array", b"[]", " must be a JSON object"),
    ("duplicate-key", b'{"r": 8, "r": 64}', " is not valid JSON: duplicate key 'r'"),
    ("nan-literal", b'{"r": NaN}', " is not valid JSON: the literal NaN is not allowed"),
    ("deep-nesting", b"[" * 200_000 + b"]" * 200_000, " is nested too deeply"),
    ("not-utf8", b'{"r": "\xff"}', " is not UTF-8"),
    # well-formed JSON of the wrong shape (issue 16): each was a 500 and a traceback
    ("rank-pattern-array", config_with(rank_pattern=[1]),
     ": rank_pattern must be an object of module patterns to positive integers, got array"),
    ("alpha-pattern-string", config_with(alpha_pattern="x"),
     ": alpha_pattern must be an object of module patterns to numbers, got string"),
    ("modules-to-save-int", config_with(modules_to_save=5), ": modules_to_save must be null or an array of "
                                                            "module names, got 5"),
    ("alpha-10^400", config_with(lora_alpha=Raw("1" + "0" * 400)),
     ": lora_alpha must be a finite number that fits a float, got an integer of 401 digits"),
    ("alpha-1e999", config_with(lora_alpha=Raw("1e999")),
     ": lora_alpha must be a finite number that fits a float, got infinity"),
    ("alpha--1e999", config_with(lora_alpha=Raw("-1e999")),
     ": lora_alpha must be a finite number that fits a float, got -infinity"),
    ("nested-1e999", config_with(alpha_pattern=Raw('{"q_proj": 1e999}')),
     ": alpha_pattern['q_proj'] must be a finite number that fits a float, got infinity"),
    ("rank-pattern-zero", config_with(rank_pattern={"q_proj": 0}), ": rank_pattern must be an object of module "
                                                                   "patterns to positive integers, got 0 at "
                                                                   "rank_pattern['q_proj']"),
    ("rank-8.0", config_with(r=8.0), ": r must be a positive integer, got 8.0"),
    ("key-repeat-2^32", config_with(rank_pattern={"a{4294967296}": 4}),
     f": {KEY} 'a{{4294967296}}': the repetition number is too large"),
    ("key-5000-parens", config_with(rank_pattern={"(" * 5000 + ")" * 5000: 4}),
     f": {KEY} '{'(' * 56}...: 10000 characters; the limit is 512"),
    ("key-too-long", config_with(alpha_pattern={"q" * 513: 4}),
     f": {KEY} '{'q' * 56}...: 513 characters; the limit is 512"),
    ("too-many-keys", config_with(rank_pattern={f"layers.{i}.q_proj": 4 for i in range(1025)}),
     ": rank_pattern has 1025 keys; the limit is 1024"),
    ("key-lookahead", config_with(rank_pattern={"(?=q)q_proj": 4}),
     f": {KEY} '(?=q)q_proj': RE2 cannot compile it (invalid perl operator: (?=)"),
    ("key-backreference", config_with(alpha_pattern={r"(q)\1": 4}),
     f": {KEY} '(q)\\\\1': backreference \\1 (RE2 reads it as octal; write \\x.. for a character)"),
]


@pytest.mark.parametrize("content, reason", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_refused(sandbox, content, reason):
    fid = new_finetune(sandbox, with_config=False)
    tracebacks = sandbox.count("Traceback")
    expect_refusal(upload(sandbox, fid, CFG, content), f"AiError: Bad input: Error: adapter_config.json{reason}")
    assert_nothing_kept(sandbox, fid, [])
    assert sandbox.count("Traceback") == tracebacks
    assert upload(sandbox, fid, CFG, CONFIG).status_code == 200  # the finetune still takes a good file


def test_config_over_its_limit_refused(sandbox):
    fid = new_finetune(sandbox, with_config=False)
    content = b"{" + b" " * MAX_CONFIG_BYTES + b"}"
    expect_refusal(upload(sandbox, fid, CFG, content),
                   f"AiError: Request is too large (the limit is {MAX_CONFIG_BYTES} bytes)", 413, 3006)
    assert_nothing_kept(sandbox, fid, [])


@pytest.mark.parametrize("file_name", [
    "../adapter_config.json", "../../../../tmp/adapter_config.json", "/etc/passwd", "/tmp/adapter_config.json",
    "adapter_config.json\x00", "adapter_config.json\x00../../x", "..", ".", "finetunes/../adapter_config.json",
    "adapter_model.bin", "ADAPTER_CONFIG.JSON", " adapter_config.json"])
def test_hostile_file_names_refused(sandbox, file_name):
    fid = new_finetune(sandbox, with_config=False)
    expect_refusal(upload(sandbox, fid, file_name, pickle_bytes(sandbox.marker)),
                   "AiError: Bad input: Error: file_name must be one of adapter_config.json, "
                   f"adapter_model.safetensors, got {file_name!r}")
    assert_nothing_kept(sandbox, fid, [])


def test_multipart_filename_is_never_a_path(sandbox):
    """Without a file_name field the part's own filename is the name, and it must be one of the two."""
    fid = new_finetune(sandbox, with_config=False)
    r = requests.post(api(sandbox, fid, "finetune-assets"), files={"file": ("../../escape.json", CONFIG)}, timeout=10)
    expect_refusal(r, "AiError: Bad input: Error: file_name must be one of adapter_config.json, "
                      "adapter_model.safetensors, got '../../escape.json'")
    assert_nothing_kept(sandbox, fid, [])
    for finetune in ("..%2F..%2Fescape", "%2E%2E", "..", f"{fid}%00"):  # the URL's id is looked up, never a path
        r = requests.post(api(sandbox, finetune, "finetune-assets"), data={"file_name": CFG},
                          files={"file": ("f", CONFIG)}, timeout=10)
        assert r.status_code == 404, (finetune, r.text)
    assert outside_data(sandbox) == []


def test_control_characters_in_names_refused(sandbox):
    r = requests.post(api(sandbox), json={"model": MODEL, "name": "a\x00b"}, timeout=10)
    expect_refusal(r, "AiError: Bad input: Error: name must not contain control characters")


def _raw_upload(server, fid, headers: dict, chunks) -> tuple[int, float, bytes]:
    """Send a multipart upload on a raw socket, `chunks` as they come, stopping once the server answers.
    Returns (body bytes sent, seconds until the answer, the answer)."""
    path = f"/client/v4/accounts/acc/ai/finetunes/{fid}/finetune-assets"
    return post_raw(server.port, path, {"Content-Type": "multipart/form-data; boundary=hostile", **headers}, chunks)


def _preamble():
    return (b'--hostile\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
            b'--hostile\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")


def _zeros(total: int, chunk: int = 1 << 20):
    block = b"\0" * chunk
    for _ in range(total // chunk):
        yield block


def test_200mb_upload_refused_before_the_body_is_read(sandbox):
    """Content-Length over the limit: 413 (3006) before a byte of the file is read."""
    fid = new_finetune(sandbox, with_config=True)
    size = 200 * 10**6
    sent, seconds, answer = _raw_upload(sandbox, fid, {"Content-Length": str(len(_preamble()) + size + 12)},
                                        (c for part in ([_preamble()], _zeros(size)) for c in part))
    status, body = answer.split(b"\r\n", 1)[0], json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0])
    assert status.startswith(b"HTTP/1.1 413"), answer
    assert body["errors"] == [{"code": 3006, "message": f"AiError: Request is too large (the limit is "
                                                        f"{MULTIPART_LIMIT} bytes)"}]
    assert sent <= 32 << 20, sent  # the answer came while the socket buffers still took the first MBs
    assert seconds < 2, seconds
    assert_nothing_kept(sandbox, fid, [CFG])


def test_200mb_chunked_upload_stops_at_the_limit(sandbox):
    """No Content-Length (chunked): the server reads up to the limit, answers 413, keeps nothing."""
    fid = new_finetune(sandbox, with_config=True)
    size = 200 * 10**6

    def chunked():
        yield b"%x\r\n%s\r\n" % (len(_preamble()), _preamble())
        for block in _zeros(size):
            yield b"%x\r\n%s\r\n" % (len(block), block)

    sent, seconds, answer = _raw_upload(sandbox, fid, {"Transfer-Encoding": "chunked"}, chunked())
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b'"code":3006' in answer
    assert MULTIPART_LIMIT <= sent <= MULTIPART_LIMIT + (32 << 20), sent  # the limit + socket buffers, not 200 MB
    assert_nothing_kept(sandbox, fid, [CFG])


def test_file_over_the_store_limit_inside_the_multipart_allowance(tmp_path):
    """The store's own byte count stops a file over --max-upload-bytes that the 1 MiB multipart slack let
    through (in-process server, 64 KiB limit)."""
    backend, _, bank = fake_backend()
    with LiveServer(create_app(backend, data_dir=tmp_path, max_upload_bytes=64 << 10)) as live:
        base = f"{live.url}/client/v4/accounts/acc/ai/finetunes"
        fid = requests.post(base, json={"model": MODEL, "name": "big"}, timeout=10).json()["result"]["id"]
        r = requests.post(f"{base}/{fid}/finetune-assets", data={"file_name": ST},
                          files={"file": ("f", b"\0" * ((64 << 10) + 1))}, timeout=10)
        assert r.status_code == 413 and "close" in r.headers["Connection"]
        assert r.json()["errors"] == [{"code": 3006, "message": "AiError: Request is too large (the limit is "
                                                                "65536 bytes)"}]
        assert list((tmp_path / "finetunes" / fid).iterdir()) == [] and list((tmp_path / "incoming").iterdir()) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_check_safetensors_agrees_with_the_library(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(shape).astype(dtype) for i, shape in
               enumerate([(8, 16), (16, 8), (3,), (0, 4), (2, 3, 4)])}
    path = tmp_path / ST
    path.write_bytes(st_save(tensors, metadata={"format": "pt"}))
    got = check_safetensors(path)
    with safetensors.safe_open(path, "numpy") as f:
        want = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    assert got == want and set(got) == set(tensors)
    # one NaN anywhere in a large tensor (past the first scan slice) is found
    big = np.zeros((1 << 23) + 5, dtype)
    big[-1] = np.nan
    path.write_bytes(st_save({"big": big}))
    with pytest.raises(AdapterFileError, match="'big' holds NaN"):
        check_safetensors(path)


def test_configs_peft_and_we_write_pass_the_config_checks(tmp_path):
    """The schema refuses shapes, not adapters: configs written by peft (every LoraConfig field at its
    default, and with patterns, layers and rslora set) and by our `save_adapter` pass `check_config`."""
    import peft

    from gemma_jax import config as C
    from gemma_jax.finetune import init_adapter
    from gemma_jax.weights.peft import save_adapter

    for i, options in enumerate([{}, {"r": 4, "lora_alpha": 8.5, "target_modules": ["q_proj", "v_proj"],
                                      "rank_pattern": {r"layers\.\d+\.self_attn\.q_proj": 2},
                                      "alpha_pattern": {"v_proj": 3}, "layers_to_transform": [0, 1],
                                      "layers_pattern": "layers", "use_rslora": True, "modules_to_save": None,
                                      "init_lora_weights": "gaussian", "exclude_modules": "lm_head"}]):
        peft.LoraConfig(**options).save_pretrained(tmp_path / f"peft{i}")
        assert check_config(tmp_path / f"peft{i}" / CFG)["peft_type"] == "LORA"
    ours = save_adapter(init_adapter(C.tiny_gemma3(), jax.random.key(0), rank=2), tmp_path / "ours",
                        base_model_name="google/gemma-3-270m")
    assert check_config(Path(ours) / CFG)["r"] == 2


def test_catastrophic_key_does_not_stop_a_real_server(tmp_path):
    """`.*` x 10 + `!` as a rank_pattern and alpha_pattern key, uploaded to the real serving stack (real
    engine with a LoRA bank, the real loader): /health, polled every 50 ms from another thread, answers
    each time within 0.5 s, and the upload that loads the adapter is answered within 1 s. Python's re
    took seconds per module name on this key, holding the GIL (every request stalled meanwhile)."""
    import threading
    import time

    from gemma_jax.finetune import init_adapter
    from gemma_jax.weights.peft import save_adapter
    from real_backend import make_engine, serve, tiny_model, train_tokenizer

    (tmp_path / "spm").mkdir()
    tok = train_tokenizer(tmp_path / "spm")
    config, params = tiny_model(tok)
    engine = make_engine(config, params, adapter_slots=2, adapter_rank=8)
    good = Path(save_adapter(init_adapter(config, jax.random.key(1), rank=4), tmp_path / "good",
                             base_model_name="google/gemma-7b-it"))
    redos = ".*" * 10 + "!"
    saved = json.loads((good / CFG).read_text())
    hostile = json.dumps({**saved, "rank_pattern": {redos: 4}, "alpha_pattern": {redos: 99}}).encode()
    weights = (good / ST).read_bytes()
    with serve(engine, tok, tmp_path / "data") as (server, _):
        def finetune(name):
            r = requests.post(api(server), json={"model": MODEL, "name": name}, timeout=30)
            return r.json()["result"]["id"]

        warm = finetune("warm")  # the first load compiles the bank's write: not what is measured
        assert upload(server, warm, CFG, (good / CFG).read_bytes()).status_code == 200
        assert upload(server, warm, ST, weights).status_code == 200
        fid = finetune("hostile")
        assert upload(server, fid, CFG, hostile).status_code == 200  # a valid key: RE2 runs it in linear time

        latencies, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    ok = requests.get(f"{server.url}/health", timeout=5).status_code == 200
                except requests.RequestException:
                    ok = False
                latencies.append((ok, time.perf_counter() - start))
                stop.wait(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            time.sleep(0.2)
            start = time.perf_counter()
            r = upload(server, fid, ST, weights)
            took = time.perf_counter() - start
            time.sleep(0.2)
        finally:
            stop.set()
            poller.join()
        assert r.status_code == 200, r.text
        print(f"upload {took:.3f}s; /health {len(latencies)} polls, slowest {max(t for _, t in latencies):.3f}s")
        assert took < 1.0, took
        assert len(latencies) >= 5 and all(ok and t < 0.5 for ok, t in latencies), latencies
