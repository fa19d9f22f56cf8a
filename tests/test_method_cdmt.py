"""CDMT / distilling step by step: the teacher's rationales, the gold-label gate,
rationalization with the label as a hint, the final `dataset` table and its multitask export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, run_cli
from conftest import db_rows as _rows

MINI = [
    {"text": "a funny film", "label": "positive"},   # teacher right
    {"text": "a dull film", "label": "negative"},    # teacher wrong, rationalized right
    {"text": "a broken film", "label": "negative"},  # teacher unparsable, rationalization refuses the hint
    {"text": "a lovely film", "label": "positive"},  # teacher right ("Positive." still matches)
    {"text": "a weird film", "label": "positive"},   # teacher wrong, rationalized right
]

REPLIES = '''
import json
import re

TEACHER = {"a funny film": "positive", "a dull film": "positive", "a broken film": None,
           "a lovely film": "Positive.", "a weird film": "negative"}
HINTED = {"a dull film": "negative", "a broken film": "positive", "a weird film": "positive"}


def _answer(text, label, tag):
    n = text.split()[1]
    return json.dumps({"concepts": f"C {n}{tag}", "knowledge": f"K {n}{tag}", "rewrite": f"R {n}{tag}",
                       "entities": f"E {n}{tag}", "events": f"V {n}{tag}", "relations": f"X {n}{tag}",
                       "predicted_label": label})


def reply(request):
    user = request.messages[-1]["content"]
    text = user.splitlines()[0].removeprefix("Text: ")
    assert "Labels: positive, negative." in user
    hint = re.search(r'the correct label is "([^"]+)"', user)
    if hint is None:
        label = TEACHER[text]
        return "I am not writing JSON today." if label is None else _answer(text, label, "")
    assert hint.group(1) in ("negative", "positive")
    return _answer(text, HINTED[text], "*")
'''


def _workspace(workspace: Path) -> Path:
    (workspace / "evaluators" / "cdmt_replies.py").write_text(REPLIES)
    (workspace / "data" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MINI))
    return workspace


def _run(workspace: Path, *args: str) -> dict[str, Any]:
    proc = run_cli("run", "cdmt", "--input", "data/mini.jsonl", "--model", "*=scripted:cdmt_replies:reply",
                   *args, "-q", "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _counts(result: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: s["rows_out"] for s in result["stages"]}


def _rationale(n: str) -> str:
    return f"Key concepts: C {n}\nCommon-sense knowledge: K {n}\nRewritten text: R {n}"


def _domain(n: str) -> str:
    return f"Key entities: E {n}\nActions and events: V {n}\nHow they relate: X {n}"


def test_gate_and_rationalization_build_the_dataset(workspace: Path) -> None:
    ws = _workspace(workspace)
    result = _run(ws)
    assert _counts(result) == {"teach": 5, "retry": 3, "rationalize": 3, "teacher_scores": 1, "dataset": 4}
    assert _rows(ws, "SELECT _id FROM main.retry ORDER BY _id") == [("1",), ("2",), ("4",)]
    assert _rows(ws, "SELECT _parent, predicted_label FROM main.rationalize ORDER BY _parent") == [
        ("1", "negative"), ("2", "positive"), ("4", "positive")]

    dataset = _rows(ws, "SELECT _id, _parent, text, label, rationale, domain_rationale, rationalized "
                        "FROM main.dataset")
    assert dataset == [
        ("0.0", "0", "a funny film", "positive", _rationale("funny"), _domain("funny"), False),
        ("1.0", "1", "a dull film", "negative", _rationale("dull*"), _domain("dull*"), True),
        ("3.0", "3", "a lovely film", "positive", _rationale("lovely"), _domain("lovely"), False),
        ("4.0", "4", "a weird film", "positive", _rationale("weird*"), _domain("weird*"), True),
    ]
    # lineage: each row's call is the one that wrote it
    calls = _rows(ws, "SELECT d._id, c.stage FROM main.dataset d JOIN calls c ON c.key = d._call ORDER BY d._id")
    assert calls == [("0.0", "teach"), ("1.0", "rationalize"), ("3.0", "teach"), ("4.0", "rationalize")]

    [(accuracy, n, correct, unparsed)] = _rows(ws, "SELECT accuracy, n, correct, unparsed FROM main.teacher_scores")
    assert (accuracy, n, correct, unparsed) == (0.4, 5, 2, 1)


def test_rationalization_can_be_turned_off(workspace: Path) -> None:
    ws = _workspace(workspace)
    result = _run(ws, "--set", "params.rationalize=false")
    assert _counts(result) == {"teach": 5, "retry": 0, "rationalize": 0, "teacher_scores": 1, "dataset": 2}
    assert result["calls_made"] == 5
    assert _rows(ws, "SELECT _parent, rationalized FROM main.dataset") == [("0", False), ("3", False)]


def test_dataset_exports_as_multitask(workspace: Path) -> None:
    ws = _workspace(workspace)
    _run(ws)
    proc = run_cli("export", "dataset", "--format", "multitask", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    lines = (ws / "exports" / "dataset.multitask.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12
    assert records[:3] == [
        {"input": "predict: a funny film", "output": "positive", "task": "predict"},
        {"input": "explain: a funny film", "output": _rationale("funny"), "task": "explain"},
        {"input": "explain_domain: a funny film", "output": _domain("funny"), "task": "explain_domain"},
    ]
    manifest = json.loads((ws / "exports" / "dataset.multitask.jsonl.manifest.json").read_text())
    assert (manifest["pipeline"], manifest["kept"], manifest["rows"]) == ("cdmt", 4, 12)


def test_label_set_comes_from_params(workspace: Path) -> None:
    ws = _workspace(workspace)
    proc = run_cli("run", "cdmt", "--input", "data/news_sample.jsonl", "--limit", "3", "--map", "text=title",
                   "--set", "params.labels=[business,sport]", "--set", "params.task=the topic of a headline",
                   "--model", "*=scripted:retort.backends.scripted:echo", "-q", "--json", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    prompts = _rows(ws, "SELECT request FROM calls WHERE stage = 'teach'")
    assert len(prompts) == 3
    assert all("Labels: business, sport." in p[0] and "the topic of a headline" in p[0] for p in prompts)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is absent")
def test_real_datasets_load(workspace: Path) -> None:
    echo = "*=scripted:retort.backends.scripted:echo"
    for args in (["--input", str(SHARED / "sst2_test.jsonl")],
                 ["--input", str(SHARED / "tagmynews_sample.jsonl"), "--map", "text=title",
                  "--set", "params.labels=[business,entertainment,health,sci_tech,sport,us,world]"]):
        proc = run_cli("run", "cdmt", *args, "--limit", "2", "--model", echo, "-q", "--json", cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        counts = _counts(json.loads(proc.stdout))
        assert counts["teach"] == 2 and counts["retry"] == 2 and counts["dataset"] == 0


@pytest.mark.local_model
def test_embedded_model_end_to_end(workspace: Path) -> None:
    proc = run_cli("run", "cdmt", "--limit", "2", "-q", "--json", "--max-failures", "0", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    counts = _counts(result)
    assert counts["teach"] == 2 and counts["teacher_scores"] == 1
    assert counts["rationalize"] == counts["retry"] <= 2
    assert counts["dataset"] <= 2
    for name in ("teach", "retry", "rationalize", "teacher_scores", "dataset"):
        assert _rows(workspace, f"SELECT count(*) FROM main.{name}") == [(counts[name],)]
