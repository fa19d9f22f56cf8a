"""`retort show` you can read, on a real run's DuckDB file made through the real CLI: whole texts with
--vertical, JSON lines with --json, any column by name, no column squashed to nothing, and one row's
lineage (the input row, then each stage's rendered prompt and completion)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import db_rows, run_cli

# A long review with a line break: the table cuts it, --vertical and --json must not.
LONG = "A quiet masterpiece. " * 20 + "\nThe second paragraph says the score is lovely."
REVIEWS = ["I loved this film", "Terrible acting", LONG, "Boring and long", "Fun for the family", "Not worth it",
           "Brilliant [bold] score", "Meh"]

SCRIPT = '''
from retort.errors import BackendError


def reply(request):
    prompt = request.messages[-1]["content"]
    if prompt.startswith("Explain"):
        return "Because the review says so.\\nA second line of reasons."
    if prompt.endswith(": Meh"):
        raise BackendError("the server refused this one (scripted)", status=400)
    if "Boring" in prompt:
        return "maybe"
    good = any(w in prompt for w in ("loved", "masterpiece", "Fun", "Brilliant"))
    return "positive" if good else "negative"
'''

PIPELINE = """
input: {path: data/reviews.jsonl}
stages:
  - name: classify
    template: "Classify the sentiment of this review: {{ text }}"
    parse: {choice: [positive, negative]}
  - name: keep
    sql: "SELECT * FROM classify WHERE classify = 'positive'"
  - name: explain
    from: keep
    template: "Explain why this review is {{ classify }}: {{ text }}"
