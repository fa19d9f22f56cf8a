"""SSE-CoT and its baselines (direct, zero-shot CoT): exact tables on scripted replies,
the label set overridden for a multi-class dataset, the real datasets, and the embedded model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SHARED, run_cli
from conftest import db_rows as _rows

NEWS_LABELS = "[business,entertainment,health,sci_tech,sport,us,world]"

# Four rows: right, right (said in a sentence), wrong, unparsable.
MINI = [
    {"text": "a funny film", "label": "positive"},
    {"text": "a dull film", "label": "negative"},
    {"text": "a sad but lovely film", "label": "positive"},
    {"text": "a boring film", "label": "negative"},
]
EXPECTED = ["positive", "negative", "negative", None]
# positive: tp 1, fn 1 -> F1 2/3; negative: tp 1, fp 1, fn 1 -> F1 1/2
ACCURACY, MACRO_F1 = 0.5, (2 / 3 + 1 / 2) / 2

REPLIES = '''
import re

ANSWERS = {"a funny film": "positive", "a dull film": "The label is negative.",
           "a sad but lovely film": "negative", "a boring film": "I cannot tell."}


def _line(text, prefix):
    return next(l[len(prefix):].strip() for l in text.splitlines() if l.startswith(prefix))


def reply(request):
    user = request.messages[-1]["content"]
    assert request.messages[0]["role"] == "system"
    if "Step 1 of 4" in user:
        return "concepts of " + _line(user, "Text:")
    if "Step 2 of 4" in user:
        return "knowledge about " + _line(user, "Key concepts:")
    if "Step 3 of 4" in user:
        assert _line(user, "Common-sense knowledge:").startswith("knowledge about concepts of")
        return "rewritten: " + _line(user, "Text:")
    if "Step 4 of 4" in user:
        assert _line(user, "Rewritten text:") == "rewritten: " + _line(user, "Original text:")
        assert "Which label fits it best: positive or negative? The label is" in user
        return ANSWERS[_line(user, "Original text:")]
    if user.endswith("Let's think step by step."):
        return "reasoning about " + _line(user, "Text:")
    if "Therefore" in user:
        assert "reasoning about " + _line(user, "Text:") in user
        return ANSWERS[_line(user, "Text:")]
    if "Classify the text" in user:
        return ANSWERS[_line(user, "Text:")]
    raise AssertionError("unexpected prompt: " + user)


def news(request):
    user = request.messages[-1]["content"]
    if "Step 4 of 4" in user:
        assert "Which label fits it best: business, entertainment, health, sci_tech, sport, us or world?" in user
        return "Label: sci_tech"
    return "something"
'''


def _workspace(workspace: Path) -> Path:
    (workspace / "evaluators" / "sse_replies.py").write_text(REPLIES)
    (workspace / "data" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MINI))
    return workspace


def _run(workspace: Path, *args: str) -> dict[str, Any]:
    proc = run_cli("run", *args, "-q", "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _counts(result: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: s["rows_out"] for s in result["stages"]}


def test_sse_cot_chains_four_steps_and_scores(workspace: Path) -> None:
    ws = _workspace(workspace)
    result = _run(ws, "sse_cot", "--input", "data/mini.jsonl", "--model", "*=scripted:sse_replies:reply")
    assert _counts(result) == {"concepts": 4, "knowledge": 4, "rewrite": 4, "classify": 4, "scores": 1}
    assert result["calls_made"] == 16

    rows = _rows(ws, "SELECT text, concepts, knowledge, rewrite, prediction, _error IS NOT NULL "
                     "FROM main.classify ORDER BY _parent")
    for (text, concepts, knowledge, rewrite, prediction, failed), expected in zip(rows, EXPECTED, strict=True):
        assert concepts == f"concepts of {text}"
        assert knowledge == f"knowledge about concepts of {text}"
        assert rewrite == f"rewritten: {text}"
        assert prediction == expected
        assert failed == (expected is None)

    # lineage: every classify row traces back through rewrite, knowledge and concepts to its input row
    chain = _rows(ws, "SELECT c._parent = r._id, r._parent = k._id, k._parent = o._id, o._parent "
                      "FROM main.classify c JOIN main.rewrite r ON c._parent = r._id "
                      "JOIN main.knowledge k ON r._parent = k._id JOIN main.concepts o ON k._parent = o._id "
                      "ORDER BY o._parent")
    assert chain == [(True, True, True, str(i)) for i in range(4)]

    [(accuracy, macro_f1, n, correct, unparsed)] = _rows(
        ws, "SELECT accuracy, macro_f1, n, correct, unparsed FROM main.scores")
    assert (accuracy, n, correct, unparsed) == (ACCURACY, 4, 2, 1)
    assert macro_f1 == pytest.approx(MACRO_F1)
    recorded = dict(_rows(ws, "SELECT name, value FROM metrics WHERE stage = 'scores' AND pipeline = 'sse_cot'"))
    assert recorded["accuracy"] == ACCURACY
    assert recorded["macro_f1"] == pytest.approx(MACRO_F1)


def test_sse_cot_default_input_is_small(workspace: Path) -> None:
    ws = _workspace(workspace)
    proc = run_cli("run", "sse_cot", "-q", "--json", "--model", "*=scripted:retort.backends.scripted:echo",
                   cwd=ws)
    assert proc.returncode == 0, proc.stderr
    counts = _counts(json.loads(proc.stdout))
    assert counts["concepts"] == 8 and counts["classify"] == 8 and counts["scores"] == 1


@pytest.mark.parametrize("pipeline", ["direct", "zero_shot_cot"])
def test_baselines_score_the_same_rows(workspace: Path, pipeline: str) -> None:
    ws = _workspace(workspace)
    result = _run(ws, pipeline, "--input", "data/mini.jsonl", "--model", "*=scripted:sse_replies:reply")
    expected_counts = {"classify": 4, "scores": 1}
    if pipeline == "zero_shot_cot":
        expected_counts["reason"] = 4
        reasons = _rows(ws, "SELECT text, reasoning FROM main.reason ORDER BY _parent")
        assert reasons == [(r["text"], f"reasoning about {r['text']}") for r in MINI]
    assert _counts(result) == expected_counts
    predictions = [r[0] for r in _rows(ws, "SELECT prediction FROM main.classify ORDER BY _parent")]
    assert predictions == EXPECTED
    [(accuracy, macro_f1)] = _rows(ws, "SELECT accuracy, macro_f1 FROM main.scores")
    assert accuracy == ACCURACY
    assert macro_f1 == pytest.approx(MACRO_F1)


def test_label_set_is_overridden_for_a_news_dataset(workspace: Path) -> None:
    """The built-in multi-class sample: one --set of params.labels changes the prompts and the choice parser."""
    ws = _workspace(workspace)
    result = _run(ws, "sse_cot", "--input", "data/news_sample.jsonl", "--map", "text=title", "--limit", "7",
                  "--set", f"params.labels={NEWS_LABELS}",
                  "--set", "params.task=the topic of a news headline", "--model", "*=scripted:sse_replies:news")
    assert _counts(result)["classify"] == 7
    rows = _rows(ws, "SELECT prediction, label, text = title FROM main.classify")
    assert {r[0] for r in rows} == {"sci_tech"}
    assert all(r[2] for r in rows)  # --map text=title
    gold = sum(1 for r in rows if r[1] == "sci_tech")
    [(accuracy,)] = _rows(ws, "SELECT accuracy FROM main.scores")
    assert accuracy == pytest.approx(gold / 7)


def test_classification_metrics_counts_unparsed_and_loose_matches() -> None:
    path = ROOT / "evaluators" / "classification.py"
    spec = importlib.util.spec_from_file_location("retort_test_classification", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"p": "Sci-Tech.", "g": "sci_tech"}, {"p": "sport", "g": "sport"}, {"p": None, "g": "sport"},
            {"p": "world", "g": None}]
    strict = module.classification_metrics(rows, prediction="p", reference="g")
    assert (strict["accuracy"], strict["n"], strict["unparsed"]) == (1 / 3, 3, 1)
    loose = module.classification_metrics(rows, prediction="p", reference="g", loose=True)
    assert (loose["accuracy"], loose["correct"]) == (2 / 3, 2)
    assert loose["per_label"] == {"sci_tech": 1.0, "sport": pytest.approx(2 / 3)}
    assert loose["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    with_labels = module.classification_metrics(rows, prediction="p", reference="g", labels=["world"], loose=True)
    assert with_labels["per_label"] == loose["per_label"]  # no support and no prediction: left out


def test_validate_all_three_pipelines() -> None:
    for pipeline in ("sse_cot", "direct", "zero_shot_cot"):
        proc = run_cli("validate", pipeline, "--model", "*=scripted:retort.backends.scripted:echo", cwd=ROOT)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is absent")
def test_real_datasets_load(workspace: Path) -> None:
    ws = _workspace(workspace)
    echo = "*=scripted:retort.backends.scripted:echo"
    result = _run(ws, "sse_cot", "--input", str(SHARED / "sst2_test.jsonl"), "--limit", "2", "--model", echo)
    assert _counts(result)["classify"] == 2
    result = _run(ws, "sse_cot", "--input", str(SHARED / "tagmynews_sample.jsonl"), "--map", "text=title",
                  "--limit", "2", "--set", f"params.labels={NEWS_LABELS}", "--model", echo)
    assert _counts(result)["classify"] == 2
    for name in ("trec_test", "snippets_test", "mr_test"):
        proc = run_cli("validate", "direct", "--input", str(SHARED / f"{name}.jsonl"), "--model", echo, cwd=ws)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.local_model
@pytest.mark.parametrize("pipeline, stages", [
    ("sse_cot", {"concepts": 2, "knowledge": 2, "rewrite": 2, "classify": 2, "scores": 1}),
    ("direct", {"classify": 2, "scores": 1}),
    ("zero_shot_cot", {"reason": 2, "classify": 2, "scores": 1}),
])
def test_embedded_model_end_to_end(workspace: Path, pipeline: str, stages: dict[str, int]) -> None:
    proc = run_cli("run", pipeline, "--limit", "2", "-q", "--json", "--max-failures", "0", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    assert _counts(result) == stages
    for name, count in stages.items():
        assert _rows(workspace, f"SELECT count(*) FROM main.{name}") == [(count,)]
    [(n,)] = _rows(workspace, "SELECT n FROM main.scores")
    assert n == 2
