"""scripts/paper_scale.py against the stub OpenAI-compatible server on 127.0.0.1, at a tiny scale.

What is checked: the cost is printed before anything is called (a plan makes no request),
the plan's call counts are the ones each pipeline's layout implies (worked out here by hand),
a pilot's scaled estimate equals what the full run then needs, every request the server saw
is a call retort counted, and the paper-scale settings are the references' numbers and
valid for the current pipelines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from bench.stub_server import launch

pytestmark = pytest.mark.http

SCRIPT = ROOT / "scripts" / "paper_scale.py"


@pytest.fixture
def stub() -> Iterator[str]:
    proc, url = launch()
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _requests(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as response:
        return int(json.loads(response.read())["requests"])


def _script(workspace: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", f"{url}#stub", "--workspace", str(workspace),
                           *args], cwd=workspace, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def _table(out: str, title: str) -> dict[str, list[int]]:
    """The rows of the table printed under `title`: method -> its numbers."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2
    rows: dict[str, list[int]] = {}
    for line in lines[start:]:
        cells = line.split()
        if not cells or line.startswith(" ") or not cells[1].replace(",", "").isdigit():
            break
        rows[cells[0]] = [int(c.replace(",", "")) for c in cells[1:]]
    return rows


def test_the_plan_comes_first_and_calls_nothing(workspace: Path, stub: str) -> None:
    proc = _script(workspace, stub, "--scale", "tiny", "--limit", "3", "--plan-only", "sse_cot", "cdmt", "bridge")
    assert _requests(stub) == 0
    plan = _table(proc.stdout, "expected cost at tiny scale")
    # columns: calls, cached, to call, prompt tokens, max completion
    # sse_cot: four stages per row; max_tokens 48 + 96 + 80 + (classify's)
    assert plan["sse_cot"][:3] == [12, 0, 12]
    # cdmt: one teacher call per row, max_tokens 360; rationalize is off, as in the reference
    assert plan["cdmt"][:3] == [3, 0, 3] and plan["cdmt"][4] == 3 * 360
    # bridge: (A) and (B) once per item, (C) for none, expert, random (the model's row waits for (A), (B));
    # (A) and (B) may write 256 tokens, (C) 128
    assert plan["bridge"][:3] == [15, 0, 15] and plan["bridge"][4] == 3 * (256 + 256 + 3 * 128)
    assert plan["total"][0] == 12 + 3 + 15
    assert "not counted until earlier answers exist: judge" in proc.stdout


def test_a_pilot_predicts_the_full_run_and_every_request_is_counted(workspace: Path, stub: str) -> None:
    proc = _script(workspace, stub, "--scale", "tiny", "--limit", "6", "--pilot", "2", "sse_cot", "cdmt", "bridge")
    out = proc.stdout
    assert out.index("expected cost at tiny scale") < out.index("expected cost from a pilot") < out.index("running")
    expected = _table(out, "expected cost from a pilot")
    spent = {}
    for line in out.splitlines():
        if line.startswith("  ") and ": ok, run" in line:
            method = line.split(":")[0].strip()
            words = line.replace(",", "").split()
            spent[method] = (int(words[words.index("made") - 2]), int(words[words.index("cached") - 1]))
    assert set(spent) == {"sse_cot", "cdmt", "bridge"}
    for method, (made, cached) in spent.items():
        assert expected[method][0] == made + cached, method  # the pilot's rows come back from the cache
    assert spent["sse_cot"] == (16, 8) and spent["cdmt"] == (4, 2)
    # every stage here sends n = 1, so the server saw one request per call made, pilots included
    assert _requests(stub) == sum(made + cached for made, cached in spent.values())


def test_the_lbt_methods_run_at_tiny_scale(workspace: Path, stub: str) -> None:
    # (sse_cot, cdmt and bridge run in the pilot test above)
    proc = _script(workspace, stub, "--scale", "tiny", "--limit", "6", "lbt_m1", "lbt_m2", "lbt_m3")
    ok = [line.split(":")[0].strip() for line in proc.stdout.splitlines() if ": ok, run" in line]
    assert ok == ["lbt_m1", "lbt_m2", "lbt_m3"]
    assert "lbt_m1   not scaled" not in proc.stdout  # no pilot asked for
    assert _requests(stub) > 0


def test_paper_scale_settings_are_the_references_and_valid(workspace: Path, stub: str) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import paper_scale
    finally:
        sys.path.remove(str(SCRIPT.parent))
    paper = paper_scale.PAPER
    # imagination-research/lbt: 256 rationales per teaching problem, exams of 3 questions x 3 repetitions
    assert {"stages.teach.samples=256", "stages.student.samples=3"} <= set(paper["lbt_m1"].paper)
    # lbt/patch/lmops-lbtm3.patch: n_icl 8, rounds 5, beam 4, minibatch 64, 4 gradients, 3000 test examples
    assert set(paper["lbt_m3"].paper) == {"params.n_examples=8", "params.rounds=5", "params.beam=4",
                                          "params.minibatch=64", "params.candidates=4", "params.max_heldout=3000"}
    # the settings are valid for the current pipelines: a plan at paper scale on one row
    proc = _script(workspace, stub, "--limit", "1", "--plan-only")
    plan = _table(proc.stdout, "expected cost at paper scale")
    # one problem, 256 rationales (the exams wait for them; the pipelines' default is 4)
    assert plan["lbt_m1"][0] >= 256 and plan["lbt_m2"][0] >= 256
    assert _requests(stub) == 0


def test_an_unknown_method_is_one_clear_error(workspace: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "http://127.0.0.1:9/v1", "bridg"],
                          cwd=workspace, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown method 'bridg'" in proc.stderr and "Traceback" not in proc.stderr
