"""The HTML report of `retort compare` in headless Chromium: it renders, its charts are drawn,
the console stays clean and no request leaves the file.

Three Chromium runs, each bounded by a timeout:
  --dump-dom      the rendered DOM: the SVG marks of every chart, in the expected numbers
  --screenshot    a PNG kept as a test artifact in tests/artifacts/ (ignored by git)
  DevTools pipe   (--remote-debugging-pipe) every network request, console message, log entry
                  and uncaught exception while the page loads, plus the marks' laid-out sizes
Skipped, with the reason, when Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import devtools as cdp
import pytest
from conftest import run_cli

CHROMIUM = next((found for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
                 if name and (found := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT = 60
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--host-resolver-rules=MAP * ~NOTFOUND"]

STRATEGIES = {"A": range(9), "B": range(7), "C": range(5), "D": range(10)}  # right on these of 12 items
N = 12


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `retort compare` report: four strategies, so 4 bars, 4 points and 6 paired differences."""
    ws = tmp_path_factory.mktemp("browser")
    files = {
        "data/items.jsonl": "".join(json.dumps({"text": f"item {i}", "label": "yes"}) + "\n" for i in range(N)),
        "evaluators/script.py": f"""
            import re

            RIGHT = {({k: list(v) for k, v in STRATEGIES.items()})!r}

            def reply(request):
                kind, i = re.match(r"^(\\w): item (\\d+)", request.messages[-1]["content"]).groups()
                return "yes" if int(i) in RIGHT[kind] else "no"
            """,
        "pipelines/ask.yaml": """
            input: {path: data/items.jsonl}
            stages:
              - name: answer
                template: "A: {{ text }}"
                parse: {choice: ["yes", "no"]}
            """,
        "comparisons/four.yaml": """
            dataset: {path: data/items.jsonl}
            reference: label
            predict: answer.answer
            metrics: [accuracy, macro_f1]
            resamples: 300
            strategies:
              A: ask
              B: {pipeline: ask, set: {stages.answer.template: "B: {{ text }}"}}
              C: {pipeline: ask, set: {stages.answer.template: "C: {{ text }}"}}
              D: {pipeline: ask, set: {stages.answer.template: "D: {{ text }}"}}
            """,
    }
    for rel, text in files.items():
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    proc = run_cli("compare", "four", "--model", "*=scripted:script:reply", "-q", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    return ws / "reports" / "four" / "report.html"


class _Marks(HTMLParser):
    """Counts elements by (chart id, class) in a DOM dump."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "source", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str | None, str, set[str]]] = []
        self._stack: list[tuple[str, str | None]] = []

    def _add(self, tag: str, attrs: list[tuple[str, str | None]], push: bool) -> None:
        a = {k: v or "" for k, v in attrs}
        chart = a.get("id") if tag == "svg" else (self._stack[-1][1] if self._stack else None)
        self.found.append((chart, tag, set(a.get("class", "").split())))
        if push and tag not in self.VOID:
            self._stack.append((tag, chart))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add(tag, attrs, True)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add(tag, attrs, False)

    def handle_endtag(self, tag: str) -> None:
        while self._stack and self._stack.pop()[0] != tag:
            pass

    def count(self, chart: str, cls: str) -> int:
        return sum(1 for c, _, classes in self.found if c == chart and cls in classes)


def test_dom_has_every_chart_mark(report: Path, tmp_path: Path) -> None:
    proc = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<html" in dom[:200] and "Comparison: four" in dom
    marks = _Marks()
    marks.feed(dom)
    k = len(STRATEGIES)
    assert marks.count("chart-metric", "bar") == k
    assert marks.count("chart-pareto", "point") == k
    assert marks.count("chart-diffs", "diff") == k * (k - 1) // 2
    assert "table-metrics" in dom and "table-pairs" in dom  # the strategies section and the pairs table


def test_screenshot_is_saved_as_an_artifact(report: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # artifacts never enter the repository
    shot = ARTIFACTS / "compare_report.png"
    shot.unlink(missing_ok=True)
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars",
                     report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1800)
    assert len(data) > 50_000  # a blank page is a few kB; charts, tables and text are far more


# --------------------------------------------------------------------------- DevTools over a pipe


class DevTools(cdp.DevTools):
    """The shared DevTools client (tests/devtools.py), opening a report file."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "profile-devtools", ["--host-resolver-rules=MAP * ~NOTFOUND"], local=("file://",))

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")
        self.settle()

    def settle(self, seconds: float = 0.5) -> None:
        """Collect the events that arrive shortly after load (late console messages, requests)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    break
                self._buffer += chunk
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            message = json.loads(raw)
            if "method" in message:
                self.events.append(message)


@pytest.fixture
def devtools(tmp_path: Path) -> Any:
    client = DevTools(tmp_path)
    try:
        yield client
    finally:
        client.close()


def test_console_is_clean_and_no_request_leaves_the_file(report: Path, devtools: DevTools) -> None:
    devtools.open(report.as_uri())
    assert devtools.problems() == []
    requests = [e["params"]["request"]["url"] for e in devtools.events if e["method"] == "Network.requestWillBeSent"]
    assert requests == [report.as_uri()]  # the page itself and nothing else
    csp = devtools.evaluate("document.querySelector('meta[http-equiv=Content-Security-Policy]').content")
    assert csp.startswith("default-src 'none'")
    # drawn, not just present: every mark has a laid-out size on the page
    sizes = devtools.evaluate("""JSON.stringify(Object.fromEntries(
        ['#chart-metric .bar', '#chart-pareto .point', '#chart-diffs .diff'].map(s => [s,
            [...document.querySelectorAll(s)].map(e => { const r = e.getBoundingClientRect();
                                                         return Math.round(r.width * r.height); })])))""")
    sizes = json.loads(sizes)
    k = len(STRATEGIES)
    assert [len(sizes[s]) for s in sizes] == [k, k, k * (k - 1) // 2]
    assert all(area > 0 for areas in sizes.values() for area in areas), sizes
    widths = devtools.evaluate("[...document.querySelectorAll('#chart-metric .bar')].map(e => "
                               "e.getBoundingClientRect().width)")
    accuracy = [len(STRATEGIES[s]) / N for s in "ABCD"]
    ratios = [w / accuracy[i] for i, w in enumerate(widths)]  # bars are proportional to accuracy
    assert max(ratios) - min(ratios) < 1.0


def test_the_harness_sees_a_request_and_an_error(report: Path, devtools: DevTools, tmp_path: Path) -> None:
    """The checks above are not blind: a page that tries to reach a host is caught."""
    page = tmp_path / "leaky.html"
    page.write_text(report.read_text().replace("<main>", '<main><img src="http://example.invalid/x.png">', 1))
    devtools.open(page.as_uri())
    problems = devtools.problems()
    assert any(p.startswith("request: http://example.invalid/") for p in problems), problems
    assert any("Content Security Policy" in p for p in problems), problems
