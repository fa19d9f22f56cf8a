"""LbT M3 (pipelines/lbt_m3.yaml): the refinement loop's bookkeeping on scripted replies.

The scripted students answer from markers in the examples they are shown:
GOLD examples teach the task (every answer right), SILVER ones only the "easy"
texts, and the initial examples (no marker) teach nothing (alice always says
positive, bob always negative). The teacher rewrites any examples into
[GOLD, SILVER, an unparseable reply]. When the teacher classifies (it scores the
candidates and sits the held-out evaluation, as in the reference), it gets every
text right with GOLD or SILVER examples and says negative with any others. The
minibatch is the whole pool, so every score below follows by hand.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT, SHARED, run_cli
from conftest import db_rows as _sql

SCRIPT = '''
def _query(text):
    return text.rsplit("Text:", 1)[1].split("Label:")[0].strip()


def _truth(query):
    return "positive" if "good" in query else "negative"


def _student(request, fallback):
    text = "\\n".join(m["content"] for m in request.messages)
    shown, query = text.rsplit("Text:", 1)[0], _query(text)
    if "GOLD" in shown:
        return _truth(query)
    if "SILVER" in shown:
        if "easy" in query:
            return _truth(query)
        return "negative" if _truth(query) == "positive" else "positive"
    return fallback


def alice(request):
    return _student(request, "positive")


def bob(request):
    return _student(request, "The answer is negative.")


REWRITES = [
    "Text: GOLD good example\\nLabel: positive\\n\\nText: GOLD bad example\\nLabel: negative",
    "Here you go.\\nText: SILVER good example\\nLabel: Positive.\\nText: SILVER bad example\\nLabel: negative",
    "I cannot write examples.",
]


def teacher(request):
    text = "\\n".join(m["content"] for m in request.messages)
    if "Answer with one word" in text:  # the classify prompt: the teacher as scorer or evaluator
        shown = text.rsplit("Text:", 1)[0]
        return _truth(_query(text)) if "GOLD" in shown or "SILVER" in shown else "negative"
    if "explain why the examples" in text:
        return "The examples never show a negative review that sounds mild."
    if "better examples" in text:
        return REWRITES[: request.n]
    if "varied examples" in text:
        return "Text: TEACHER good one\\nLabel: positive\\nText: TEACHER bad one\\nLabel: negative"
    raise AssertionError(text)
'''

ROWS = [
    ("plain good film", "positive", "train"), ("plain bad film", "negative", "train"),
    ("easy good plot", "positive", "pool"), ("easy bad plot", "negative", "pool"),
    ("hard good plot", "positive", "pool"), ("hard bad plot", "negative", "pool"),
    ("easy good cast", "positive", "heldout"), ("easy bad cast", "negative", "heldout"),
    ("hard good cast", "positive", "heldout"), ("hard bad cast", "negative", "heldout"),
    ("hard bad song", "negative", "heldout"),  # positive is the held-out minority (2 of 5)
]
MODELS = ("--model", "alice=scripted:m3fake:alice", "--model", "bob=scripted:m3fake:bob",
          "--model", "default=scripted:m3fake:teacher")
PARAMS = ("--set", "params.students=[alice, bob]", "--set", "params.n_examples=2", "--set", "params.rounds=2",
          "--set", "params.beam=2", "--set", "params.candidates=3", "--set", "params.minibatch=4")


@pytest.fixture
def m3(workspace: Path) -> Path:
    (workspace / "evaluators" / "m3fake.py").write_text(SCRIPT)
    with (workspace / "data" / "m3.jsonl").open("w") as f:
        for i, (text, label, split) in enumerate(ROWS):
            f.write(json.dumps({"id": i, "text": text, "label": label, "split": split}) + "\n")
    return workspace


def _run(ws: Path, *extra: str) -> dict[str, Any]:
    proc = run_cli("run", "lbt_m3", "--input", "data/m3.jsonl", *MODELS, *PARAMS, *extra, "--json", "-q", cwd=ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_default_roles_students_find_failures_the_teacher_scores_and_is_evaluated(m3: Path) -> None:
    _run(m3)
    candidates = _sql(m3, "SELECT round, candidate, parent, role, status, minibatch_score, kept "
                          "FROM main.refine__candidates ORDER BY round, candidate")
    assert candidates == [
        (0, "r0.c0", None, "initial", "ok", None, True),
        (1, "r0.c0", None, "parent", "ok", 0.5, False),      # the teacher says negative to all: 2 of 4
        (1, "r1.c0", "r0.c0", "rewrite", "ok", 1.0, True),
        (1, "r1.c1", "r0.c0", "rewrite", "ok", 1.0, True),   # the teacher, unlike the students, learns from SILVER
        (1, "r1.c2", "r0.c0", "rewrite", "unparsed", None, False),
        (2, "r1.c0", "r0.c0", "parent", "ok", 1.0, True),    # the students make no mistake: not rewritten
        (2, "r1.c1", "r0.c0", "parent", "ok", 1.0, True),
        (2, "r2.c0", "r1.c1", "rewrite", "ok", 1.0, False),  # ties keep the earlier: members before rewrites
        (2, "r2.c1", "r1.c1", "rewrite", "ok", 1.0, False),
        (2, "r2.c2", "r1.c1", "rewrite", "unparsed", None, False),
    ]
    assert _sql(m3, "SELECT round, parents, failures, rewrites, valid, best, beam FROM main.refine__rounds "
                    "ORDER BY round") == [(1, 1, 4, 3, 2, "r1.c0", "r1.c0,r1.c1"),
                                          (2, 2, 4, 3, 2, "r1.c0", "r1.c0,r1.c1")]
    # the held-out evaluation is the teacher's (model `default`), never a student's
    heldout = _sql(m3, "SELECT set, candidate, model, count(*), sum(correct::INT) FROM main.refine__heldout "
                       "GROUP BY ALL ORDER BY set DESC")
    assert heldout == [("initial", "r0.c0", "default", 5, 3), ("final", "r1.c0", "default", 5, 5)]
    metrics = _sql(m3, "SELECT scorers, evaluators, f1_label, initial_heldout_accuracy, final_heldout_accuracy, "
                       "initial_heldout_f1, final_heldout_f1 FROM main.refine")
    # minority class positive: the initial examples never predict it (F1 0); the final ones get all right
    assert metrics == [("default", "default", "positive", 0.6, 1.0, 0.0, 1.0)]
    # the students only classified beam members on the minibatch: round 1 one member, round 2 two, 4 items each
    student_calls = _sql(m3, "SELECT count(*) FROM main.calls WHERE model LIKE '%alice%' OR model LIKE '%bob%'")
    assert student_calls == [(2 * (1 + 2) * 4,)]


def test_students_as_scorers_and_evaluators_is_retorts_earlier_variant(m3: Path) -> None:
    _run(m3, "--set", "params.scorers=[alice, bob]", "--set", "params.evaluators=[alice, bob]")
    candidates = _sql(m3, "SELECT round, candidate, parent, role, status, minibatch_score, kept "
                          "FROM main.refine__candidates ORDER BY round, candidate")
    assert candidates == [
        (0, "r0.c0", None, "initial", "ok", None, True),
        (1, "r0.c0", None, "parent", "ok", 0.5, True),       # ties with r1.c1: the parent keeps its place
        (1, "r1.c0", "r0.c0", "rewrite", "ok", 1.0, True),
        (1, "r1.c1", "r0.c0", "rewrite", "ok", 0.5, False),
        (1, "r1.c2", "r0.c0", "rewrite", "unparsed", None, False),
        (2, "r0.c0", None, "parent", "ok", 0.5, False),
        (2, "r1.c0", "r0.c0", "parent", "ok", 1.0, True),    # no failure: not rewritten
        (2, "r2.c0", "r0.c0", "rewrite", "ok", 1.0, True),
        (2, "r2.c1", "r0.c0", "rewrite", "ok", 0.5, False),
        (2, "r2.c2", "r0.c0", "rewrite", "unparsed", None, False),
    ]
    # the parent column of a carried beam member is its own parent (None for the initial set)
    assert _sql(m3, "SELECT DISTINCT parent FROM main.refine__candidates WHERE candidate = 'r1.c0'") == [("r0.c0",)]
    assert _sql(m3, "SELECT examples FROM main.refine__candidates WHERE candidate = 'r1.c1' AND round = 1") == [
        ("Text: SILVER good example\nLabel: positive\n\nText: SILVER bad example\nLabel: negative",)]

    rounds = _sql(m3, "SELECT round, minibatch, parents, failures, rewrites, valid, best, best_score, beam "
                      "FROM main.refine__rounds ORDER BY round")
    assert rounds == [(1, "2,3,4,5", 1, 4, 3, 2, "r1.c0", 1.0, "r1.c0,r0.c0"),
                      (2, "2,3,4,5", 2, 4, 3, 2, "r1.c0", 1.0, "r1.c0,r2.c0")]

    heldout = _sql(m3, "SELECT set, candidate, model, count(*), sum(correct::INT) FROM main.refine__heldout "
                       "GROUP BY ALL ORDER BY set DESC, model")
    assert heldout == [("initial", "r0.c0", "alice", 5, 2), ("initial", "r0.c0", "bob", 5, 3),
                       ("final", "r1.c0", "alice", 5, 5), ("final", "r1.c0", "bob", 5, 5)]
    metrics = _sql(m3, "SELECT rounds, init, final_candidate, candidates, heldout_n, initial_heldout_accuracy, "
                       "final_heldout_accuracy, heldout_gain, final_minibatch_score, initial_heldout_f1 "
                       "FROM main.refine")
    # initial: alice says positive to all (TP 2, FP 3), bob never does (FN 2): F1(positive) = 4 / (4 + 3 + 2)
    assert metrics == [(2, "sample", "r1.c0", 6, 5, 0.5, 1.0, 0.5, 1.0, pytest.approx(4 / 9))]
    recorded = dict(_sql(m3, "SELECT name, value FROM main.metrics WHERE stage = 'refine'"))
    assert recorded["final_heldout_accuracy"] == 1.0 and recorded["initial_heldout_accuracy"] == 0.5


def test_failures_are_pooled_across_students(m3: Path) -> None:
    _run(m3)
    failures = _sql(m3, "SELECT round, candidate, student, item, label, prediction FROM main.refine__failures "
                        "ORDER BY round, candidate, item, student")
    assert failures == [  # round 1: the initial set (alice says positive, bob negative); round 2: SILVER
        (1, "r0.c0", "bob", "2", "positive", "negative"), (1, "r0.c0", "alice", "3", "negative", "positive"),
        (1, "r0.c0", "bob", "4", "positive", "negative"), (1, "r0.c0", "alice", "5", "negative", "positive"),
        (2, "r1.c1", "alice", "4", "positive", "negative"), (2, "r1.c1", "bob", "4", "positive", "negative"),
        (2, "r1.c1", "alice", "5", "negative", "positive"), (2, "r1.c1", "bob", "5", "negative", "positive"),
    ]
    assert _sql(m3, "SELECT round, candidate, failures_shown, reasons FROM main.refine__feedback ORDER BY round") == [
        (1, "r0.c0", 4, "The examples never show a negative review that sounds mild."),
        (2, "r1.c1", 2, "The examples never show a negative review that sounds mild.")]
    # the teacher saw every student's failure, each item once with every wrong answer given
    prompts = sorted(json.loads(m)["messages"][-1]["content"] for (m,) in
                     _sql(m3, "SELECT request FROM main.calls WHERE request LIKE '%explain why the examples%'"))
    assert len(prompts) == 2
    first = next(p for p in prompts if "easy good plot" in p)
    for text, wrong in (("easy good plot", "negative"), ("easy bad plot", "positive"),
                        ("hard good plot", "negative"), ("hard bad plot", "positive")):
        assert f"- Text: {text}\n  Correct label: {'positive' if 'good' in text else 'negative'}; " \
               f"students answered: {wrong}" in first
    second = next(p for p in prompts if "easy good plot" not in p)
    assert "- Text: hard good plot\n  Correct label: positive; students answered: negative, negative" in second


def test_failures_shown_are_capped(m3: Path) -> None:
    _run(m3, "--set", "params.max_failures_shown=2", "--set", "params.rounds=1")
    assert _sql(m3, "SELECT failures_shown FROM main.refine__feedback") == [(2,)]
    assert _sql(m3, "SELECT count(*) FROM main.refine__failures") == [(4,)]  # the table keeps them all


def test_without_parents_the_beam_is_the_best_rewrites(m3: Path) -> None:
    _run(m3, "--set", "params.keep_parents=false")
    # round 1 drops r0.c0 for the SILVER rewrite it ties with; round 2 rewrites SILVER (it fails the hard texts)
    assert _sql(m3, "SELECT round, beam FROM main.refine__rounds ORDER BY round") == [
        (1, "r1.c0,r1.c1"), (2, "r2.c0,r2.c1")]
    assert _sql(m3, "SELECT DISTINCT parent FROM main.refine__candidates WHERE round = 2 AND role = 'rewrite'") == [
        ("r1.c1",)]
    assert _sql(m3, "SELECT final_candidate, final_heldout_accuracy FROM main.refine") == [("r2.c0", 1.0)]


def test_rerun_makes_no_calls_and_gives_the_same_tables(m3: Path) -> None:
    first = _run(m3)
    tables = ("candidates", "failures", "feedback", "rounds", "heldout")
    before = {t: _sql(m3, f"SELECT * FROM main.refine__{t} ORDER BY ALL") for t in tables}
    second = _run(m3)
    assert first["calls_made"] > 0 and second["calls_made"] == 0
    assert {t: _sql(m3, f"SELECT * FROM main.refine__{t} ORDER BY ALL") for t in tables} == before


def test_teacher_written_initial_examples(m3: Path) -> None:
    _run(m3, "--set", "params.init=teacher", "--set", "params.rounds=1")
    assert _sql(m3, "SELECT init FROM main.refine") == [("teacher",)]
    assert _sql(m3, "SELECT examples FROM main.refine__candidates WHERE round = 0") == [
        ("Text: TEACHER good one\nLabel: positive\n\nText: TEACHER bad one\nLabel: negative",)]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retort_test_lbt_m3", ROOT / "evaluators" / "lbt_m3.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_helpers_are_seeded_and_balanced() -> None:
    mod = _module()
    train = [{"text": f"t{i}", "label": "positive" if i % 3 else "negative"} for i in range(30)]
    a = mod.sample_examples(train, ["positive", "negative"], 5, random.Random(7))
    b = mod.sample_examples(train, ["positive", "negative"], 5, random.Random(7))
    assert a == b and [ex["label"] for ex in a] == ["positive", "negative"] * 2 + ["positive"]
    pool = [{"item": str(i)} for i in range(20)]
    assert mod._minibatch(pool, 6, 0, 1) == mod._minibatch(pool, 6, 0, 1)
    assert mod._minibatch(pool, 6, 0, 1) != mod._minibatch(pool, 6, 0, 2)
    assert len(mod._minibatch(pool, 50, 0, 1)) == 20
    parse = mod.parse_examples
    assert parse("Text: a\nLabel: POSITIVE\nText: b\nLabel: maybe\nText: c\nLabel: <negative>",
                 ["positive", "negative"]) == [{"text": "a", "label": "positive"}, {"text": "c", "label": "negative"}]


@pytest.mark.skipif(not (SHARED / "sst2_test.jsonl").exists(), reason="../shared/datasets is absent")
def test_real_dataset_loads_with_a_split_mapping(workspace: Path) -> None:
    (workspace / "evaluators" / "m3fake.py").write_text(SCRIPT)
    split = "split=CASE hash(id) % 5 WHEN 0 THEN 'train' WHEN 1 THEN 'pool' ELSE 'heldout' END"
    proc = run_cli("validate", "lbt_m3", "--input", str(SHARED / "sst2_test.jsonl"), "--map", split,
                   "--model", "*=scripted:m3fake:alice", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = run_cli("run", "lbt_m3", "--input", str(SHARED / "sst2_test.jsonl"), "--map", split, "--limit", "40",
                   "--model", "*=scripted:m3fake:alice", "--set", "params.rounds=1", "--json", "-q", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (n,) = _sql(workspace, "SELECT heldout_n FROM main.refine")[0]
    assert 0 < n < 40


@pytest.mark.local_model
def test_end_to_end_on_the_embedded_model(workspace: Path) -> None:
    begun = time.monotonic()
    proc = run_cli("run", "lbt_m3", "--limit", "6", "--set", "params.rounds=1", "--set", "params.beam=1",
                   "--set", "params.minibatch=2", "--set", "params.candidates=1", "--set", "params.n_examples=2",
                   "--json", "-q", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads(proc.stdout)["status"] == "ok"
    assert _sql(workspace, "SELECT rounds, heldout_n FROM main.refine") == [(1, 2)]
    ((rewrites,),) = _sql(workspace, "SELECT rewrites FROM main.refine__rounds")
    # the initial set, the same set as round 1's parent, and the rewrite (none if the students made no mistake)
    assert _sql(workspace, "SELECT count(*) FROM main.refine__candidates") == [(2 + rewrites,)]
    assert _sql(workspace, "SELECT count(*) FROM main.refine__heldout") == [(4,)]      # 2 sets x 2 rows
    assert _sql(workspace, "SELECT count(*) FROM main.refine__rounds") == [(1,)]
    print(f"lbt_m3 on the embedded model: {time.monotonic() - begun:.1f}s")


def test_f1_of_the_minority_class_by_hand() -> None:
    mod = _module()
    labels = ["positive", "negative"]
    held = [{"label": "positive"}] * 2 + [{"label": "negative"}] * 3
    assert mod._f1_label("minority", labels, held) == "positive"
    # a tie in support goes to the smaller label, as the reference's min over (support, label)
    assert mod._f1_label("minority", labels, held[:2] + held[2:4]) == "negative"
    assert mod._f1_label("Negative", labels, held) == "negative"
    with pytest.raises(Exception, match="f1_label"):
        mod._f1_label("neutral", labels, held)
    records = [{"label": "positive", "prediction": "positive"}, {"label": "positive", "prediction": None},
               {"label": "negative", "prediction": "positive"}, {"label": "negative", "prediction": "negative"}]
    # positive: TP 1, FP 1, FN 1 -> P = R = 1/2 -> F1 1/2; negative: TP 1, FP 0, FN 1 -> P 1, R 1/2 -> F1 2/3
    assert mod.f1_score(records, "positive") == 0.5
    assert mod.f1_score(records, "negative") == pytest.approx(2 / 3)
    assert mod.f1_score(records[2:], "positive") == 0.0 and mod.f1_score([], "positive") is None
