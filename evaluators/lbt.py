"""Learning by teaching (LbT): answer selection by LbT score (M1) and preference pairs (M2).

A teacher writes K rationales per teaching problem; each rationale teaches
students who then sit an exam of similar problems. A rationale's LbT score is
its students' mean exam score. The pipeline stages call:

    grade_exams(rows, ...)          each student answer scored 0/1 against the exam gold
    answer_votes(rows, ...)         per problem and answer: count, max/sum/mean LbT score
    select_answers(rows, ...)       per problem, the answer chosen by MAJ, MAX, SUM and AVG, and whether it is right
    selection_accuracy(rows)        {maj_accuracy, max_accuracy, sum_accuracy, avg_accuracy, oracle_accuracy, n}
    preference_pairs(rows, ...)     DPO pairs (chosen = higher LbT score) with a minimum margin and a cap

and `tally` / `choose` are the two pure functions underneath the selection.

Every function that compares answers takes `answers`:

    lbt      (default) the reference's rules (imagination-research/lbt,
             lbt/datasets_adapter/math_dataset.py): answers are grouped by their
             extracted spelling as is ("18" and "18.00" are two answers) and
             compared to the gold with the reference's `is_equiv` (`mathnorm.lbt_equal`)
    lenient  retort's own: grouped by `mathnorm.normalize_answer` ("12", "12.00"
             and "$12" are one answer) and compared with `mathnorm.math_equal`

Selection rules, over the rationales of one problem grouped by answer, as
scripts/math/search_rationale.py computes them:

    MAJ  the most frequent answer (self-consistency)
    MAX  the answer of the single best-scored rationale
    SUM  the answer with the largest total LbT score (an LbT-weighted vote)
    AVG  the answer with the largest mean LbT score

Ties, as the reference: answers are sorted by (value, count) and the last one
wins; the sort is stable over the answers in order of first appearance, so among
full ties the answer that appeared LAST wins. Rationales are read in sample
order. Scores compare rounded to 9 decimals, so 1/3 + 1/3 and 2/3 tie as they
do in the reference (which sums integers).

A rationale with no answer (None: its call failed) does not vote. With
`unanswered: vote` (default, the reference) a rationale without the final-answer
marker votes with what the parser read instead (with `rules: lbt`, its last
line); with `unanswered: skip` it does not vote (its text is checked for the
marker: `mathnorm.lbt_marked`, or for lenient answers a marker or boxed answer).
A rationale with no LbT score (its problem had no exam problem) votes with
score 0, so for a problem with no exam MAX, SUM and AVG all fall back to MAJ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from retort.errors import DatasetError
from retort.mathnorm import extract_answer, lbt_equal, lbt_gold, lbt_marked, math_equal, normalize_answer

Row = dict[str, Any]

RULES = ("maj", "max", "sum", "avg")
ANSWERS = ("lbt", "lenient")
UNANSWERED = ("vote", "skip")
DEFAULT_INSTRUCTION = ("Your task is to answer the last question below. Give step by step reasoning before you "
                       "answer. When you're ready to answer, please wrap your answer and conclude using the format\n"
                       "'''\n[[Final Answer]]:\n$ANSWER$\n'''")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Vote:
    """The rationales of one problem that reached the same answer."""

    answer: str  # as the first of these rationales spelled it
    key: str  # the grouping key: the answer itself (lbt) or normalize_answer(answer) (lenient)
    count: int
    score_max: float
    score_sum: float
    score_mean: float

    def value(self, rule: str) -> float:
        return {"maj": float(self.count), "max": self.score_max, "sum": self.score_sum,
                "avg": self.score_mean}[rule]


def _q(x: float) -> float:
    return round(x, 9)


def _check_answers(answers: str) -> None:
    if answers not in ANSWERS:
        raise ValueError(f"answers must be one of {', '.join(ANSWERS)}, got {answers!r}")


def _key_fn(answers: str) -> Callable[[str], str]:
    _check_answers(answers)
    return (lambda s: s) if answers == "lbt" else normalize_answer


def is_correct(answer: Any, gold: Any, answers: str = "lbt") -> bool:
    """Whether an extracted answer equals the gold answer, by the `answers` rules. The lbt rules read the
    gold as the reference does (wrapped as a final answer and extracted like a student's)."""
    _check_answers(answers)
    if answers == "lbt":
        return answer is not None and lbt_equal(str(answer), lbt_gold(gold))
    return math_equal(answer, gold)


def has_marker(text: Any, answers: str = "lbt") -> bool:
    """Whether a rationale states its final answer (for `unanswered: skip`)."""
    if answers == "lbt":
        return lbt_marked(text)
    return extract_answer(text, fallback_last_number=False) is not None


def tally(rationales: Iterable[tuple[Any, float | None]], answers: str = "lbt") -> list[Vote]:
    """Group (answer, LbT score) pairs by answer; a None answer does not vote, a None score is 0.

    Votes come out in order of first appearance (the order the reference's dict keeps)."""
    key_of = _key_fn(answers)
    groups: dict[str, tuple[str, list[float]]] = {}
    for answer, score in rationales:
        if answer is None:
            continue
        text = str(answer) if answers == "lbt" else str(answer).strip()  # lbt: the string as is, as the reference
        if answers == "lenient" and not text:
            continue
        groups.setdefault(key_of(text), (text, []))[1].append(float(score) if score is not None else 0.0)
    return [Vote(text, key, len(scores), max(scores), _q(sum(scores)), _q(sum(scores) / len(scores)))
            for key, (text, scores) in groups.items()]


def choose(votes: Sequence[Vote], rule: str) -> Vote | None:
    """The winning vote under `rule` (maj, max, sum, avg), as the reference picks it: the last of the
    votes sorted (stably) by (value, count). Equivalently: the largest (value, count), and among equals
    the one that appears last in `votes`."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {', '.join(RULES)}")
    best: Vote | None = None
    for vote in votes:
        if best is None or (_q(vote.value(rule)), vote.count) >= (_q(best.value(rule)), best.count):
            best = vote
    return best


# --- pipeline stages ------------------------------------------------------------------------

def _natural(value: Any) -> tuple[tuple[int, Any], ...]:
    """Sort key for ids such as "2.10" so that "2.9" comes before it."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(str(value)) if p)


def _check(rows: Sequence[Row], *columns: str) -> None:
    if rows:
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise DatasetError(f"no column {missing[0]!r} in the rows; available: {', '.join(sorted(rows[0]))}")


def _by_problem(rows: Sequence[Row], problem: str) -> list[tuple[Any, list[Row]]]:
    grouped: dict[Any, list[Row]] = {}
    for row in sorted(rows, key=lambda r: _natural(r.get("_id", ""))):
        grouped.setdefault(row[problem], []).append(row)
    return sorted(grouped.items(), key=lambda item: _natural(item[0]))


def grade_exams(rows: Sequence[Row], prediction: str = "student_answer", reference: str = "exam_answer",
                output: str = "correct", answers: str = "lbt") -> list[Row] | pa.Table:
    """Each student row, copied, with `output` = 1 when its answer equals the exam gold (`is_correct` by the
    `answers` rules), else 0 (None when there is no gold). A student answer of None (a failed call) is 0.
    With no rows, an empty table that still has the columns the
    `lbt_scores` stage joins on, so a run whose problems have no exam does not fail there."""
    if not rows:
        return pa.table({"_id": pa.array([], pa.string()), "rationale_id": pa.array([], pa.string()),
                         output: pa.array([], pa.int64())})
    _check(rows, prediction, reference)
    _check_answers(answers)
    graded = []
    for row in rows:
        gold = row[reference]
        graded.append({**row, output: None if gold is None else int(is_correct(row[prediction], gold, answers))})
    return graded


def _voters(group: list[Row], answer: str, score: str, text: str, answers: str,
            unanswered: str) -> list[tuple[Any, Any]]:
    """(answer, score) of the rationales that vote, in sample order."""
    if unanswered not in UNANSWERED:
        raise ValueError(f"unanswered must be one of {', '.join(UNANSWERED)}, got {unanswered!r}")
    return [(r[answer], r[score]) for r in group
            if unanswered == "vote" or has_marker(r.get(text), answers)]


def answer_votes(rows: Sequence[Row], answer: str = "teacher_answer", score: str = "lbt_score",
                 problem: str = "problem_id", reference: str = "gold", answers: str = "lbt",
                 unanswered: str = "vote", text: str = "rationale") -> list[Row]:
    """One row per teaching problem and answer (in order of first appearance), with its count and LbT scores."""
    _check(rows, answer, score, problem, *([text] if unanswered == "skip" else []))
    out = []
    for pid, group in _by_problem(rows, problem):
        first = group[0]
        for vote in tally(_voters(group, answer, score, text, answers, unanswered), answers):
            gold = first.get(reference)
            out.append({"_id": f"{pid}:{vote.key}", "problem_id": pid, "group": first.get("group"),
                        "answer": vote.answer, "answer_key": vote.key, "count": vote.count,
                        "score_max": vote.score_max, "score_sum": vote.score_sum, "score_mean": vote.score_mean,
                        "correct": None if gold is None else int(is_correct(vote.answer, gold, answers))})
    return out


def select_answers(rows: Sequence[Row], answer: str = "teacher_answer", score: str = "lbt_score",
                   problem: str = "problem_id", reference: str = "gold", answers: str = "lbt",
                   unanswered: str = "vote", text: str = "rationale") -> list[Row]:
    """One row per teaching problem: the answer each rule selects and whether it equals the gold answer.

    `oracle_correct` says whether any voting rationale reached the gold answer (the ceiling of every
    rule; retort's addition, the reference reports the four rules only)."""
    _check(rows, answer, score, problem, *([text] if unanswered == "skip" else []))
    out = []
    for pid, group in _by_problem(rows, problem):
        first = group[0]
        gold = first.get(reference)
        votes = tally(_voters(group, answer, score, text, answers, unanswered), answers)
        row: Row = {"_id": str(pid), "problem_id": pid, "group": first.get("group"),
                    "question": first.get("question"), "gold": gold, "n_rationales": len(group),
                    "n_answered": sum(v.count for v in votes), "n_answers": len(votes)}
        for rule in RULES:
            won = choose(votes, rule)
            row[f"{rule}_answer"] = won.answer if won else None
        for rule in RULES:
            picked = row[f"{rule}_answer"]
            row[f"{rule}_correct"] = None if gold is None else int(is_correct(picked, gold, answers))
        row["oracle_correct"] = None if gold is None else int(any(is_correct(v.answer, gold, answers)
                                                                  for v in votes))
        out.append(row)
    return out


def selection_accuracy(rows: Sequence[Row]) -> dict[str, Any]:
    """Accuracy of each rule over the problems that have a gold answer (`n` of them); 0.0 when n is 0."""
    _check(rows, *(f"{rule}_correct" for rule in RULES))
    scored = [r for r in rows if r.get("gold") is not None]
    n = len(scored)
    metrics: dict[str, Any] = {}
    for rule in (*RULES, "oracle"):
        correct = sum(int(r[f"{rule}_correct"] or 0) for r in scored)
        metrics[f"{rule}_accuracy"] = correct / n if n else 0.0
    metrics["n"] = n
    return metrics


PAIR_SCHEMA = pa.schema([("_id", pa.string()), ("problem_id", pa.string()), ("group", pa.string()),
                         ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                         ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("margin", pa.float64()),
                         ("chosen_answer", pa.string()), ("rejected_answer", pa.string()),
                         ("chosen_id", pa.string()), ("rejected_id", pa.string())])


def preference_pairs(rows: Sequence[Row], min_margin: float = 0.25, max_pairs: int | None = 4,
                     text: str = "rationale", score: str = "lbt_score", problem: str = "problem_id",
                     question: str = "question", answer: str = "teacher_answer",
                     instruction: str = DEFAULT_INSTRUCTION) -> list[Row] | pa.Table:
    """DPO pairs per teaching problem: `chosen` a rationale with a higher LbT score than `rejected`.

    A pair needs margin = chosen_score - rejected_score > 0 and >= `min_margin`. Rationales without a
    score (never examined) and pairs of identical texts are left out. Per problem, pairs are ordered
    by margin (largest first), then chosen score (highest first), then chosen and rejected ids, and
    the first `max_pairs` are kept (None or 0: all). `prompt` is the teaching problem as the model
    sees it: the instruction, a blank line, and "[[Question]]:" with the question on the next line. With
    no pair, an empty table that keeps these columns, so `retort export pairs --format dpo` still finds them."""
    _check(rows, text, score, problem, question)
    if min_margin is None or min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin!r}")
    out = []
    for pid, group in _by_problem(rows, problem):
        scored = [r for r in group if r[score] is not None and r[text]]
        candidates = []
        for c in scored:
            for r in scored:
                margin = _q(float(c[score]) - float(r[score]))
                if margin > 0 and margin >= _q(min_margin) and c[text] != r[text]:
                    candidates.append((c, r, margin))
        candidates.sort(key=lambda p: (-p[2], -_q(float(p[0][score])), _natural(p[0]["_id"]),
                                       _natural(p[1]["_id"])))
        if max_pairs:
            candidates = candidates[:max_pairs]
        prompt = f"{instruction}\n\n[[Question]]:\n{group[0][question]}" if instruction else str(group[0][question])
        for c, r, margin in candidates:
            out.append({"_id": f"{c['_id']}>{r['_id']}", "problem_id": pid, "group": c.get("group"),
                        "prompt": prompt, "chosen": c[text], "rejected": r[text],
                        "chosen_score": float(c[score]), "rejected_score": float(r[score]), "margin": margin,
                        "chosen_answer": c.get(answer), "rejected_answer": r.get(answer),
                        "chosen_id": c["_id"], "rejected_id": r["_id"]})
    return out or PAIR_SCHEMA.empty_table()
