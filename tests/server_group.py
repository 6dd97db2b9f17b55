"""A fake-backed gunicorn server (`tests/serving_fakes.py`) in its own process group, for kill -9 tests.

`server_process` in test_serving_gunicorn.py kills only the master; these tests need "kill -9 the
server": SIGKILL to the master and its worker at once (`kill9`), and to see the worker restart after
it killed itself at a test crash point (`ready_count`). The process runs with its own TMPDIR and cwd
so a test can check that nothing is written outside the data dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_serving_gunicorn import free_port

ROOT = Path(__file__).resolve().parents[1]


def _live_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (from /proc)."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


class ServerGroup:
    def __init__(self, data_dir, *, crash_at: str | None = None, cwd=None, tmpdir=None, extra_args=(),
                 ready_timeout: float | None = 120):
        """Start the server; wait for its readiness line unless `ready_timeout` is None (then call
        `wait_for("gemma-jax ready")`: starting several at once overlaps their imports)."""
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("GEMMA_JAX_TEST_CRASH_AT", None)
        if crash_at:
            env["GEMMA_JAX_TEST_CRASH_AT"] = crash_at
        if tmpdir is not None:
            env["TMPDIR"] = str(tmpdir)
        argv = [sys.executable, str(ROOT / "tests" / "serving_fakes.py"), "--host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(data_dir), "--threads", "8", *extra_args]
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if ready_timeout is not None:
            try:
                self.wait_for("gemma-jax ready", 1, ready_timeout)
            except BaseException:
                self.kill9()
                raise

    def _drain(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` stderr lines contain `text` (e.g. a second readiness line: the worker restarted)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"no {count} x {text!r} in:\n" + "".join(self.lines)
                self._changed.wait(left)

    def kill9(self) -> None:
        """SIGKILL the whole server (gunicorn master and worker) and wait until both are gone."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _live_members(self.proc.pid):  # the worker, reparented: dead once gone or a zombie
            assert time.monotonic() < deadline, f"process group {self.proc.pid} survived SIGKILL"
            time.sleep(0.05)
        self._reader.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill9()
