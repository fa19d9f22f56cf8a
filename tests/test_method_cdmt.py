"""CDMT / distilling step by step: the teacher's rationales, the `dataset` table laid out as the
reference trains (predict: every example with its gold label, explain: the teacher's rationale),
the opt-in gates, rationalization with the label as a hint, and the multitask export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, run_cli
from conftest import db_rows as _rows

MINI = [
    {"text": "a funny film", "label": "positive"},   # teacher right
    {"text": "a dull film", "label": "negative"},    # teacher wrong, rationalized right
    {"text": "a broken film", "label": "negative"},  # teacher unparsable, rationalization ignores the hint
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


# The reference's row layout (google-research/distilling-step-by-step, run.py with --label_type gt
# and --model_type task_prefix), written out by hand for MINI: every example trains predict: on its
# GOLD label, and explain: on the rationale the LLM wrote for it, whichever label the LLM reached
# (no filter); an output with no parsable rationale writes no explain: record here (the reference
# trains on ' ', data_utils.py's fallback).
TEACHER_WROTE = {"a funny film": "funny", "a dull film": "dull", "a lovely film": "lovely", "a weird film": "weird"}


def _reference_records(rationales: dict[str, str]) -> list[dict[str, str]]:
    out = []
    for row in MINI:
        out.append({"input": "predict: " + row["text"], "output": row["label"], "task": "predict"})
        if row["text"] in rationales:
            n = rationales[row["text"]]
            out.append({"input": "explain: " + row["text"], "output": _rationale(n), "task": "explain"})
            out.append({"input": "explain_domain: " + row["text"], "output": _domain(n), "task": "explain_domain"})
    return out


def _export(ws: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    proc = run_cli("export", "dataset", "--format", "multitask", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    lines = (ws / "exports" / "dataset.multitask.jsonl").read_text().splitlines()
    manifest = json.loads((ws / "exports" / "dataset.multitask.jsonl.manifest.json").read_text())
    return [json.loads(line) for line in lines], manifest


def test_default_is_the_references_layout(workspace: Path) -> None:
    ws = _workspace(workspace)
    result = _run(ws)
    assert _counts(result) == {"teach": 5, "retry": 0, "rationalize": 0, "teacher_scores": 1, "dataset": 5}
    assert result["calls_made"] == 5
    records, manifest = _export(ws)
    assert records == _reference_records(TEACHER_WROTE)
    # predict: every example, gold label; explain: every rationale, the wrong-label ones ("dull", "weird") too
    assert [r["output"] for r in records if r["task"] == "predict"] == [r["label"] for r in MINI]
    assert (manifest["kept"], manifest["rows"]) == (5, 13)
    assert _rows(ws, "SELECT _id, teacher_label, label_matches, rationalized FROM main.dataset") == [
        ("0", "positive", True, False), ("1", "positive", False, False), ("2", None, False, False),
        ("3", "Positive.", True, False), ("4", "negative", False, False)]
    calls = _rows(ws, "SELECT d._id, c.stage FROM main.dataset d JOIN calls c ON c.key = d._call ORDER BY d._id")
    assert calls == [("0", "teach"), ("1", "teach"), ("3", "teach"), ("4", "teach")]
    [(accuracy, n, correct, unparsed)] = _rows(ws, "SELECT accuracy, n, correct, unparsed FROM main.teacher_scores")
    assert (accuracy, n, correct, unparsed) == (0.4, 5, 2, 1)


def test_the_explain_gate_never_removes_an_example_from_predict(workspace: Path) -> None:
    ws = _workspace(workspace)
    _run(ws, "--set", "params.gate=explain")
    records, _ = _export(ws)
    assert records == _reference_records({"a funny film": "funny", "a lovely film": "lovely"})
    assert sum(r["task"] == "predict" for r in records) == len(MINI)


def test_rationalization_is_gated_on_the_label_the_teacher_concludes(workspace: Path) -> None:
    ws = _workspace(workspace)
    result = _run(ws, "--set", "params.gate=explain", "--set", "params.rationalize=true")
    assert _counts(result) == {"teach": 5, "retry": 3, "rationalize": 3, "teacher_scores": 1, "dataset": 5}
    assert _rows(ws, "SELECT _id FROM main.retry ORDER BY _id") == [("1",), ("2",), ("4",)]
    # the hinted prompt leaves the label to the teacher: the gate can and does refuse one ("broken")
    hinted = [json.loads(r)["messages"][-1]["content"] for (r,) in
              _rows(ws, "SELECT request FROM calls WHERE stage = 'rationalize'")]
    assert all('the correct label is "' in p for p in hinted)
    assert not any(re.search(r'"predicted_label": "(positive|negative)"', p) for p in hinted)
    assert _rows(ws, "SELECT _parent, predicted_label FROM main.rationalize ORDER BY _parent") == [
        ("1", "negative"), ("2", "positive"), ("4", "positive")]
    records, _ = _export(ws)
    assert records == _reference_records({"a funny film": "funny", "a dull film": "dull*", "a lovely film": "lovely",
                                          "a weird film": "weird*"})
    assert _rows(ws, "SELECT _id, rationalized, rationale IS NOT NULL FROM main.dataset") == [
        ("0", False, True), ("1", True, True), ("2", True, False), ("3", False, True), ("4", True, True)]
    calls = _rows(ws, "SELECT d._id, c.stage FROM main.dataset d JOIN calls c ON c.key = d._call ORDER BY d._id")
    assert calls == [("0", "teach"), ("1", "rationalize"), ("2", "rationalize"), ("3", "teach"),
                     ("4", "rationalize")]


def test_the_row_gate_is_retorts_earlier_variant(workspace: Path) -> None:
    ws = _workspace(workspace)
    _run(ws, "--set", "params.gate=rows", "--set", "params.rationalize=true")
    assert _rows(ws, "SELECT _id, text, label, rationale, domain_rationale, rationalized FROM main.dataset") == [
        ("0", "a funny film", "positive", _rationale("funny"), _domain("funny"), False),
        ("1", "a dull film", "negative", _rationale("dull*"), _domain("dull*"), True),
        ("3", "a lovely film", "positive", _rationale("lovely"), _domain("lovely"), False),
        ("4", "a weird film", "positive", _rationale("weird*"), _domain("weird*"), True),
    ]
    records, manifest = _export(ws)
    assert sum(r["task"] == "predict" for r in records) == 4  # "a broken film" left predict: too
    assert (manifest["kept"], manifest["rows"]) == (4, 12)


def test_an_unknown_gate_is_one_clear_error(workspace: Path) -> None:
    ws = _workspace(workspace)
    proc = run_cli("run", "cdmt", "--input", "data/mini.jsonl", "--model", "*=scripted:cdmt_replies:reply",
                   "--set", "params.gate=strict", "-q", cwd=ws)
    assert proc.returncode != 0
    assert "params.gate must be none, explain or rows, got strict" in proc.stderr
    assert "Traceback" not in proc.stderr


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
        # echo writes no JSON: every example still trains predict:, none has a rationale
        assert counts["teach"] == 2 and counts["retry"] == 0 and counts["dataset"] == 2
        assert _rows(workspace, "SELECT count(rationale) FROM main.dataset") == [(0,)]


@pytest.mark.local_model
def test_embedded_model_end_to_end(workspace: Path) -> None:
    proc = run_cli("run", "cdmt", "--limit", "2", "-q", "--json", "--max-failures", "0", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    counts = _counts(result)
    assert counts["teach"] == 2 and counts["teacher_scores"] == 1
    assert counts["rationalize"] == counts["retry"] == 0
    assert counts["dataset"] == 2
    for name in ("teach", "retry", "rationalize", "teacher_scores", "dataset"):
        assert _rows(workspace, f"SELECT count(*) FROM main.{name}") == [(counts[name],)]