"""


def build_workspace(root: Path) -> Path:
    """A workspace with one run of `reviews` (8 rows: 1 failed call, 1 parse error, 4 explained)."""
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "data" / "reviews.jsonl").write_text("".join(
        json.dumps({"text": t, "gold": "positive" if i % 2 == 0 else "negative"}) + "\n"
        for i, t in enumerate(REVIEWS)), encoding="utf-8")
    (root / "evaluators" / "script.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    (root / "pipelines" / "reviews.yaml").write_text(textwrap.dedent(PIPELINE).lstrip(), encoding="utf-8")
    proc = run_cli("run", "reviews", "--model", "*=scripted:script:reply", "-q", "--max-failures", "1", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("show"))


def show(ws: Path, *args: str) -> Any:
    return run_cli("show", *args, cwd=ws)


def test_vertical_shows_whole_texts_one_field_per_line(ws: Path) -> None:
    table = show(ws, "classify", "--where", "_id = '2.0'")
    assert table.returncode == 0, table.stderr
    assert "The second paragraph" not in table.stdout  # the table cuts a long cell
    proc = show(ws, "classify", "--where", "_id = '2.0'", "--vertical")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    first, second = LONG.split("\n")
    assert any(line.endswith("| " + first) and line.startswith("text ") for line in lines), proc.stdout
    assert any(line.endswith("| " + second) for line in lines)  # the next line of the same field
    fields = [line.split("|")[0].strip() for line in lines[2:] if line.split("|")[0].strip()]
    # every column once, the hidden call key included
    assert fields == ["text", "gold", "_id", "_parent", "_sample", "_call", "_raw", "_error", "classify"]


def test_json_lines_are_the_table(ws: Path) -> None:
    proc = show(ws, "classify", "--json", "-n", "100")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    stored = db_rows(ws, "SELECT _id, text, _call, _error, classify FROM run_1.classify")
    assert len(records) == len(stored) == 7  # 8 reviews, one failed call
    assert {(r["_id"], r["text"], r["_call"], r["_error"], r["classify"]) for r in records} == set(stored)
    calls = show(ws, "calls", "--json", "--columns", "key,request", "-n", "1")
    request = json.loads(calls.stdout.splitlines()[0])["request"]
    assert request["messages"][0]["role"] == "user"  # a JSON column arrives as JSON, not as a string


def test_columns_by_name_without_all_columns(ws: Path) -> None:
    proc = show(ws, "calls", "--columns", "request", "-n", "20", "--vertical")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Classify the sentiment of this review:") == 7
    wrong = show(ws, "calls", "--columns", "requests")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert "no column 'requests'" in wrong.stderr and "request" in wrong.stderr


def test_no_column_is_squashed_to_nothing(ws: Path) -> None:
    proc = show(ws, "runs", "--all-columns")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "run_id" in line)
    cells = [c.strip() for c in header.strip("┃ \n").split("┃")]
    assert cells == ["run_id", "pipeline", "spec_path", "spec_hash", "started_at", "finished_at", "status", "argv",
                     "stats", "namespace", "pinned"]
    body = next(line for line in proc.stdout.splitlines() if line.startswith("│"))
    assert [c.strip() for c in body.strip("│ ").split("│")][6] == "ok"  # the status is shown, not squashed


def test_fit_names_the_columns_that_do_not_fit() -> None:
    from retort.cli import _fit

    columns = [f"column_{i}" for i in range(12)]
    cells = [["x" * 30] * 12]
    widths = _fit(columns, cells, 40, 80)
    shown = [w for w in widths if w]
    assert all(w >= len("column_0") for w in shown)  # never narrower than the header
    assert sum(w + 3 for w in shown) + 1 <= 80
    assert widths[0] and not widths[-1]  # the rest are left out, in order, and named under the table


def test_lineage_shows_each_stage_prompt_and_completion(ws: Path) -> None:
    proc = show(ws, "explain", "--row", "2.0.0", "--lineage")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0] == "lineage of explain row 2.0.0 (run 1): input -> classify -> keep -> explain"
    marks = ["== input · row 2 ", LONG.split("\n")[0], "== classify · row 2.0 ",
             "Classify the sentiment of this review: " + LONG.split("\n")[0], "-- completion\npositive",
             "== keep · row 2.0 ", "== explain · row 2.0.0 ", "Explain why this review is positive: ",
             "Because the review says so.\nA second line of reasons."]
    positions = [out.find(m) for m in marks]
    assert -1 not in positions, [m for m, p in zip(marks, positions, strict=True) if p < 0]
    assert positions == sorted(positions)  # from the input row to the asked-for row
    assert out.count("Classify the sentiment") == 1  # the SQL stage passes the row through: shown once


def test_lineage_json_matches_the_cache(ws: Path) -> None:
    proc = show(ws, "explain", "--row", "2.0.0", "--lineage", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert [s["stage"] for s in found["steps"]] == ["input", "classify", "keep", "explain"]
    assert [s["row_id"] for s in found["steps"]] == ["2", "2.0", "2.0", "2.0.0"]
    for step in (found["steps"][1], found["steps"][3]):
        (request, text), = db_rows(ws, f"SELECT request, text FROM calls WHERE key = '{step['row']['_call']}'")
        assert step["call"]["messages"] == json.loads(request)["messages"]
        assert step["call"]["text"] == text
    assert found["steps"][0]["call"] is None and found["steps"][2]["passes"] == "classify"


def test_lineage_of_a_row_that_did_not_parse(ws: Path) -> None:
    found = json.loads(show(ws, "classify", "--row", "3.0", "--lineage", "--json").stdout)
    last = found["steps"][-1]
    assert last["error"].startswith("no option found") and last["call"]["text"] == "maybe"
    assert found["children"] == []  # nothing downstream was made from it


def test_lineage_reads_the_run_schemas(tmp_path: Path) -> None:
    """An earlier run's lineage shows that run's prompts; without --run, the newest run's."""
    root = build_workspace(tmp_path)
    proc = run_cli("run", "reviews", "--model", "*=scripted:script:reply", "-q", "--max-failures", "1",
                   "--set", 'stages.classify.template="Classify, please: {{ text }}"', cwd=root)
    assert proc.returncode == 0, proc.stderr
    newest = show(root, "classify", "--row", "0.0", "--lineage")
    old = show(root, "classify", "--row", "0.0", "--lineage", "--run", "1")
    assert "(run 2)" in newest.stdout and "Classify, please: I loved this film" in newest.stdout
    assert "(run 1)" in old.stdout and "Classify the sentiment of this review: I loved this film" in old.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["classify", "--lineage"], "--lineage needs --row ID"),
    (["classify", "--row", "99.0", "--lineage"], "has no row with _id '99.0' (ids look like: 0.0, 1.0"),
    (["nothing", "--row", "1", "--lineage"], "no pipeline has a table 'nothing'"),
    (["classify", "--row", "1", "--lineage", "--run", "7"], "no run 7 in "),
    (["classify", "--row", "99.0"], "has no row with _id '99.0'"),
    (["calls", "--row", "1"], "has no _id column"),
    (["classify", "--where", "nonsense ==="], "--where 'nonsense ===': Parser Error"),
])
def test_errors_are_one_line(ws: Path, args: list[str], message: str) -> None:
    proc = show(ws, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
