"""Learning by teaching (LbT): answer selection by LbT score (M1) and preference pairs (M2).

A teacher writes K rationales per teaching problem; each rationale teaches
students who then sit an exam of similar problems. A rationale's LbT score is
its students' mean exam score. The pipeline stages call:

    grade_exams(rows, ...)          each student answer scored 0/1 against the exam gold (math_equal)
    answer_votes(rows, ...)         per problem and normalized answer: count, max/sum/mean LbT score
    select_answers(rows, ...)       per problem, the answer chosen by MAJ, MAX, SUM and AVG, and whether it is right
    selection_accuracy(rows)        {maj_accuracy, max_accuracy, sum_accuracy, avg_accuracy, oracle_accuracy, n}
    preference_pairs(rows, ...)     DPO pairs (chosen = higher LbT score) with a minimum margin and a cap

and `tally` / `choose` are the two pure functions underneath the selection.

Selection rules, over the rationales of one problem grouped by normalized final
answer (`normalize_answer`, so "12", "12.00" and "$12" are one answer):

    MAJ  the most frequent answer (self-consistency)
    MAX  the answer of the single best-scored rationale
    SUM  the answer with the largest total LbT score (an LbT-weighted vote)
    AVG  the answer with the largest mean LbT score

Ties break by count (more rationales wins), then by the normalized answer in
ascending string order ("12" before "7"), so a selection never depends on row
order. A rationale with no final answer does not vote. A rationale with no LbT
score (its problem had no exam problem) votes with score 0, so for a problem
with no exam MAX, SUM and AVG all fall back to MAJ. Scores compare rounded to
9 decimals, so 1/3 + 1/3 and 2/3 tie as they should.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from retort.errors import DatasetError
from retort.mathnorm import math_equal, normalize_answer

Row = dict[str, Any]

RULES = ("maj", "max", "sum", "avg")
DEFAULT_INSTRUCTION = ('Solve the problem step by step, then write the final answer on its own line as '
                       '"[[Final Answer]]: <number>".')
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Vote:
    """The rationales of one problem that reached the same (normalized) answer."""

    answer: str  # as the first of these rationales spelled it
    key: str  # normalize_answer(answer)
    count: int
    score_max: float
    score_sum: float
    score_mean: float

    def value(self, rule: str) -> float:
        return {"maj": float(self.count), "max": self.score_max, "sum": self.score_sum,
                "avg": self.score_mean}[rule]


def _q(x: float) -> float:
    return round(x, 9)


def tally(rationales: Iterable[tuple[Any, float | None]]) -> list[Vote]:
    """Group (answer, LbT score) pairs by normalized answer; a None answer does not vote, a None score is 0.

    Votes come out in order of first appearance."""
    groups: dict[str, tuple[str, list[float]]] = {}
    for answer, score in rationales:
        if answer is None or str(answer).strip() == "":
            continue
        text = str(answer).strip()
        key = normalize_answer(text)
        groups.setdefault(key, (text, []))[1].append(float(score) if score is not None else 0.0)
    return [Vote(text, key, len(scores), max(scores), _q(sum(scores)), _q(sum(scores) / len(scores)))
            for key, (text, scores) in groups.items()]


def choose(votes: Sequence[Vote], rule: str) -> Vote | None:
    """The winning vote under `rule` (maj, max, sum, avg); ties by count, then by answer key ascending."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {', '.join(RULES)}")
    if not votes:
        return None
    return min(votes, key=lambda v: (-_q(v.value(rule)), -v.count, v.key))


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
                output: str = "correct") -> list[Row] | pa.Table:
    """Each student row, copied, with `output` = 1 when its answer equals the exam gold (math_equal), else 0
    (None when there is no gold). With no rows, an empty table that still has the columns the
    `lbt_scores` stage joins on, so a run whose problems have no exam does not fail there."""
    if not rows:
        return pa.table({"_id": pa.array([], pa.string()), "rationale_id": pa.array([], pa.string()),
                         output: pa.array([], pa.int64())})
    _check(rows, prediction, reference)
    graded = []
    for row in rows:
        gold = row[reference]
        graded.append({**row, output: None if gold is None else int(math_equal(row[prediction], gold))})
    return graded


def answer_votes(rows: Sequence[Row], answer: str = "teacher_answer", score: str = "lbt_score",
                 problem: str = "problem_id", reference: str = "gold") -> list[Row]:
    """One row per teaching problem and normalized answer, with its count and LbT scores."""
    _check(rows, answer, score, problem)
    out = []
    for pid, group in _by_problem(rows, problem):
        first = group[0]
        for vote in tally((r[answer], r[score]) for r in group):
            gold = first.get(reference)
            out.append({"_id": f"{pid}:{vote.key}", "problem_id": pid, "group": first.get("group"),
                        "answer": vote.answer, "answer_key": vote.key, "count": vote.count,
                        "score_max": vote.score_max, "score_sum": vote.score_sum, "score_mean": vote.score_mean,
                        "correct": None if gold is None else int(math_equal(vote.answer, gold))})
    return out


def select_answers(rows: Sequence[Row], answer: str = "teacher_answer", score: str = "lbt_score",
                   problem: str = "problem_id", reference: str = "gold") -> list[Row]:
    """One row per teaching problem: the answer each rule selects and whether it equals the gold answer.

    `oracle_correct` says whether any rationale reached the gold answer (the ceiling of every rule)."""
    _check(rows, answer, score, problem)
    out = []
    for pid, group in _by_problem(rows, problem):
        first = group[0]
        gold = first.get(reference)
        votes = tally((r[answer], r[score]) for r in group)
        row: Row = {"_id": str(pid), "problem_id": pid, "group": first.get("group"),
                    "question": first.get("question"), "gold": gold, "n_rationales": len(group),
                    "n_answered": sum(v.count for v in votes), "n_answers": len(votes)}
        for rule in RULES:
            won = choose(votes, rule)
            row[f"{rule}_answer"] = won.answer if won else None
        for rule in RULES:
            picked = row[f"{rule}_answer"]
            row[f"{rule}_correct"] = None if gold is None else int(math_equal(picked, gold))
        row["oracle_correct"] = None if gold is None else int(any(math_equal(v.answer, gold) for v in votes))
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
    sees it: the instruction, a blank line, and "Problem: <question>". With no pair, an empty table
    that keeps these columns, so `retort export pairs --format dpo` still finds them."""
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
        prompt = f"{instruction}\n\nProblem: {group[0][question]}" if instruction else str(group[0][question])
        for c, r, margin in candidates:
            out.append({"_id": f"{c['_id']}>{r['_id']}", "problem_id": pid, "group": c.get("group"),
                        "prompt": prompt, "chosen": c[text], "rejected": r[text],
                        "chosen_score": float(c[score]), "rejected_score": float(r[score]), "margin": margin,
                        "chosen_answer": c.get(answer), "rejected_answer": r.get(answer),
                        "chosen_id": c["_id"], "rejected_id": r["_id"]})
    return out or PAIR_SCHEMA.empty_table()
