"""kill -9 during an upload and at every step of a finetune write: after restart nothing is lost or half-visible.

The server is the real gunicorn process with the fake backend (`tests/server_group.py`). A previous
run (in-process, the same `create_app`) leaves two finetunes: "alpha" complete, "beta" with only its
config. Then, for each test crash point of serving/finetunes.py (GEMMA_JAX_TEST_CRASH_AT), the
server process SIGKILLs itself at that point in the middle of a request; gunicorn starts a new
worker, which opens the store (reconcile) and reloads every complete finetune, like any restart.
What must hold after it, checked over HTTP, on disk and in the sqlite file itself:

- the records are those committed before the crash, each with exactly the files its rows name;
- a file on disk for every row (same size) and nothing else: `incoming/` empty, no stray folders;
- every complete finetune is loaded and works (the fake's adapter output: swapcased);
- an incomplete one answers 3039 (missing files), a rolled-back or deleted one 3037 (not found);
- after another kill -9 and restart, the interrupted operation succeeds when retried.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from serving.app import create_app
from serving.finetunes import CRASH_POINTS
from server_group import ServerGroup
from serving_fakes import LiveServer, expected_output, fake_backend, run_url
from test_serving_finetunes import CONFIG, WEIGHTS, create, finetunes_url, upload

CFG, ST = "adapter_config.json", "adapter_model.safetensors"
PROMPT = "Hello Adapter"
ADAPTED = expected_output(PROMPT, 256, adapter=True)


class Url:
    """What the shared helpers of test_serving_finetunes take: anything with a `url`."""

    def __init__(self, url: str):
        self.url = url


def prepare(data_dir: Path) -> dict[str, str]:
    """The previous run: 'alpha' complete, 'beta' with its config only. Returns name -> id."""
    backend, _, _ = fake_backend()
    with LiveServer(create_app(backend, data_dir=data_dir)) as live:
        ids = {name: create(live, name).json()["result"]["id"] for name in ("alpha", "beta")}
        for file_name, content in ((CFG, CONFIG), (ST, WEIGHTS)):
            assert upload(live, ids["alpha"], file_name, content).status_code == 200
        assert upload(live, ids["beta"], CFG, CONFIG).status_code == 200
    return ids


def run(url: str, lora: str) -> requests.Response:
    return requests.post(run_url(url), json={"prompt": PROMPT, "raw": True, "lora": lora}, timeout=10)


def check_consistent(url: str, data_dir: Path, expected: dict[str, list[str]], gone: tuple[str, ...]) -> None:
    """expected: name -> files, in creation order; gone: names that must not exist."""
    listed = requests.get(finetunes_url(Url(url)), timeout=10).json()["result"]
    assert [f["name"] for f in listed] == list(expected)
    ids = {f["name"]: f["id"] for f in listed}
    db = sqlite3.connect(data_dir / "finetunes.sqlite3")
    try:
        rows = db.execute("SELECT finetune_id, file_name, size FROM assets ORDER BY finetune_id, file_name").fetchall()
        assert {r[0] for r in db.execute("SELECT id FROM finetunes")} == set(ids.values())
    finally:
        db.close()
    assert sorted(p.name for p in (data_dir / "finetunes").iterdir()) == sorted(ids.values())
    assert list((data_dir / "incoming").iterdir()) == []
    on_disk = sorted((fid, p.name, p.stat().st_size) for fid in ids.values()
                     for p in (data_dir / "finetunes" / fid).iterdir())
    assert on_disk == sorted(rows)  # a complete file for every row, and no file without one
    for name, files in expected.items():
        got = requests.get(f"{url}/client/v4/accounts/acc/ai/finetunes/{ids[name]}", timeout=10).json()["result"]
        assert got["files"] == files, name
        r = run(url, name)
        if files == [CFG, ST]:
            assert r.status_code == 200 and r.json()["result"]["response"] == ADAPTED, (name, r.text)
        else:
            assert r.status_code == 400 and r.json()["errors"][0]["code"] == 3039, (name, r.text)
    for name in gone:
        r = run(url, name)
        assert r.status_code == 404 and r.json()["errors"] == [
            {"code": 3037, "message": f"AiError: Finetune not found: {name}"}], (name, r.text)


# point -> (what the crashed request does, the state it leaves: files per name, names gone)
UPLOAD_B = (lambda s, ids: upload(s, ids["beta"], ST, WEIGHTS))
OUTCOMES = {
    "finetune-row-written": (lambda s, ids: create(s, "gamma"), {"alpha": [CFG, ST], "beta": [CFG]}, ("gamma",)),
    "upload-partial": (UPLOAD_B, {"alpha": [CFG, ST], "beta": [CFG]}, ()),
    "upload-written": (UPLOAD_B, {"alpha": [CFG, ST], "beta": [CFG]}, ()),
    "asset-renamed": (UPLOAD_B, {"alpha": [CFG, ST], "beta": [CFG]}, ()),
    "asset-row-written": (UPLOAD_B, {"alpha": [CFG, ST], "beta": [CFG]}, ()),
    "asset-committed": (UPLOAD_B, {"alpha": [CFG, ST], "beta": [CFG, ST]}, ()),
    "delete-committed": (lambda s, ids: requests.delete(finetunes_url(s, ids["alpha"]), timeout=10),
                         {"beta": [CFG]}, ("alpha",)),
    "delete-moved": (lambda s, ids: requests.delete(finetunes_url(s, ids["alpha"]), timeout=10),
                     {"beta": [CFG]}, ("alpha",)),
}


def test_every_crash_point_is_tested():
    assert set(OUTCOMES) == set(CRASH_POINTS)


@pytest.fixture(scope="module")
def crash_servers(tmp_path_factory):
    """One server per crash point over its own prepared data dir, all started at once (their imports
    overlap); each is used by one test. Yields point -> (server, ids)."""
    servers = {}
    try:
        for point in OUTCOMES:
            data = tmp_path_factory.mktemp(point) / "data"
            ids = prepare(data)  # before the server opens the data dir
            servers[point] = (ServerGroup(data, crash_at=point, ready_timeout=None), ids)
        for server, _ in servers.values():
            server.wait_for("gemma-jax ready", 1, 180)
        yield servers
    finally:
        for server, _ in servers.values():
            server.kill9()


@pytest.mark.parametrize("point", list(OUTCOMES))
def test_kill9_at_crash_point(crash_servers, point):
    server, ids = crash_servers[point]
    data = server.data_dir
    trigger, expected, gone = OUTCOMES[point]
    with server:
        with pytest.raises(requests.ConnectionError):  # the server died mid-request
            trigger(server, ids)
        server.wait_for(f"gemma-jax test crash point {point}: SIGKILL")
        server.wait_for("gemma-jax ready", 2)  # gunicorn started a new worker: it reconciled and reloaded
        check_consistent(server.url, data, expected, gone)
    # kill -9 the whole server; restart (in-process this time) and finish what was interrupted
    backend, _, bank = fake_backend()
    with LiveServer(create_app(backend, data_dir=data)) as live:
        check_consistent(live.url, data, expected, gone)
        if "gamma" in gone:
            assert create(live, "gamma").status_code == 200
            expected = {**expected, "gamma": []}
        elif expected["beta"] == [CFG]:
            assert upload(live, ids["beta"], ST, WEIGHTS).status_code == 200
            expected = {**expected, "beta": [CFG, ST]}
        if "alpha" not in gone:
            assert ids["alpha"] in bank.loaded
        check_consistent(live.url, data, expected, tuple(n for n in gone if n != "gamma"))


def test_kill9_mid_upload_body(tmp_path):
    """A client is half-way through sending a 20 MB upload when the server is killed (master and worker):
    after a real restart the upload left no trace, inside or outside the data dir, and can be retried."""
    data, spool = tmp_path / "data", tmp_path / "tmp"
    spool.mkdir()
    ids = prepare(data)
    with ServerGroup(data, cwd=tmp_path, tmpdir=spool) as server:
        preamble = (b'--b\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
                    b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n')
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST /client/v4/accounts/acc/ai/finetunes/{ids['beta']}/finetune-assets HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     f"Content-Length: {len(preamble) + 20_000_000 + 8}\r\n\r\n".encode() + preamble)
        for _ in range(4):  # 4 MB of the 20, slowly
            sock.sendall(b"\0" * 1_000_000)
            time.sleep(0.1)
        server.kill9()
        sock.close()
    assert list(spool.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tmp"]
    with ServerGroup(data) as server:
        check_consistent(server.url, data, {"alpha": [CFG, ST], "beta": [CFG]}, ())
        assert upload(Url(server.url), ids["beta"], ST, WEIGHTS).status_code == 200
        check_consistent(server.url, data, {"alpha": [CFG, ST], "beta": [CFG, ST]}, ())


def test_reconcile_by_hand(tmp_path):
    """Debris of every kind made by hand (old layouts too) is removed when a store opens; nothing outside
    the data dir is touched, even through a link; rows whose file is missing or short are dropped."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    ids = prepare(data)
    alpha, beta = data / "finetunes" / ids["alpha"], data / "finetunes" / ids["beta"]
    debris = [data / "incoming" / "upload-x.adapter_model.safetensors.part",  # an unfinished upload
              data / "finetunes" / f".deleted-{ids['alpha']}-1234abcd" / ST,  # the old layout's trash
              beta / ".adapter_model.safetensors.abc.tmp",  # the old layout's temp file
              beta / ST,  # renamed into place, row never committed
              data / "finetunes" / "3f1e5b0e-0000-4000-8000-000000000000" / CFG]  # a folder no row names
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    (data / "finetunes" / "link").symlink_to(outside, target_is_directory=True)
    (beta / "escape").symlink_to(outside / "keep.txt")
    db = sqlite3.connect(data / "finetunes.sqlite3")
    with db:  # a row whose id is a path: never followed
        db.execute("INSERT INTO finetunes VALUES ('../../outside', 'evil', 'm', '', 't', 't')")
        db.execute("INSERT INTO assets VALUES ('../../outside', 'keep.txt', 8, 't')")
    db.close()
    (alpha / ST).write_bytes((alpha / ST).read_bytes()[:-4])  # a committed file cut short

    backend, _, bank = fake_backend()
    with LiveServer(create_app(backend, data_dir=data)) as live:
        assert not any(p.exists() for p in debris)
        assert (outside / "keep.txt").read_text() == "not ours" and sorted(p.name for p in outside.iterdir()) == [
            "keep.txt"]
        assert sorted(p.name for p in (data / "finetunes").iterdir()) == sorted(ids.values())
        assert sorted(p.name for p in alpha.iterdir()) == [CFG] and sorted(p.name for p in beta.iterdir()) == [CFG]
        assert bank.loaded == {}  # alpha lost its weights: not loaded, 3039 until uploaded again
        for name in ("alpha", "beta"):
            r = run(live.url, name)
            assert r.status_code == 400 and r.json()["errors"][0]["code"] == 3039
        assert upload(live, ids["alpha"], ST, WEIGHTS).status_code == 200
        assert run(live.url, "alpha").json()["result"]["response"] == ADAPTED
