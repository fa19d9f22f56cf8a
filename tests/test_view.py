"""`retort view` as a user meets it: the real server on 127.0.0.1 over a real run's DuckDB file, driven
in headless Chromium over the DevTools protocol (a pipe, no extra package).

Screenshots are checked by their pixels (decoded here: a page is not blank, a search leaves fewer rows
painted, a prompt's text is painted where the DOM says it is) and the DOM by its text. The full-page
screenshots are kept in tests/artifacts/ (ignored by git) for a person to look at. The API is also
probed directly: names that reach SQL are checked, the file is never held between requests, and a
process holding the file gets one clear line.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import devtools as cdp
import duckdb
import pytest
from conftest import ROOT, db_rows, run_cli
from test_show import build_workspace

from retort.errors import CacheError

CHROMIUM = next((found for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
                 if name and (found := shutil.which(name))), None)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT = 60
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--window-size=1200,900"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

COMPARISON = """
dataset: {path: data/reviews.jsonl}
reference: gold
predict: classify.classify
metrics: [accuracy]
resamples: 200
strategies:
  plain: reviews
  polite:
    pipeline: reviews
    set: {stages.classify.template: "Please classify the sentiment of this review: {{ text }}"}
"""


# --------------------------------------------------------------------------- the workspace and the server


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of `reviews` (run 1) and a comparison report written by `retort compare`."""
    root = build_workspace(tmp_path_factory.mktemp("view"))
    (root / "comparisons").mkdir()
    (root / "comparisons" / "moods.yaml").write_text(textwrap.dedent(COMPARISON).lstrip(), encoding="utf-8")
    proc = run_cli("compare", "moods", "--model", "*=scripted:script:reply", "-q", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "reports" / "moods" / "report.html").is_file()
    return root


class Viewer:
    """`retort view --port 0` in a child process; `url` is what it printed."""

    def __init__(self, ws: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "view", "--port", "0"], cwd=ws,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        assert line.startswith("retort view: http://127.0.0.1:"), (line, self.proc.stderr)
        self.url = line.split()[2]
        self.port = urllib.parse.urlsplit(self.url).port

    def get(self, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url.rstrip('/')}{path}?{query}", timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture(scope="module")
def viewer(ws: Path) -> Iterator[Viewer]:
    server = Viewer(ws)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- Chromium over DevTools


class Browser(cdp.DevTools):
    """The shared DevTools client (tests/devtools.py), driving the viewer's pages."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "profile", ["--hide-scrollbars", "--window-size=1200,900"],
                         local=("http://127.0.0.1:",))

    def open(self, url: str, *, app: bool = True) -> None:
        if self.session is None:
            target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     browser=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                             "mobile": False})
        else:  # a new hash on the same page: "ready" must come from the drawing of the new view
            self.evaluate("document.body && (document.body.dataset.state = 'stale')")
        self.send("Page.navigate", {"url": url})
        if app:
            self.wait_ready()
        else:
            self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def click(self, element: str) -> None:
        """Click `element` (a JS expression) and wait until the view it leads to is drawn."""
        self.evaluate(f"document.body.dataset.state = 'stale'; ({element}).click()")
        self.wait_ready()

    def wait_for(self, condition: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.evaluate(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never got to: {condition}")
            time.sleep(0.05)

    def wait_ready(self, condition: str = "true") -> None:
        """Until the app has drawn what it fetched (body[data-state=ready]) and `condition` holds; bounded."""
        self.wait_for(f"!!document.body && document.body.dataset.state === 'ready' && ({condition})")

    def screenshot(self, name: str, selector: str | None = None) -> bytes:
        """A PNG of the page (kept in tests/artifacts/NAME.png), or of one element's box."""
        params: dict[str, Any] = {"format": "png"}
        if selector:
            box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                                ".getBoundingClientRect(); "
                                "return [r.x + scrollX, r.y + scrollY, r.width, r.height]; })()")
            params["clip"] = {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}
        else:
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / ".gitignore").write_text("*\n")  # artifacts never enter the repository
        (ARTIFACTS / f"{name}.png").write_bytes(data)
        return data


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    client = Browser(tmp_path)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- pixels


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color, interlace = header[8], header[9], header[12]
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3))
        prev = line
    return width, height, rows


def ink(data: bytes) -> tuple[int, int]:
    """(pixels darker than mid-grey: text and rules, distinct colours) of a PNG."""
    _, _, rows = png_pixels(data)
    dark, colours = 0, set()
    for row in rows:
        for i in range(0, len(row), 3):
            r, g, b = row[i], row[i + 1], row[i + 2]
            colours.add((r, g, b))
            dark += r + g + b < 384
    return dark, len(colours)


# --------------------------------------------------------------------------- the pages


