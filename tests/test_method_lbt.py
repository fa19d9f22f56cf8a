"""Learning by teaching: the selection and pair functions of evaluators/lbt.py on hand-made scores,
the lbt_m1 / lbt_m2 pipelines end to end on constructed replies (every table computed by hand),
GSM8K through --input/--map, and one run on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import pytest
import yaml
from conftest import ROOT, SHARED, run_cli

LBT_FILE = ROOT / "evaluators" / "lbt.py"
GSM8K = SHARED / "gsm8k_test.jsonl"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retort_test_lbt", LBT_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lbt = _load()


def _rationales(problem: str, items: list[tuple[Any, float | None]], gold: str = "10") -> list[dict[str, Any]]:
    return [{"_id": f"{problem}.{i}", "problem_id": problem, "group": "g", "question": f"Q{problem}", "gold": gold,
             "teacher_answer": answer, "lbt_score": score, "rationale": f"text {problem}.{i}"}
            for i, (answer, score) in enumerate(items)]


# --- the reference's selection, re-derived --------------------------------------------------
#
# scripts/math/search_rationale.py (imagination-research/lbt) keeps, per problem, a dict from the
# extracted answer string (as is) to [count, max, sum, avg] of LbT scores, filled in rationale order,
# and picks `sorted(items, key=(value of the rule, count))[-1]`: the largest (value, count), and
# among full ties the answer that appeared last (Python's sort is stable). `reference_pick` is that
# rule, written here from reading the script, not from retort's code.

REF_DIM = {"maj": 0, "max": 1, "sum": 2, "avg": 3}


def reference_pick(rationales: list[tuple[str, float]], rule: str) -> str:
    table: dict[str, list[float]] = {}
    for answer, score in rationales:
        if answer in table:
            entry = table[answer]
            entry[0] += 1
            entry[1] = max(score, entry[1])
            entry[2] += score
            entry[3] = entry[2] / entry[0]
        else:
            table[answer] = [1, score, score, score]
    dim = REF_DIM[rule]
    return sorted(table.items(), key=lambda item: (item[1][dim], item[1][0]))[-1][0]


# Tables with ties, spelled-differently answers and a rationale without the marker (whose answer, in
# the reference, is its last line). Scores are exam sums as in the reference (0..9, 3 questions x 3).
REF_TABLES = {
    "full tie: the answer seen last wins": [("4", 2), ("5", 2), ("4", 0), ("5", 0)],
    "SUM ties, count decides": [("31", 4), ("30", 2), ("30", 2), ("29", 0)],
    "18 and 18.00 are two answers": [("18", 0), ("18.00", 3), ("18", 0), ("18.00", 0), ("3", 2)],
    "MAJ ties three ways: the last": [("7", 9), ("8", 0), ("9", 1)],
    "no marker: its last line votes": [("7", 1), ("Iamnotsurehowtofinish.", 5), ("8", 1), ("7", 0)],
    "every score 0": [("1", 0), ("2", 0), ("1", 0), ("3", 0)],
    "AVG ties 2/2 and 3/3: count decides": [("a", 2), ("b", 1), ("a", 0), ("b", 1), ("b", 1)],
}
REF_EXPECTED = {  # (MAJ, MAX, SUM, AVG), worked out by hand from the rule above
    "full tie: the answer seen last wins": ("5", "5", "5", "5"),
    "SUM ties, count decides": ("30", "31", "30", "31"),
    "18 and 18.00 are two answers": ("18.00", "18.00", "18.00", "3"),
    "MAJ ties three ways: the last": ("9", "7", "7", "7"),
    "no marker: its last line votes": ("7", "Iamnotsurehowtofinish.", "Iamnotsurehowtofinish.",
                                       "Iamnotsurehowtofinish."),
    "every score 0": ("1", "1", "1", "1"),
    "AVG ties 2/2 and 3/3: count decides": ("b", "a", "b", "b"),
}


@pytest.mark.parametrize("name", list(REF_TABLES))
def test_selection_is_the_references(name: str) -> None:
    table = REF_TABLES[name]
    expected = dict(zip(lbt.RULES, REF_EXPECTED[name], strict=True))
    assert {rule: reference_pick([(a, float(s)) for a, s in table], rule) for rule in lbt.RULES} == expected
    # retort's LbT score is the mean exam score (sum / 9): the same order as the reference's sums
    rows = _rationales("0", [(a, s / 9) for a, s in table], gold="1")
    picked = lbt.select_answers(rows)[0]
    assert {rule: picked[f"{rule}_answer"] for rule in lbt.RULES} == expected
    votes = lbt.tally((a, s / 9) for a, s in table)
    assert {rule: lbt.choose(votes, rule).answer for rule in lbt.RULES} == expected


def test_choose_reads_votes_in_sample_order_not_row_order() -> None:
    rows = _rationales("0", [("4", 0.5), ("5", 0.5)])
    rows.reverse()  # the rows arrive out of order; the sample order (the _id) decides who appeared last
    assert lbt.select_answers(rows)[0]["maj_answer"] == "5"
    # sample ids sort naturally: 0.10 comes after 0.9
    many = _rationales("0", [(str(i), 0.0) for i in range(11)])
    assert lbt.select_answers(many)[0]["maj_answer"] == "10"


def test_tally_lbt_groups_by_spelling_lenient_by_value() -> None:
    items = [("12", 0.5), ("12.00", None), (None, 1.0), ("$12", 0.25), ("7", 1.0)]
    assert [(v.answer, v.count, v.score_max, v.score_sum, v.score_mean) for v in lbt.tally(items)] == [
        ("12", 1, 0.5, 0.5, 0.5), ("12.00", 1, 0.0, 0.0, 0.0), ("$12", 1, 0.25, 0.25, 0.25), ("7", 1, 1.0, 1.0, 1.0)]
    lenient = lbt.tally([*items, ("", 1.0)], answers="lenient")
    assert [(v.answer, v.key, v.count, v.score_sum) for v in lenient] == [("12", "12", 3, 0.75), ("7", "7", 1, 1.0)]
    with pytest.raises(ValueError, match="answers"):
        lbt.tally(items, answers="strict")


def test_choose_with_no_votes_and_an_unknown_rule() -> None:
    assert lbt.choose([], "maj") is None
    with pytest.raises(ValueError, match="unknown selection rule"):
        lbt.choose(lbt.tally([("1", 0.0)]), "median")


def test_unanswered_skip_leaves_rationales_without_the_marker_out() -> None:
    rows = _rationales("0", [("7", 1 / 9), ("Rationalep4-1:skill5.", 5 / 9), ("8", 1 / 9), ("7", 0.0)], gold="7")
    for row in rows:
        row["rationale"] = f"Work.\n\n[[Final Answer]]:\n${row['teacher_answer']}$\n"
    rows[1]["rationale"] = "Rationale p4-1: skill 5."  # no marker: the reference's last line is its answer
    vote = lbt.select_answers(rows)[0]
    assert (vote["n_answered"], vote["max_answer"], vote["max_correct"]) == (4, "Rationalep4-1:skill5.", 0)
    skip = lbt.select_answers(rows, unanswered="skip")[0]
    # without it: MAX "7" (1/9, count 2) beats "8" (1/9, count 1); AVG "8" (1/9) beats "7" (1/18)
    assert (skip["n_answered"], skip["maj_answer"], skip["max_answer"], skip["sum_answer"], skip["avg_answer"]) == (
        3, "7", "7", "7", "8")
    assert [v["answer"] for v in lbt.answer_votes(rows, unanswered="skip")] == ["7", "8"]
    with pytest.raises(ValueError, match="unanswered"):
        lbt.select_answers(rows, unanswered="drop")


# --- select_answers and selection_accuracy --------------------------------------------------

def test_select_answers_per_problem_and_accuracy() -> None:
    rows = [
        # LbT rescues a wrong majority: MAJ 12, the others 10; "12.00" is its own answer
        *_rationales("0", [("12", 0.0), ("12", 0.25), ("10", 0.75), ("12.00", 0.0)], gold="10"),
        # no exam: every score None, MAX/SUM/AVG fall back to MAJ
        *_rationales("1", [("3", None), ("4", None), ("3", None)], gold="3"),
        # the call failed (no answer at all): nothing selected, counted wrong
        *_rationales("2", [(None, None)], gold="5"),
        # no gold: not scored
        *_rationales("3", [("1", 1.0)], gold=None),  # type: ignore[arg-type]
        # the reference's equality: "18.00" is not "18", "5,6" is
        *_rationales("4", [("18.00", 0.0)], gold="18"),
        *_rationales("5", [("56", 0.0)], gold="5,6"),
    ]
    rows.reverse()  # row order must not matter
    selection = lbt.select_answers(rows)
    got = [(s["problem_id"], s["n_rationales"], s["n_answered"], s["n_answers"],
            s["maj_answer"], s["max_answer"], s["sum_answer"], s["avg_answer"],
            s["maj_correct"], s["max_correct"], s["sum_correct"], s["avg_correct"], s["oracle_correct"])
           for s in selection]
    assert got == [
        ("0", 4, 4, 3, "12", "10", "10", "10", 0, 1, 1, 1, 1),
        ("1", 3, 3, 2, "3", "3", "3", "3", 1, 1, 1, 1, 1),
        ("2", 1, 0, 0, None, None, None, None, 0, 0, 0, 0, 0),
        ("3", 1, 1, 1, "1", "1", "1", "1", None, None, None, None, None),
        ("4", 1, 1, 1, "18.00", "18.00", "18.00", "18.00", 0, 0, 0, 0, 0),
        ("5", 1, 1, 1, "56", "56", "56", "56", 1, 1, 1, 1, 1),
    ]
    assert lbt.selection_accuracy(selection) == {"maj_accuracy": 2 / 5, "max_accuracy": 3 / 5,
                                                 "sum_accuracy": 3 / 5, "avg_accuracy": 3 / 5,
                                                 "oracle_accuracy": 3 / 5, "n": 5}
    lenient = {s["problem_id"]: s["maj_correct"] for s in lbt.select_answers(rows, answers="lenient")}
    assert (lenient["4"], lenient["5"]) == (1, 0)  # retort's own normaliser decides these the other way
    assert lbt.selection_accuracy([]) == {"maj_accuracy": 0.0, "max_accuracy": 0.0, "sum_accuracy": 0.0,
                                          "avg_accuracy": 0.0, "oracle_accuracy": 0.0, "n": 0}


def test_answer_votes_rows() -> None:
    rows = _rationales("0", [("12", 0.0), ("10", 0.75), ("12.00", 0.25), ("12", 0.25)], gold="10")
    got = [(v["answer"], v["answer_key"], v["count"], v["score_max"], v["score_sum"], v["score_mean"], v["correct"])
           for v in lbt.answer_votes(rows)]
    assert got == [("12", "12", 2, 0.25, 0.25, 0.125, 0), ("10", "10", 1, 0.75, 0.75, 0.75, 1),
                   ("12.00", "12.00", 1, 0.25, 0.25, 0.25, 0)]
    lenient = [(v["answer"], v["answer_key"], v["count"]) for v in lbt.answer_votes(rows, answers="lenient")]
    assert lenient == [("12", "12", 3), ("10", "10", 1)]


def test_select_answers_names_a_missing_column() -> None:
    from retort.errors import DatasetError

    with pytest.raises(DatasetError, match="lbt_score"):
        lbt.select_answers([{"_id": "0.0", "problem_id": "0", "teacher_answer": "1"}])


# --- grade_exams ------------------------------------------------------------------------------

def test_grade_exams_by_the_reference_rules_and_keeps_its_columns_when_empty() -> None:
    rows = [{"_id": "a", "rationale_id": "0.0", "student_answer": "1000", "exam_answer": "1,000"},
            {"_id": "b", "rationale_id": "0.0", "student_answer": None, "exam_answer": "3"},
            {"_id": "c", "rationale_id": "0.0", "student_answer": "0.5", "exam_answer": "\\frac{1}{2}"},
            {"_id": "d", "rationale_id": "0.0", "student_answer": "4", "exam_answer": None},
            {"_id": "e", "rationale_id": "0.0", "student_answer": "18.00", "exam_answer": "18"},
            {"_id": "f", "rationale_id": "0.0", "student_answer": "50%", "exam_answer": "50"}]
    assert [r["correct"] for r in lbt.grade_exams(rows)] == [1, 0, 1, None, 0, 0]
    assert [r["correct"] for r in lbt.grade_exams(rows, answers="lenient")] == [1, 0, 1, None, 1, 1]
    empty = lbt.grade_exams([])
    assert empty.num_rows == 0 and empty.column_names == ["_id", "rationale_id", "correct"]


# --- preference_pairs -------------------------------------------------------------------------

def _pairs(rows: list[dict[str, Any]], **kwargs: Any) -> list[tuple[str, str, float]]:
    out = lbt.preference_pairs(rows, **kwargs)
    if not isinstance(out, list):
        return []
    return [(p["chosen_id"], p["rejected_id"], p["margin"]) for p in out]


def test_pairs_margin_order_and_cap() -> None:
    rows = _rationales("0", [("1", 1.0), ("2", 0.5), ("3", 0.5), ("4", 0.0), ("5", None)])
    everything = [("0.0", "0.3", 1.0), ("0.0", "0.1", 0.5), ("0.0", "0.2", 0.5), ("0.1", "0.3", 0.5),
                  ("0.2", "0.3", 0.5)]
    assert _pairs(rows, min_margin=0.5, max_pairs=None) == everything
    assert _pairs(rows, min_margin=0.5, max_pairs=0) == everything
    assert _pairs(rows, min_margin=0.5, max_pairs=2) == everything[:2]
    assert _pairs(rows, min_margin=0.75, max_pairs=10) == [("0.0", "0.3", 1.0)]
    assert _pairs(rows, min_margin=1.5) == []
    # a margin of 0 is never a preference, even with min_margin 0
    assert ("0.1", "0.2", 0.0) not in _pairs(rows, min_margin=0, max_pairs=None)
    assert len(_pairs(rows, min_margin=0, max_pairs=None)) == 5


def test_pairs_float_margins_compare_exactly_and_problems_are_separate() -> None:
    rows = [*_rationales("1", [("1", 2 / 3), ("2", 1 / 3)]), *_rationales("0", [("1", 0.3), ("2", 0.1)])]
    assert _pairs(rows, min_margin=1 / 3) == [("1.0", "1.1", 0.333333333)]
    assert _pairs(rows, min_margin=0.2) == [("0.0", "0.1", 0.2), ("1.0", "1.1", 0.333333333)]


def test_pairs_skip_identical_texts_and_build_the_prompt() -> None:
    rows = _rationales("0", [("1", 1.0), ("1", 0.0), ("2", 0.0)])
    rows[1]["rationale"] = rows[0]["rationale"]
    out = lbt.preference_pairs(rows, min_margin=0.5)
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("0.0", "0.2")]
    pair = out[0]
    assert pair["prompt"] == f"{lbt.DEFAULT_INSTRUCTION}\n\n[[Question]]:\nQ0"
    assert (pair["chosen"], pair["rejected"], pair["chosen_score"], pair["rejected_score"]) == (
        "text 0.0", "text 0.2", 1.0, 0.0)
    assert (pair["chosen_answer"], pair["rejected_answer"]) == ("1", "2")
    assert lbt.preference_pairs(rows, min_margin=0.5, instruction="")[0]["prompt"] == "Q0"


def test_pairs_empty_result_keeps_the_dpo_columns() -> None:
    table = lbt.preference_pairs(_rationales("0", [("1", 0.5), ("2", 0.5)]))
    assert table.num_rows == 0
    assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin"} <= set(table.column_names)
    with pytest.raises(ValueError, match="min_margin"):
        lbt.preference_pairs([], min_margin=-1)


# --- the pipelines ----------------------------------------------------------------------------

def test_m2_runs_the_m1_stages_unchanged() -> None:
    m1 = yaml.safe_load((ROOT / "pipelines" / "lbt_m1.yaml").read_text())
    m2 = yaml.safe_load((ROOT / "pipelines" / "lbt_m2.yaml").read_text())
    assert m2["stages"][: len(m1["stages"])] == m1["stages"]
    assert [s["name"] for s in m2["stages"][len(m1["stages"]):]] == ["pairs"]
    assert (m1["input"], m1["models"]) == (m2["input"], m2["models"])


def test_sample_data_has_groups_of_similar_problems() -> None:
    rows = [json.loads(line) for line in (ROOT / "data" / "math_sample.jsonl").read_text().splitlines()]
    assert all({"id", "group", "question", "answer"} <= set(r) for r in rows)
    groups = [r["group"] for r in rows]
    assert groups[0] == groups[1]  # --limit 2 still has an exam
    assert sum(groups.count(g) >= 3 for g in set(groups)) >= 4


# The constructed run: six problems in groups g1 (p0-p2), g2 (p3, p4) and g3 (p5, alone: no exam).
# Each teacher rationale says "skill N"; a student answers an exam problem right on repetition i when
# student_index * 3 + i < N, so with two students and 3 repetitions every rationale's LbT score is N / 6.
# Replies follow the reference's layout: "[[Final Answer]]:" then "$answer$" on the next line.
TINY = [("p0", "g1", "10"), ("p1", "g1", "20"), ("p2", "g1", "30"), ("p3", "g2", "5"), ("p4", "g2", "7"),
        ("p5", "g3", "1")]
TEACHER = {  # (answer, skill) per rationale; None = a rationale with no final-answer marker
    "p0": [("12", 0), ("12", 1), ("10", 3), ("12.00", 0)],
    "p1": [("20", 2), ("20", 2), ("25", 3), ("30", 0)],
    "p2": [("31", 4), ("30", 2), ("30", 2), ("29", 0)],
    "p3": [("4", 2), ("5", 2), ("4", 0), ("5", 0)],
    "p4": [("7", 1), (None, 5), ("8", 1), ("7", 0)],
    "p5": [("1", 0), ("2", 0), ("1", 0), ("3", 0)],
}
UNMARKED = "Rationale p4-1: skill 5. I am not sure how to finish."
SCRIPT = textwrap.dedent('''
    import re

    GOLD = {GOLD!r}
    TEACHER = {TEACHER!r}
    UNMARKED = {UNMARKED!r}


    def _user(request):
        return next(m["content"] for m in request.messages if m["role"] == "user")


    def _asked(request):
        """The problem tag of the last [[Question]] (the four fixed worked examples have none)."""
        return re.findall(r"\\[\\[Question\\]\\]:\\n[^\\n]*\\[(p\\d)\\]", _user(request))[-1]


    def teacher(request):
        tag = _asked(request)
        assert request.n == 4, request.n
        assert request.messages[-1] == {{"role": "assistant",
                                         "content": "[[Solution]]:\\nLet's think step by step."}}
        return [f"Rationale {{tag}}-{{k}}: skill {{skill}}. Work it out.\\n\\n[[Final Answer]]:\\n${{answer}}$\\n"
                if answer is not None else UNMARKED
                for k, (answer, skill) in enumerate(TEACHER[tag])]


    def _student(request, index):
        text = _user(request)
        assert text.count("[[Question]]:") == 6, text  # 4 worked examples, the rationale, the exam problem
        skill = int(re.search(r"skill (\\d)", text).group(1))
        exam = _asked(request)
        assert request.n == 3, request.n
        return [f"So the answer follows.\\n\\n[[Final Answer]]:\\n${{GOLD[exam] if index * 3 + i < skill else -1}}$\\n"
                for i in range(request.n)]


    def alice(request):
        return _student(request, 0)


    def bob(request):
        return _student(request, 1)
''')

PAIRS = [  # min_margin 0.5, max_pairs 2; margins are skill differences / 6
    ("0.2", "0.0", 0.5), ("0.2", "0.3", 0.5),
    ("1.2", "1.3", 0.5),
    ("2.0", "2.3", 0.666666667),
    ("4.1", "4.3", 0.833333333), ("4.1", "4.0", 0.666666667),
]


def _tiny_workspace(workspace: Path) -> None:
    with (workspace / "data" / "tiny.jsonl").open("w") as f:
        for pid, group, gold in TINY:
            f.write(json.dumps({"id": pid, "group": group, "answer": gold,
                                "question": f"How many apples does problem [{pid}] have?"}) + "\n")
    gold = {pid: answer for pid, _, answer in TINY}
    (workspace / "evaluators" / "lbt_script.py").write_text(SCRIPT.format(GOLD=gold, TEACHER=TEACHER,
                                                                          UNMARKED=UNMARKED))


def _run_tiny(workspace: Path, pipeline: str, *extra: str) -> Any:
    _tiny_workspace(workspace)
    return run_cli("run", pipeline, "--input", "data/tiny.jsonl", "-q",
                   "--set", "stages.students.sql=SELECT unnest(['alice', 'bob']) AS student",
                   "--model", "teacher=scripted:lbt_script:teacher",
                   "--model", "alice=scripted:lbt_script:alice", "--model", "bob=scripted:lbt_script:bob",
                   "--model", "default=scripted:lbt_script:alice",  # embeds problems when exam=knn
                   *extra, cwd=workspace)


def _db(workspace: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(workspace / ".retort" / "retort.duckdb"), read_only=True)


def test_m1_every_table_on_constructed_replies(workspace: Path) -> None:
    proc = _run_tiny(workspace, "lbt_m1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    con = _db(workspace)
    try:
        def q(sql: str) -> list[tuple[Any, ...]]:
            return con.sql(sql).fetchall()

        # the reference's reading always finds an answer: the unmarked rationale's is its last line
        assert q("SELECT count(*), count(_error) FROM main.teach") == [(24, 0)]
        assert q("SELECT teacher_answer FROM main.teach WHERE _id = '4.1'") == [
            ("Rationalep4-1:skill5.Iamnotsurehowtofinish.",)]
        # exam: each rationale x the other problems of its group x 2 students
        # g1: 3 problems x 4 rationales x 2 exam problems x 2 = 48; g2: 2 x 4 x 1 x 2 = 16; g3: none
        assert q("SELECT count(*) FROM main.exam") == [(64,)]
        assert q("SELECT _id, problem_id, exam_id, student, exam_answer FROM main.exam WHERE rationale_id = '3.1'") \
            == [("3.1>4@alice", "3", "4", "alice", "7"), ("3.1>4@bob", "3", "4", "bob", "7")]
        assert q("SELECT count(*) FROM main.student") == [(192,)]  # 3 repetitions, as the reference's exam
        # right answers: skill x exam problems, summed: g1 (4 + 7 + 8) x 2 + g2 (4 + 7) x 1
        assert q("SELECT count(*), sum(correct) FROM main.graded") == [(192, 49)]
        scores = q("SELECT _id, n_exam, lbt_sum, lbt_score FROM main.lbt_scores")
        expected = []
        for p, (pid, group, _) in enumerate(TINY):
            exam = {"g1": 2, "g2": 1, "g3": 0}[group]
            for k, (_answer, skill) in enumerate(TEACHER[pid]):
                expected.append((f"{p}.{k}", 6 * exam, skill * exam, pytest.approx(skill / 6) if exam else None))
        assert scores == expected
        assert q("SELECT answer, count, round(score_max, 6), round(score_sum, 6), round(score_mean, 6), correct "
                 "FROM main.votes WHERE problem_id = '0'") == [
            ("12", 2, 0.166667, 0.166667, 0.083333, 0), ("10", 1, 0.5, 0.5, 0.5, 1), ("12.00", 1, 0.0, 0.0, 0.0, 0)]
        selection = q("SELECT problem_id, maj_answer, max_answer, sum_answer, avg_answer, "
                      "maj_correct, max_correct, sum_correct, avg_correct, oracle_correct FROM main.selection")
        unmarked = "Rationalep4-1:skill5.Iamnotsurehowtofinish."
        assert selection == [
            ("0", "12", "10", "10", "10", 0, 1, 1, 1, 1),  # LbT outvotes a wrong majority ("12.00" is apart)
            ("1", "20", "25", "20", "25", 1, 0, 1, 0, 1),  # SUM keeps the frequent right answer
            ("2", "30", "31", "30", "31", 1, 0, 1, 0, 1),  # SUM ties 4/6 / 4/6: count decides
            ("3", "5", "5", "5", "5", 1, 1, 1, 1, 1),  # a full tie: the answer seen last wins
            ("4", "7", unmarked, unmarked, unmarked, 1, 0, 0, 0, 1),  # the unmarked rationale votes, as the reference
            ("5", "1", "1", "1", "1", 1, 1, 1, 1, 1),  # no exam: every rule is MAJ
        ]
        accuracy = {"maj_accuracy": 5 / 6, "max_accuracy": 3 / 6, "sum_accuracy": 5 / 6, "avg_accuracy": 3 / 6,
                    "oracle_accuracy": 1.0, "n": 6}
        cur = con.execute("SELECT * FROM main.lbt_accuracy")
        assert dict(zip([d[0] for d in cur.description], cur.fetchall()[0], strict=True)) == accuracy
        stored = dict(q("SELECT name, value FROM main.metrics WHERE stage = 'lbt_accuracy'"))
        assert stored == pytest.approx(accuracy)
    finally:
        con.close()


def test_m1_unanswered_skip_keeps_the_unmarked_rationale_out_of_the_vote(workspace: Path) -> None:
    proc = _run_tiny(workspace, "lbt_m1", "--set", "params.unanswered=skip")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    con = _db(workspace)
    try:
        row = con.sql("SELECT n_answered, maj_answer, max_answer, sum_answer, avg_answer FROM main.selection "
                      "WHERE problem_id = '4'").fetchall()
        examined = con.sql("SELECT n_exam FROM main.lbt_scores WHERE _id = '4.1'").fetchall()
    finally:
        con.close()
    # "7": 1/6 + 0 (count 2), "8": 1/6: MAX and SUM tie in value, count decides; AVG 1/6 > 1/12
    assert row == [(3, "7", "7", "7", "8")]
    assert examined == [(6,)]  # it is still examined: only its vote is dropped


def test_m2_pairs_on_constructed_replies_and_export(workspace: Path) -> None:
    proc = _run_tiny(workspace, "lbt_m2", "--set", "stages.pairs.with.min_margin=0.5",
                     "--set", "stages.pairs.with.max_pairs=2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    con = _db(workspace)
    try:
        pairs = con.sql("SELECT chosen_id, rejected_id, margin, chosen_score, rejected_score, prompt, chosen, "
                        "rejected FROM main.pairs").fetchall()
        texts = dict(con.sql("SELECT _id, rationale FROM main.lbt_scores").fetchall())
        scores = dict(con.sql("SELECT _id, lbt_score FROM main.lbt_scores").fetchall())
    finally:
        con.close()
    assert [p[:3] for p in pairs] == [(c, r, pytest.approx(m)) for c, r, m in PAIRS]
    for chosen_id, rejected_id, _, chosen_score, rejected_score, prompt, chosen, rejected in pairs:
        assert (chosen, rejected) == (texts[chosen_id], texts[rejected_id])
        assert (chosen_score, rejected_score) == (scores[chosen_id], scores[rejected_id])
        problem = TINY[int(chosen_id.split(".")[0])][0]
        assert prompt.endswith(f"[[Question]]:\nHow many apples does problem [{problem}] have?")
    assert texts["0.2"] == "Rationale p0-2: skill 3. Work it out.\n\n[[Final Answer]]:\n$10$\n"  # trim() keeps newlines

    # exports strip surrounding whitespace (issue 12: 117 of 128 DPO texts ended in "\n")
    first = {"prompt": pairs[0][5].strip(), "chosen": texts["0.2"].strip(), "rejected": texts["0.0"].strip()}
    out = workspace / "pairs.jsonl"
    proc = run_cli("export", "pairs", "--format", "dpo", "--out", str(out), cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(PAIRS) and records[0] == first
    proc = run_cli("export", "pairs", "--format", "dpo-chat", "--out", str(out), cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text().splitlines()[0])
    assert record == {"prompt": [{"role": "user", "content": first["prompt"]}],
                      "chosen": [{"role": "assistant", "content": first["chosen"]}],
                      "rejected": [{"role": "assistant", "content": first["rejected"]}]}


def test_m1_rerun_is_answered_by_the_cache(workspace: Path) -> None:
    assert _run_tiny(workspace, "lbt_m1").returncode == 0
    proc = _run_tiny(workspace, "lbt_m2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["calls_made"], result["cache_hits"]) == (0, 24 + 192)


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/datasets is not present")
def test_gsm8k_loads_through_input_and_map(workspace: Path) -> None:
    (workspace / "evaluators" / "constant.py").write_text(
        "def reply(request):\n    return ['Add them up.\\n\\n[[Final Answer]]:\\n$18$\\n'] * request.n\n")
    mapping = ["--input", str(GSM8K), "--map", "answer=label", "--model", "*=scripted:constant:reply",
               "--map", "group=CAST(CAST(split_part(id, '-', 3) AS INTEGER) // 4 AS VARCHAR)"]
    proc = run_cli("validate", "lbt_m2", *mapping, cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = run_cli("run", "lbt_m1", *mapping, "--limit", "8", "-q", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    con = _db(workspace)
    try:
        groups = con.sql("SELECT \"group\", count(*) FROM main.input GROUP BY 1 ORDER BY 1").fetchall()
        exam = con.sql("SELECT count(*) FROM main.exam").fetchall()
        selection = con.sql("SELECT problem_id, gold, maj_answer, maj_correct FROM main.selection").fetchall()
    finally:
        con.close()
    assert groups == [("0", 4), ("1", 4)]
    assert exam == [(8 * 4 * 3,)]  # 8 problems x K=4 x 3 others in a block of 4 x one student
    assert selection[0] == ("0", "18", "18", 1)  # GSM8K's first problem is the $18 duck eggs
    assert [row[3] for row in selection].count(1) == sum(1 for row in selection if row[1] == "18")


@pytest.mark.local_model
def test_m2_on_the_embedded_model(workspace: Path) -> None:
    proc = run_cli("run", "lbt_m2", "--limit", "2", "--set", "stages.teach.samples=2",
                   "--set", "stages.student.samples=1", "--set", "stages.teach.params.max_tokens=96",
                   "--set", "stages.student.params.max_tokens=96", "-q", "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    con = _db(workspace)
    try:
        def count(table: str) -> int:
            return int(con.sql(f"SELECT count(*) FROM main.{table}").fetchall()[0][0])

        answered = int(con.sql("SELECT count(*) FROM main.teach WHERE _error IS NULL").fetchall()[0][0])
        assert count("teach") == 4
        assert count("exam") == answered  # rows 0 and 1 share a group: one exam problem each, one student
        assert count("student") == count("graded") == answered
        assert count("lbt_scores") == 4
        assert count("selection") == 2
        assert con.sql("SELECT n FROM main.lbt_accuracy").fetchall() == [(2,)]
        assert count("pairs") <= 2 * 4
        columns = [r[0] for r in con.sql("DESCRIBE main.pairs").fetchall()]
        assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin"} <= set(columns)
    finally:
        con.close()


def test_m1_knn_exams_are_the_nearest_problems_by_embedding(workspace: Path) -> None:
    proc = _run_tiny(workspace, "lbt_m1", "--set", "params.exam=knn", "--set", "params.k=2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    con = _db(workspace)
    per_rationale = con.execute("SELECT rationale_id, count(DISTINCT exam_id), bool_and(exam_id <> problem_id) "
                                "FROM main.exam GROUP BY 1").fetchall()
    assert per_rationale and all(n == 2 and distinct for _, n, distinct in per_rationale)
    # the exam is exactly the 2 problems whose vectors are closest (ties by id), computed here in Python
    vectors = dict(con.execute("SELECT _id, embedding FROM main.problem_vec").fetchall())

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        norm = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
        return dot / norm if norm else 0.0

    expected = {a: sorted(sorted((b for b in vectors if b != a),
                                 key=lambda b: (-round(cosine(vectors[a], vectors[b]), 6), b))[:2])
                for a in vectors}
    got = dict(con.execute("SELECT problem_id, list_sort(list(DISTINCT exam_id)) FROM main.exam GROUP BY 1").fetchall())
    assert got == {k: v for k, v in expected.items() if k in got}


# --- what the teacher and the student see (the reference's prompts and sampling) ------------------
#
# Typed from imagination-research/lbt, examples/config/math/llama-3-8b_exam.yaml (`exam_prompter_cfg`)
# and lbt/exam_maker.py (`ExamPrompter.make_exam_prompt_chat_template`): system "You are a helpful
# assistant."; user = instruction + demos joined by two blank lines + the exam template; the solution's
# opening is prefilled. retort strips each message's ends, so the expected messages are stripped too.

REF_INSTRUCTION = ("Your task is to answer the last question below. Give step by step reasoning before you answer. "
                   "When you're ready to answer, please wrap your answer and conclude using the format\n'''\n"
                   "[[Final Answer]]:\n$ANSWER$\n'''\n\n\n\n")
REF_DEMO = "[[Question]]:\n{question}\n\n[[Solution]]:\nLet's think step by step.\n\n{rationale}\n\n" \
           "[[Final Answer]]:\n${answer}$\n"
REF_EXAM = "{demo}\n\n\n[[Question]]:\n{question}\n\n"
REF_PREFILL = "[[Solution]]:\nLet's think step by step.\n\n"
REF_STUB_ANSWERS = ["[2,5)", "24", "16", "-\\frac{2}{3}"]  # the four fixed worked examples' answers, in order


def _render(name: str, row: dict[str, Any]) -> list[dict[str, str]]:
    from retort.templates import Template, environment

    env = environment([ROOT / "prompts"])
    return Template.from_file(ROOT / "prompts" / "lbt" / f"{name}.j2", env=env).render(row, {})


def _stubs(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The four fixed worked examples, read back from a rendered prompt by the demo layout."""
    user = messages[1]["content"]
    blocks = user[len(REF_INSTRUCTION):].split("\n\n\n\n[[Question]]:\n")
    out = []
    for block in blocks[:4]:
        block = block.removeprefix("[[Question]]:\n")
        question, rest = block.split("\n\n[[Solution]]:\nLet's think step by step.\n\n", 1)
        rationale, answer = rest.split("\n\n[[Final Answer]]:\n", 1)
        out.append({"question": question, "rationale": rationale, "answer": answer.strip().strip("$")})
    return out


