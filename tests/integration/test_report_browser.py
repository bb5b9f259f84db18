"""Open reports in headless Chromium: they render, log no error and request nothing but the file itself.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: NUL-terminated JSON
messages on file descriptors 3 and 4), so no driver package or browser download is needed. Debian's ``chromium``
(which ``.ci/run`` installs where it can) or any Chromium named by ``MEMTUNE_CHROMIUM`` will do; without one the
test is skipped.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memtune.report import write_index
from memtune.reporting import plan_report, write_report
from tests.conftest import ASSETS
from tests.unit.test_report_escaping import EVIL, evil_plan_result

CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
              "chrome", "headless_shell")
TIMEOUT_S = 20


def find_chromium() -> str | None:
    for name in (os.environ.get("MEMTUNE_CHROMIUM"), *CANDIDATES):
        if not name:
            continue
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions and browser log entries of level error."""
    screenshot: bytes = b""
    pdf: bytes = b""
    checks: dict = field(default_factory=dict)


class Chromium:
    """One headless Chromium process, driven over its DevTools pipe."""

    def __init__(self, executable: str, profile: Path):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def wire_fds():  # in the child: the browser reads commands on fd 3 and answers on fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
             "--hide-scrollbars", "--window-size=1280,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self.events = b"", 0, []

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(TIMEOUT_S)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def visit(self, url: str, *, evaluate: dict[str, str] | None = None) -> PageVisit:
        """Load ``url`` in a new tab, wait for the load event and a quiet moment, and record what happened."""
        self.events = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                      for e in self.events):
            self.events.append(self._receive(max(0.1, deadline - time.monotonic())))
        try:  # late requests or errors would show up now
            while True:
                self.events.append(self._receive(0.5))
        except TimeoutError:
            pass
        visit = PageVisit()
        for name, expression in (evaluate or {}).items():
            result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            visit.checks[name] = result["result"].get("value")
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        visit.screenshot = base64.b64decode(shot["data"])
        visit.pdf = base64.b64decode(self.call("Page.printToPDF", {"printBackground": False}, session=session)["data"])
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            method, p = e.get("method"), e.get("params", {})
            if method == "Network.requestWillBeSent":
                visit.requests.append(p["request"]["url"])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                visit.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                           for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                visit.errors.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                visit.errors.append("log: " + p["entry"].get("text", ""))
        self.call("Target.closeTarget", {"targetId": target})
        return visit


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium executable found (install Debian's `chromium`, as .ci/run does, or set "
                    "MEMTUNE_CHROMIUM): the reports were not opened in a browser")
    chromium = Chromium(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_the_browser_check_sees_errors_and_requests(browser, tmp_path):
    """The control: a page that logs an error and fetches an image from the network is caught doing both."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><title>bad</title><script>console.error("boom")</script>'
                    '<img src="http://example.invalid/x.png">')
    visit = browser.visit(page.as_uri())
    assert visit.requests[0] == page.as_uri() and "http://example.invalid/x.png" in visit.requests
    assert any("boom" in e for e in visit.errors)


def test_reports_render_offline_without_errors(browser, tmp_path):
    folder = tmp_path / "reports"
    run = tmp_path / "run"
    shutil.copytree(ASSETS / "report" / "run", run)
    shutil.copy(ASSETS / "report" / "validation.json", run / "validation.json")
    pages = [write_report(ASSETS / "report" / "plan.json", folder / "plan.html"),
             write_report(run, folder / "run.html")]
    pages.append(plan_report(evil_plan_result(), folder / "evil.html"))
    pages.append(write_index(folder))
    for path in pages:
        visit = browser.visit(path.as_uri(), evaluate={
            "scripts": "document.scripts.length", "h1": "document.querySelector('h1').textContent",
            "svgs": "document.querySelectorAll('svg').length",
            "width": "document.documentElement.scrollWidth"})
        assert visit.requests == [path.as_uri()], f"{path.name} requested {visit.requests}"
        assert visit.errors == [], f"{path.name}: {visit.errors}"
        assert visit.checks["scripts"] == 0
        assert visit.checks["width"] <= 1280, f"{path.name} is wider than a laptop screen"
        width, height = _png_size(visit.screenshot)
        assert width >= 1000 and height >= 600
        shot = tmp_path / f"{path.stem}.png"
        shot.write_bytes(visit.screenshot)
        assert shot.stat().st_size > 20_000  # a page with text and figures, not a blank one
        assert visit.pdf.startswith(b"%PDF") and len(visit.pdf) > 10_000
        if path.name == "evil.html":
            assert visit.checks["h1"].startswith(EVIL)  # shown as text
        if path.name in ("plan.html", "run.html"):
            assert visit.checks["svgs"] >= 2