@needs_chromium
def test_runs_page_loads_and_is_painted(viewer: Viewer, ws: Path, browser: Browser) -> None:
    browser.open(viewer.url)
    runs = db_rows(ws, "SELECT count(*) FROM runs")[0][0]
    assert runs >= 3  # the reviews run and the comparison's two strategies
    assert browser.evaluate("document.querySelectorAll('#runs tbody tr').length") == runs
    assert "reviews" in browser.evaluate("document.querySelector('#runs').innerText")
    shot = browser.screenshot("view_runs")
    width, height, _ = png_pixels(shot)
    assert width == 1200 and height >= 900
    dark, colours = ink(shot)
    assert dark > 2_000 and colours > 20, (dark, colours)  # a blank page has one colour and no ink
    assert browser.problems() == []


@needs_chromium
def test_a_search_narrows_the_rows(viewer: Viewer, ws: Path, browser: Browser) -> None:
    browser.open(f"{viewer.url}#/table/1/classify")
    total = db_rows(ws, "SELECT count(*) FROM run_1.classify")[0][0]
    assert browser.evaluate("document.querySelectorAll('#rows tbody tr').length") == total == 7
    before = browser.screenshot("view_table", "#rows")
    browser.evaluate("document.querySelector('#search').focus()")
    browser.send("Input.insertText", {"text": "masterpiece"})
    browser.wait_ready("document.querySelector('#count').dataset.total !== '7'")
    expected = db_rows(ws, "SELECT count(*) FROM run_1.classify WHERE lower(text) LIKE '%masterpiece%'")[0][0]
    assert expected == 1
    assert browser.evaluate("document.querySelectorAll('#rows tbody tr').length") == expected
    assert "A quiet masterpiece" in browser.evaluate("document.querySelector('#rows tbody').innerText")
    assert "q=masterpiece" in browser.evaluate("location.hash")  # the view can be linked
    after = browser.screenshot("view_table_search", "#rows")
    assert png_pixels(after)[1] < png_pixels(before)[1]  # the painted table is shorter
    assert 0 < ink(after)[0] < ink(before)[0]
    browser.screenshot("view_table_search_page")
    assert browser.problems() == []


@needs_chromium
def test_a_filter_and_the_error_switch(viewer: Viewer, browser: Browser) -> None:
    browser.open(f"{viewer.url}#/table/1/classify?errors=only")
    assert browser.evaluate("document.querySelector('#count').dataset.total") == "1"
    assert "no option found" in browser.evaluate("document.querySelector('#rows tbody').innerText")
    browser.open(f"{viewer.url}#/table/1/classify?f=gold%3Dpositive")
    assert browser.evaluate("document.querySelector('#count').dataset.total") == "4"
    assert browser.evaluate("document.querySelector('#filters').innerText").startswith("gold=positive")


@needs_chromium
def test_a_rows_lineage_shows_its_prompt(viewer: Viewer, ws: Path, browser: Browser) -> None:
    browser.open(f"{viewer.url}#/table/1/explain")
    browser.click("[...document.querySelectorAll('#rows a')].find(a => a.textContent === '2.0.0')")
    assert browser.evaluate("location.hash") == "#/row/1/explain/2.0.0"
    assert browser.evaluate("[...document.querySelectorAll('section.step')].map(s => s.dataset.stage)") == [
        "input", "classify", "keep", "explain"]
    (request, text), = db_rows(ws, "SELECT c.request, c.text FROM calls c JOIN run_1.explain e ON c.key = e._call "
                                   "WHERE e._id = '2.0.0'")
    prompt = json.loads(request)["messages"][0]["content"]
    selector = "section.step[data-stage=explain] pre.content"
    assert browser.evaluate(f"document.querySelector('{selector}').textContent") == prompt
    assert browser.evaluate("document.querySelector('section.step[data-stage=explain] pre.completion')"
                            ".textContent") == text
    classify = browser.evaluate("document.querySelector('section.step[data-stage=classify] pre.content').textContent")
    assert classify.startswith("Classify the sentiment of this review: A quiet masterpiece.")
    browser.screenshot("view_lineage")
    dark, colours = ink(browser.screenshot("view_lineage_prompt", selector))
    assert dark > 100 and colours > 5, (dark, colours)  # the prompt's text is painted, not just in the DOM
    assert browser.problems() == []


@needs_chromium
def test_failures_show_their_errors(viewer: Viewer, browser: Browser) -> None:
    browser.open(f"{viewer.url}#/failures/1")
    calls = browser.evaluate("document.querySelector('#failed-calls').innerText")
    assert "the server refused this one (scripted)" in calls and "400" in calls and "input 7" in calls
    browser.click("document.querySelector('#failed-calls a')")  # the row the failed call was made from
    assert browser.evaluate("location.hash") == "#/row/1/input/7"
    assert "Meh" in browser.evaluate("document.querySelector('section.step[data-stage=input]').innerText")
    browser.open(f"{viewer.url}#/failures/1")
    parse = browser.evaluate("document.querySelector('#parse-errors').innerText")
    assert "no option found" in parse and "maybe" in parse
    browser.screenshot("view_failures")


