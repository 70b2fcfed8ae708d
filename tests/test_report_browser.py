"""The HTML report in a real headless browser (Debian's chromium, no network).

Chromium is driven over the Chrome DevTools Protocol on ``--remote-debugging-pipe``
(fd 3 in, fd 4 out, NUL-separated JSON), so the test needs nothing beyond the
standard library and the chromium binary that scripts/test.sh installs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat
from test_report import CLASSES, EVIL, make_audit_folder

from clipaudit.report import write_report

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--window-size=1200,900", "--remote-debugging-pipe",
)
TIMEOUT_S = 60.0


def _chromium_exe() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium not found: the browser test needs Debian's chromium package "
                "(scripts/test.sh installs it: apt-get install chromium)")


class Chromium:
    """A headless chromium and a minimal CDP client attached to one page."""

    def __init__(self, exe: str, profile_dpath: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def wire_fds() -> None:  # chromium reads commands on fd 3, writes replies on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self._log = open(profile_dpath / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dpath}", "about:blank"],
            preexec_fn=wire_fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log)
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._next_id = b"", 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 browser=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    # -------------------------------------------------------------- protocol

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._res_r], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe (crashed?)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _note(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        if msg.get("method") == "Page.javascriptDialogOpening":
            # Dismiss it, or the page would block every later command.
            self._write("Page.handleJavaScriptDialog", {"accept": False})

    def _write(self, method: str, params: dict[str, Any] | None, browser: bool = False) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             browser: bool = False) -> dict[str, Any]:
        msg_id = self._write(method, params, browser)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            msg = self._read(deadline)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._note(msg)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            msg = self._read(deadline)
            if "method" in msg:
                self._note(msg)
                if msg["method"] == method:
                    return msg.get("params", {})

    # -------------------------------------------------------------- page helpers

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (as a user would click it)."""
        box = self.js(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            el.scrollIntoView({{block: "center"}}); const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})

    def events_of(self, method: str) -> list[dict[str, Any]]:
        return [e.get("params", {}) for e in self.events if e.get("method") == method]

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        found = [f"console.{p['type']}: {p.get('args')}"
                 for p in self.events_of("Runtime.consoleAPICalled")
                 if p["type"] in ("error", "assert")]
        found += [f"exception: {p['exceptionDetails'].get('text')}"
                  for p in self.events_of("Runtime.exceptionThrown")]
        found += [f"log: {p['entry'].get('text')}" for p in self.events_of("Log.entryAdded")
                  if p["entry"].get("level") == "error"]
        return found

    def requested_urls(self) -> list[str]:
        return [p["request"]["url"] for p in self.events_of("Network.requestWillBeSent")]

    def screenshot(self) -> Image.Image:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data)))

    def close(self) -> None:
        try:
            self._write("Browser.close", None, browser=True)
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._res_r)
            self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _chromium_exe()
    chromium = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def report_url(tmp_path_factory) -> str:
    audit_dpath = tmp_path_factory.mktemp("browser") / "audit"
    make_audit_folder(audit_dpath)
    return write_report(audit_dpath, html=True, pdf=False).html.resolve().as_uri()


_SHARE_COLUMN = """Array.from(document.querySelectorAll("#findings-table tbody tr"))
    .map(r => Number(r.cells[6].dataset.sort))"""
_VISIBLE_CARD_CLASSES = """Array.from(document.querySelectorAll("article.card"))
    .filter(c => c.offsetParent !== null).map(c => c.dataset.class)"""


def test_report_loads_offline_without_errors(browser, report_url):
    browser.open(report_url)
    assert browser.problems() == []
    bad = [u for u in browser.requested_urls() if u != report_url and not u.startswith("data:")]
    assert bad == [], f"the report requested {bad}"
    # thumbnails are CSS backgrounds (each image inlined once): every one decodes and shows
    n_thumbs, n_broken, n_unsized = browser.js(r"""(async () => {
        const els = Array.from(document.querySelectorAll(".thumb-img"));
        const urls = els.map(e => getComputedStyle(e).backgroundImage.replace(/^url\("?|"?\)$/g, ""));
        const ok = await Promise.all(urls.map(u => { const i = new Image(); i.src = u;
            return i.decode().then(() => i.naturalWidth > 0, () => false); }));
        return [els.length, ok.filter(x => !x).length,
                els.filter(e => e.offsetParent !== null)  // shown (a card's plain images hide under overlays)
                   .filter(e => e.offsetWidth < 60 || e.offsetHeight < 60).length]; })()""")
    assert n_thumbs > 0 and n_broken == 0 and n_unsized == 0
    shot = browser.screenshot().convert("L")
    assert ImageStat.Stat(shot).stddev[0] > 10, "the screenshot is blank"
    assert sum(1 for count in shot.histogram() if count) > 20