def _expected(stubs: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    demo = "\n\n\n".join(REF_DEMO.format(**item) for item in stubs)
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": (REF_INSTRUCTION + REF_EXAM.format(demo=demo, question=question)).strip()},
            {"role": "assistant", "content": REF_PREFILL.strip()}]


def test_teacher_prompt_is_the_references() -> None:
    got = _render("teacher", {"question": "What is 2+2?"})
    stubs = _stubs(got)
    assert [s["answer"] for s in stubs] == REF_STUB_ANSWERS
    assert stubs[0]["question"] == "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$."
    assert got == _expected(stubs, "What is 2+2?")


@pytest.mark.parametrize("raw", ["We add.\n\n[[Final Answer]]:\n$4$\n", "We add and get 4"])
def test_student_prompt_is_the_references(raw: str) -> None:
    got = _render("student", {"teach_question": "What is 2+2?", "rationale": raw, "teacher_answer": "4",
                              "exam_question": "What is 3+3?"})
    stubs = _stubs(got)
    assert [s["answer"] for s in stubs] == REF_STUB_ANSWERS
    # the teacher's rationale is a fifth worked example: its text up to the marker (prepare_teaching_dataset.py
    # cuts at find("[[Final Answer]]"), which is -1 without one: the last character goes too)
    taught = {"question": "What is 2+2?", "rationale": raw[:raw.find("[[Final Answer]]")].rstrip(), "answer": "4"}
    assert got == _expected([*stubs, taught], "What is 3+3?")


@pytest.mark.parametrize("pipeline", ["lbt_m1", "lbt_m2"])
def test_sampling_exam_and_rules_are_the_references(pipeline: str) -> None:
    spec = yaml.safe_load((ROOT / "pipelines" / f"{pipeline}.yaml").read_text())
    stages = {s["name"]: s for s in spec["stages"]}
    # examples/config/math/llama-3-8b_{trgen,exam}.yaml: top_k 20, top_p 1.0, temperature 0.7; HFModel's
    # max_new_tokens 1024; the func exam asks each of 3 variants 3 times (num_repetitions), one sample each
    for name in ("teach", "student"):
        params = stages[name]["params"]
        assert (params["temperature"], params["top_p"], params["max_tokens"], params["extra_body"]) == (
            0.7, 1.0, 1024, {"top_k": 20})
        assert "stop" not in params
        assert stages[name]["parse"] == {"answer": {"rules": "{{ params.answers }}"}}
    assert stages["student"]["samples"] == 3
    assert (spec["params"]["exam"], spec["params"]["answers"], spec["params"]["unanswered"]) == ("func", "lbt", "vote")
