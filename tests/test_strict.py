"""Garbage is loud: the run summary warns when a prompt stage's rows mostly fail to parse or a
table comes out empty, and `--strict` (or `strict: true`) turns those warnings into exit 5 after
the run is recorded. CDMT runs through the real CLI with a scripted teacher."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import db_rows, run_cli

from retort.cli import EXIT_WARNINGS
from retort.progress import PARSE_ERROR_RATE, run_warnings
from retort.runner import RunResult, StageStats
from retort.spec import Pipeline

MINI = [{"text": "a funny film", "label": "positive"}, {"text": "a dull film", "label": "negative"},
        {"text": "a broken film", "label": "negative"}, {"text": "a lovely film", "label": "positive"},
        {"text": "a weird film", "label": "positive"}]

TEACHERS = '''
import json

GOLD = {"a funny film": "positive", "a dull film": "negative", "a broken film": "negative",
        "a lovely film": "positive", "a weird film": "positive"}


def garbage(request):
    return "I am not writing JSON today."


def right(request):
    text = request.messages[-1]["content"].splitlines()[0].removeprefix("Text: ")
    return json.dumps({"concepts": "c", "knowledge": "k", "rewrite": "r", "entities": "e", "events": "v",
                       "relations": "x", "predicted_label": GOLD[text]})
'''


def _cdmt(ws: Path, teacher: str, *args: str) -> tuple[int, str, str]:
    (ws / "evaluators" / "teachers.py").write_text(TEACHERS)
    (ws / "data" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MINI))
    # retort's gated variant (rows leave the dataset unless their label is right, misses rationalized):
    # a teacher that never parses then leaves the dataset empty, the case that printed a plain "ok"
    proc = run_cli("run", "cdmt", "--input", "data/mini.jsonl", "--model", f"teacher=scripted:teachers:{teacher}",
                   "--set", "params.gate=rows", "--set", "params.rationalize=true", "-q", *args, cwd=ws)
    return proc.returncode, proc.stdout, proc.stderr


GARBAGE_WARNINGS = [
    "teach: 5 of 5 rows did not parse (100%); their parsed columns are null, see "
    "retort show teach --where \"_error IS NOT NULL\" --columns _raw,_error",
    "rationalize: 5 of 5 rows did not parse (100%); their parsed columns are null, see "
    "retort show rationalize --where \"_error IS NOT NULL\" --columns _raw,_error",
    "dataset is empty, and no later stage reads it: the run delivers no rows there",
]


def test_a_garbage_run_no_longer_reads_as_a_plain_ok(workspace: Path) -> None:
    code, out, err = _cdmt(workspace, "garbage")
    assert code == 0, err  # warnings alone do not fail a run unless it is strict
    assert "run 1 of cdmt: ok in " in out and ", 3 warnings" in out.splitlines()[0]
    lines = [" ".join(line.split()) for line in out.replace("\n  ", " ").splitlines()]
    for warning in GARBAGE_WARNINGS:
        assert f"warning: {warning}" in " ".join(lines), warning
    code, out, err = _cdmt(workspace, "garbage", "--json")
    assert code == 0, err
    assert json.loads(out)["warnings"] == GARBAGE_WARNINGS
    assert [line for line in err.splitlines() if line.startswith("warning: ")] == [
        f"warning: {w}" for w in GARBAGE_WARNINGS]


def test_strict_exits_5_after_the_run_is_recorded(workspace: Path) -> None:
    code, out, err = _cdmt(workspace, "garbage", "--strict", "--json")
    assert code == EXIT_WARNINGS == 5
    assert json.loads(out)["warnings"] == GARBAGE_WARNINGS
    assert err.strip().splitlines()[-1] == "3 warning(s) and --strict: exit 5 (run 1 is recorded)"
    assert db_rows(workspace, "SELECT run_id, status FROM runs") == [(1, "ok")]
    assert db_rows(workspace, "SELECT count(*) FROM cdmt.teach") == [(5,)]  # the tables are there to inspect
    assert db_rows(workspace, "SELECT count(*) FROM cdmt.dataset") == [(0,)]
    code, _, err = _cdmt(workspace, "garbage", "--set", "strict=true")  # the spec setting does the same
    assert code == 5
    assert err.strip().splitlines()[-1].startswith("3 warning(s) and strict: true in ")
    assert db_rows(workspace, "SELECT count(*) FROM runs WHERE status = 'ok'") == [(2,)]


def test_a_clean_run_is_not_warned_about_its_empty_retry_table(workspace: Path) -> None:
    code, out, err = _cdmt(workspace, "right", "--strict", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["warnings"] == []
    rows = {s["name"]: s["rows_out"] for s in result["stages"]}
    assert (rows["retry"], rows["rationalize"], rows["dataset"]) == (0, 0, 5)  # empty in between, by design


def test_the_parse_error_threshold_and_an_all_failed_stage() -> None:
    spec = Pipeline.model_validate({"input": {"path": "x.jsonl"}, "stages": [
        {"name": "ask", "template": "{{ text }}"}, {"name": "scores", "python": "m", "from": "ask"}]})

    def warnings(**counts: int) -> list[str]:
        ask = StageStats("ask", "prompt", **counts)
        return run_warnings(RunResult(1, "p", "db", [ask, StageStats("scores", "python", rows_in=1, rows_out=1)]),
                            spec)

    assert PARSE_ERROR_RATE == 0.2
    assert warnings(rows_in=5, rows_out=5, parse_errors=1)[0].startswith("ask: 1 of 5 rows did not parse (20%)")
    assert warnings(rows_in=6, rows_out=6, parse_errors=1) == []
    assert warnings(rows_in=4, rows_out=0, failures=4) == [
        "ask is empty: none of its 4 input rows gave a row (4 failed calls, see retort show failures)"]
