"""Built-in scoring evaluators: small functions over rows that return plain values.

Aggregates take the rows of a table (a list of dicts) and return a dict of
numbers; `score_math` scores each row and returns the rows with a 0/1 column.

    accuracy(rows, prediction="prediction", reference="label")
    exact_match(rows, prediction="prediction", reference="label")
    macro_f1(rows, prediction="prediction", reference="label", labels=None)
    math_accuracy(rows, prediction="prediction", reference="answer", extract=False)
    score_math(rows, prediction="prediction", reference="answer", output="correct", extract=False)

Shared rules: a row whose reference is None (or missing) is not scored and does
not count in `n`; a None prediction counts as wrong. With no scored row the
score is 0.0 and `n` is 0. A column named here that no row has is an error,
not a silent zero.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from retort.errors import DatasetError
from retort.mathnorm import extract_answer, math_equal

Row = dict[str, Any]

_SPACES = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _check_columns(rows: Sequence[Row], *columns: str) -> None:
    if not rows:
        return
    for column in columns:
        if not any(column in row for row in rows[:100]):
            available = ", ".join(sorted(rows[0])) or "none"
            raise DatasetError(f"no column {column!r} in the rows; available: {available}")


def _label(value: Any) -> str:
    """Case- and space-insensitive form of a label."""
    return _SPACES.sub(" ", str(value)).strip().casefold()


def _scored(rows: Sequence[Row], prediction: str, reference: str) -> list[tuple[Any, Any]]:
    _check_columns(rows, prediction, reference)
    return [(row.get(prediction), row.get(reference)) for row in rows if row.get(reference) is not None]


def _rate(correct: int, n: int) -> float:
    return correct / n if n else 0.0


def accuracy(rows: Sequence[Row], prediction: str = "prediction", reference: str = "label") -> dict[str, Any]:
    """Share of rows whose prediction equals the reference, ignoring case and spacing."""
    pairs = _scored(rows, prediction, reference)
    correct = sum(1 for pred, gold in pairs if pred is not None and _label(pred) == _label(gold))
    return {"accuracy": _rate(correct, len(pairs)), "n": len(pairs), "correct": correct}


def _squad(value: Any) -> str:
    """SQuAD-style answer normalisation: lowercase, no punctuation, no articles."""
    text = str(value).casefold().translate(_PUNCTUATION)
    return _SPACES.sub(" ", _ARTICLES.sub(" ", text)).strip()


def exact_match(rows: Sequence[Row], prediction: str = "prediction", reference: str = "label") -> dict[str, Any]:
    """Share of rows whose prediction matches the reference after SQuAD-style
    normalisation (case, punctuation, articles, spacing). A reference may be a
    list of acceptable answers; matching any one counts."""
    pairs = _scored(rows, prediction, reference)
    correct = 0
    for pred, gold in pairs:
        if pred is None:
            continue
        golds: Iterable[Any] = gold if isinstance(gold, list | tuple) else (gold,)
        normalised = _squad(pred)
        correct += any(normalised == _squad(g) for g in golds if g is not None)
    return {"exact_match": _rate(correct, len(pairs)), "n": len(pairs), "correct": correct}


def macro_f1(rows: Sequence[Row], prediction: str = "prediction", reference: str = "label",
             labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """Unweighted mean of per-label F1 over the gold labels and `labels`.

    Labels compare ignoring case and spacing; `per_label` keys use the spelling
    of `labels`, else the first gold spelling. A prediction outside the label
    set is a miss for its gold label. A label with neither support nor
    predictions has no F1 and is left out of the mean.
    """
    pairs = _scored(rows, prediction, reference)
    spelled: dict[str, str] = {}
    for label in [*(labels or ()), *(gold for _, gold in pairs)]:
        spelled.setdefault(_label(label), str(label).strip())
    true_pos: Counter[str] = Counter()
    false_pos: Counter[str] = Counter()
    false_neg: Counter[str] = Counter()
    for pred, gold in pairs:
        g = _label(gold)
        p = _label(pred) if pred is not None else None
        if p == g:
            true_pos[g] += 1
            continue
        false_neg[g] += 1
        if p in spelled:
            false_pos[p] += 1
    per_label: dict[str, float] = {}
    for key, name in spelled.items():
        denominator = 2 * true_pos[key] + false_pos[key] + false_neg[key]
        if denominator:
            per_label[name] = 2 * true_pos[key] / denominator
    score = sum(per_label.values()) / len(per_label) if per_label else 0.0
    return {"macro_f1": score, "n": len(pairs), "per_label": per_label}


def _math_pred(value: Any, extract: bool) -> Any:
    if extract and value is not None:
        return extract_answer(str(value))
    return value


def math_accuracy(rows: Sequence[Row], prediction: str = "prediction", reference: str = "answer",
                  extract: bool = False) -> dict[str, Any]:
    """Share of rows whose prediction is the same answer as the reference
    (`math_equal`: "1/2" == "0.5", "$1,000" == "1000"). With `extract`, the
    prediction is a full solution and its final answer is extracted first."""
    pairs = _scored(rows, prediction, reference)
    correct = sum(1 for pred, gold in pairs if math_equal(_math_pred(pred, extract), gold))
    return {"math_accuracy": _rate(correct, len(pairs)), "n": len(pairs), "correct": correct}


def score_math(rows: Sequence[Row], prediction: str = "prediction", reference: str = "answer",
               output: str = "correct", extract: bool = False) -> list[Row]:
    """Each row, copied, with `output` = 1 when its prediction equals its reference
    (`math_equal`), 0 when not, None when it has no reference."""
    _check_columns(rows, prediction, reference)
    scored = []
    for row in rows:
        gold = row.get(reference)
        value = None if gold is None else int(math_equal(_math_pred(row.get(prediction), extract), gold))
        scored.append({**row, output: value})
    return scored