def test_class_names_are_text_never_script(browser, report_url):
    browser.open(report_url)
    assert browser.js("document.scripts.length") == 1
    text = browser.js("document.body.innerText")
    assert EVIL in text
    assert browser.js(f"document.querySelector('option[value=\"{CLASSES[1]}\"]') !== null")
    browser.js("new Promise(r => setTimeout(r, 200))")  # give a stray script time to fire
    assert browser.events_of("Page.javascriptDialogOpening") == []
    assert browser.problems() == []


def test_sorting_a_column_reorders_its_rows(browser, report_url):
    browser.open(report_url)
    initial = browser.js(_SHARE_COLUMN)
    browser.click("#findings-table thead th:nth-child(7) button")
    ascending = browser.js(_SHARE_COLUMN)
    assert ascending == sorted(initial) and ascending != initial
    browser.click("#findings-table thead th:nth-child(7) button")
    assert browser.js(_SHARE_COLUMN) == sorted(initial, reverse=True)
    assert browser.js(
        "document.querySelector('#findings-table th:nth-child(7)').getAttribute('aria-sort')"
    ) == "descending"
    assert browser.problems() == []


def test_class_filter_hides_other_classes(browser, report_url):
    browser.open(report_url)
    everything = browser.js(_VISIBLE_CARD_CLASSES)
    assert set(everything) == {"malignant", EVIL}
    browser.js(f"""(() => {{ const s = document.getElementById("class-filter");
        s.value = {json.dumps(EVIL)}; s.dispatchEvent(new Event("change")); }})()""")
    shown = browser.js(_VISIBLE_CARD_CLASSES)
    assert shown and set(shown) == {EVIL}
    rows = browser.js("""Array.from(document.querySelectorAll("#findings-table tbody tr"))
        .filter(r => r.offsetParent !== null).map(r => r.dataset.class)""")
    assert rows and set(rows) == {EVIL}
    browser.js("""(() => { const s = document.getElementById("class-filter");
        s.value = ""; s.dispatchEvent(new Event("change")); })()""")
    assert sorted(browser.js(_VISIBLE_CARD_CLASSES)) == sorted(everything)
    assert browser.problems() == []


def test_the_harness_sees_errors_dialogs_and_requests(browser, tmp_path):
    """The checks above can fail: this page does everything the report must not do."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><title>bad</title><img src='http://127.0.0.1:9/x.png'>"
                    "<script>console.error('boom'); setTimeout(() => alert(1), 0);</script>")
    browser.open(page.as_uri())
    browser.js("new Promise(r => setTimeout(r, 200))")
    assert any("boom" in p for p in browser.problems())
    assert any(u.startswith("http://127.0.0.1:9/") for u in browser.requested_urls())
    assert browser.events_of("Page.javascriptDialogOpening")


def _shown_images(anchor: str) -> str:
    """JS: which image each figure with a heatmap shows in the card: plain or overlay."""
    return f"""Array.from(document.getElementById({json.dumps(anchor)})
        .querySelectorAll("figure.with-overlay .plain, figure.with-overlay .overlay"))
        .filter(i => i.offsetParent !== null && i.getBoundingClientRect().width > 0)
        .map(i => i.classList.contains("overlay") ? "overlay" : "plain")"""


def test_heatmap_overlays_switch_per_card_and_for_all(browser, report_url):
    browser.open(report_url)
    anchor = browser.js("""document.querySelector("article.card input.heatmap-switch")
        .closest("article").id""")
    shown = _shown_images(anchor)
    assert set(browser.js(shown)) == {"overlay"}  # overlays first: the point of the card
    assert len(browser.js(shown)) == 4
    browser.click(f"label[for='{anchor}-heatmaps']")
    assert set(browser.js(shown)) == {"plain"} and len(browser.js(shown)) == 4
    browser.click(f"label[for='{anchor}-heatmaps']")
    assert set(browser.js(shown)) == {"overlay"}
    browser.click("#heatmaps-all")  # every card at once
    every = """Array.from(document.querySelectorAll("figure.with-overlay .plain, figure.with-overlay .overlay"))
        .filter(i => i.offsetParent !== null)
        .map(i => i.classList.contains("overlay") ? "overlay" : "plain")"""
    assert set(browser.js(every)) == {"plain"}
    browser.click("#heatmaps-all")
    assert set(browser.js(every)) == {"overlay"}
    n_overlays, n_broken = browser.js(r"""(async () => {
        const els = Array.from(document.querySelectorAll(".thumb-img.overlay"));
        const ok = await Promise.all(els.map(e => { const i = new Image();
            i.src = getComputedStyle(e).backgroundImage.replace(/^url\("?|"?\)$/g, "");
            return i.decode().then(() => i.naturalWidth > 0, () => false); }));
        return [els.length, ok.filter(x => !x).length]; })()""")
    assert n_overlays == 8 and n_broken == 0 and browser.problems() == []
