"""The playground page driven in headless Chromium (Debian's `chromium`), over real HTTP.

Chromium is driven with the DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4 out,
NUL-terminated JSON), so the test needs nothing beyond the standard library and the browser. It types
a prompt, presses Run, watches the streamed text grow, checks an error is shown as the API gives it,
and saves a screenshot to test-artifacts/playground.png.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from serving.app import create_app
from serving_fakes import LiveServer, expected_output, fake_backend

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


class Browser:
    """A headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path):
        self._to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, self._from_chrome_w = os.pipe()
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"]
        # the pipe transport wants its ends on fds 3 (commands in) and 4 (replies out)
        script = f'exec "$0" "$@" 3<&{self._to_chrome_r}- 4>&{self._from_chrome_w}-'
        self.proc = subprocess.Popen(["bash", "-c", script, binary, *args],
                                     pass_fds=(self._to_chrome_r, self._from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self._to_chrome_r)
        os.close(self._from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.session = None

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 30):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                chunk = os.read(self._from_chrome_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(expression)

    def click(self, selector: str) -> None:
        box = self.eval(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                        ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def type_into(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:  # noqa: BLE001 - killing it below anyway
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome_w)
        os.close(self._from_chrome_r)


@pytest.fixture
def browser(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is required: apt-get install -y chromium"
    b = Browser(binary, tmp_path / "profile")
    yield b
    b.close()


def test_playground_streams_text_and_shows_errors(browser, tmp_path):
    backend, scheduler, _ = fake_backend(delay=0.04)
    with LiveServer(create_app(backend, data_dir=tmp_path / "data")) as live:
        browser.open(live.url + "/")
        browser.wait_for("document.readyState === 'complete' && "
                         "document.getElementById('model-name').textContent === '@hf/google/gemma-7b-it'")
        prompt = "Tell me a story about a small model that streams"
        browser.type_into("#prompt", prompt)
        browser.click("#raw")
        browser.click("#run")

        expected = expected_output(prompt, 256)
        snapshots = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = browser.eval("document.getElementById('output').textContent")
            snapshots.append(text)
            if text == expected and browser.eval("document.getElementById('status').textContent") == "done":
                break
            time.sleep(0.05)
        assert snapshots[-1] == expected, snapshots[-3:]
        partial = [s for s in snapshots if s and s != expected]
        assert partial and all(expected.startswith(s) for s in partial)  # it grew while streaming
        usage = browser.eval("document.getElementById('usage').textContent")
        assert usage == f"prompt_tokens {len(prompt) + 1} · completion_tokens {len(prompt)} · total_tokens {2 * len(prompt) + 1}"
        req = scheduler.requests[-1]
        assert req.prompt_ids == (2, *map(ord, prompt))  # raw: the text as typed, after BOS
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "playground.png")
        assert (ARTIFACTS / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # an out-of-schema value: the page shows the API's own error envelope
        browser.type_into("#top_k", "99")
        browser.click("#run")
        shown = browser.wait_for("document.getElementById('error').textContent")
        envelope = json.loads(shown)
        assert envelope["success"] is False and envelope["errors"][0]["code"] == 5006
        assert "Value of '/top_k' is 99, must be <= 50" in envelope["errors"][0]["message"]
        assert browser.eval("document.getElementById('status').textContent") == "HTTP 400"
        browser.screenshot(ARTIFACTS / "playground-error.png")