@needs_chromium
def test_comparison_reports_are_listed_and_shown(viewer: Viewer, browser: Browser) -> None:
    browser.open(f"{viewer.url}#/reports")
    assert browser.evaluate("document.querySelector('#reports').innerText").count("moods/report.html") == 1
    browser.click("document.querySelector('#reports a')")
    assert browser.evaluate("!!document.querySelector('iframe.report')")
    report = f"{viewer.url}reports/moods/report.html"

    def frames() -> list[str]:  # a sandboxed frame may live in its own process: ask both ways
        tree = [f["frame"]["url"] for f in browser.send("Page.getFrameTree")["frameTree"].get("childFrames", [])]
        targets = [t["url"] for t in browser.send("Target.getTargets", browser=True)["targetInfos"]
                   if t["type"] == "iframe"]
        return tree + targets

    deadline = time.monotonic() + TIMEOUT
    while report not in frames():
        assert time.monotonic() < deadline, frames()
        time.sleep(0.1)
    browser.open(report, app=False)  # the report itself, with its charts
    assert "Comparison: moods" in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelectorAll('#chart-metric .bar').length") == 2
    browser.screenshot("view_report")
    assert browser.problems() == []


# --------------------------------------------------------------------------- the API and the file


def test_names_reaching_sql_are_checked(viewer: Viewer, ws: Path) -> None:
    calls = db_rows(ws, "SELECT count(*) FROM calls")[0][0]
    attacks = [
        ("/api/table", {"run": "1", "table": 'classify"; DROP TABLE calls; --'}, 404, "has no table"),
        ("/api/table", {"run": "1; DROP TABLE calls", "table": "classify"}, 400, "whole number"),
        ("/api/table", {"run": "1", "table": "classify", "sort": "_id; DROP TABLE calls"}, 400, "no such column"),
        ("/api/table", {"run": "1", "table": "classify", "f": "text) OR (1=1=x"}, 400, "expected COLUMN=VALUE"),
        ("/api/table", {"run": "main", "table": "memo"}, 404, "no record table"),
        ("/api/lineage", {"run": "1", "table": "../classify", "id": "0.0"}, 404, "has no table"),
    ]
    for path, params, status, message in attacks:
        code, body = viewer.get(path, **params)
        assert (code, message in body["error"]) == (status, True), (params, code, body)
    code, body = viewer.get("/api/table", run="1", table="classify", q="' OR 1=1 --")
    assert (code, body["total"]) == (200, 0)  # a search is a value, never SQL
    code, body = viewer.get("/api/table", run="1", table="classify", f="text=I loved this film")
    assert (code, body["total"]) == (200, 1)
    assert db_rows(ws, "SELECT count(*) FROM calls")[0][0] == calls


def test_only_this_machine_and_only_the_packaged_files(viewer: Viewer) -> None:
    request = urllib.request.Request(viewer.url, headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    assert refused.value.code == 403  # a page elsewhere cannot read the store through DNS rebinding
    for path in ("/static/../view.py", "/static/%2e%2e/view.py", "/reports/../.retort/retort.duckdb"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(viewer.url.rstrip("/") + path, timeout=TIMEOUT)
        assert missing.value.code == 404, path
    with urllib.request.urlopen(viewer.url, timeout=TIMEOUT) as page:
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]


def test_a_run_can_write_while_the_viewer_is_open(viewer: Viewer, ws: Path) -> None:
    """The viewer holds the file only during a request: a run starts, and the viewer then shows it."""
    before = viewer.get("/api/runs")[1]["runs"]
    proc = run_cli("run", "reviews", "--model", "*=scripted:script:reply", "-q", "--max-failures", "1",
                   "--no-reuse", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    after = viewer.get("/api/runs")[1]["runs"]
    assert len(after) == len(before) + 1 and after[0]["pipeline"] == "reviews"


def test_a_held_file_is_one_clear_line(viewer: Viewer, ws: Path) -> None:
    holder = duckdb.connect(str(ws / ".retort" / "retort.duckdb"))  # as a running `retort run` does
    try:
        code, body = viewer.get("/api/runs")
        assert code == 503 and "is in use by another process" in body["error"] and "\n" not in body["error"]
        proc = run_cli("view", "--port", "0", cwd=ws, timeout=TIMEOUT)
        assert proc.returncode == CacheError.exit_code and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "is in use by another process" in proc.stderr
    finally:
        holder.close()
    assert viewer.get("/api/runs")[0] == 200  # and the viewer reads again once it is free


@needs_chromium
def test_the_page_says_when_the_file_is_held(viewer: Viewer, ws: Path, browser: Browser) -> None:
    holder = duckdb.connect(str(ws / ".retort" / "retort.duckdb"))
    try:
        browser.open(viewer.url)
        assert browser.evaluate("document.querySelector('#banner').hidden") is False
        assert "is in use by another process" in browser.evaluate("document.querySelector('#banner').innerText")
        browser.screenshot("view_held")
    finally:
        holder.close()
    browser.open(f"{viewer.url}#/run/1")  # free again: the next view reads, and the line is gone
    assert browser.evaluate("document.querySelector('#banner').hidden") is True
    assert browser.evaluate("document.querySelectorAll('#tables tbody tr').length") == 4


def test_no_store_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("view", "--port", "0", cwd=tmp_path, timeout=TIMEOUT)
    assert proc.returncode == CacheError.exit_code and proc.stderr.startswith("error: no retort database at ")
    assert proc.stderr.count("\n") == 1
