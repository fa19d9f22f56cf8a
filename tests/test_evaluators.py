"""The built-in evaluators in evaluators/metrics.py, loaded from the file as the engine does."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from retort.errors import DatasetError

METRICS_FILE = Path(__file__).resolve().parent.parent / "evaluators" / "metrics.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retort_test_metrics", METRICS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


metrics = _load()


# --- accuracy ---------------------------------------------------------------------

def test_accuracy_ignores_case_and_spacing_and_counts_none_as_wrong() -> None:
    rows = [
        {"prediction": "Positive ", "label": "positive"},
        {"prediction": "sci  tech", "label": "Sci Tech"},
        {"prediction": "negative", "label": "positive"},
        {"prediction": None, "label": "negative"},
    ]
    assert metrics.accuracy(rows) == {"accuracy": 0.5, "n": 4, "correct": 2}


def test_accuracy_custom_columns_and_rows_without_reference() -> None:
    rows = [{"pred": "a", "gold": "a"}, {"pred": "b", "gold": None}, {"pred": "c"}]
    assert metrics.accuracy(rows, prediction="pred", reference="gold") == {"accuracy": 1.0, "n": 1, "correct": 1}


def test_accuracy_of_no_rows() -> None:
    assert metrics.accuracy([]) == {"accuracy": 0.0, "n": 0, "correct": 0}


def test_a_misspelled_column_is_an_error_not_a_zero() -> None:
    with pytest.raises(DatasetError, match=r"no column 'labels'.*available: label, prediction"):
        metrics.accuracy([{"prediction": "a", "label": "a"}], reference="labels")


# --- exact match --------------------------------------------------------------------

def test_exact_match_squad_normalisation_and_reference_lists() -> None:
    rows = [
        {"prediction": "The Eiffel Tower.", "label": "eiffel tower"},
        {"prediction": "Paris", "label": ["paris", "Paris, France"]},
        {"prediction": "Lyon", "label": ["Paris"]},
        {"prediction": None, "label": "x"},
    ]
    assert metrics.exact_match(rows) == {"exact_match": 0.5, "n": 4, "correct": 2}


# --- macro F1 -----------------------------------------------------------------------

def test_macro_f1_against_a_hand_computed_value() -> None:
    # gold:  a a a b b c
    # pred:  a a b b c c      (plus one row predicting a label outside the set)
    pairs = [("a", "a"), ("a", "a"), ("b", "a"), ("b", "b"), ("c", "b"), ("c", "c"), ("z", "c")]
    rows = [{"prediction": p, "label": g} for p, g in pairs]
    # a: tp 2, fp 0, fn 1 -> F1 = 4/5 = 0.8
    # b: tp 1, fp 1, fn 1 -> F1 = 2/4 = 0.5
    # c: tp 1, fp 1, fn 1 -> F1 = 2/4 = 0.5   ("z" is a miss for c, not a false positive of any label)
    result = metrics.macro_f1(rows)
    assert result["n"] == 7
    assert result["per_label"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 0.5})
    assert result["macro_f1"] == pytest.approx(1.8 / 3)


def test_macro_f1_given_labels_without_support() -> None:
    rows = [{"prediction": "pos", "label": "pos"}, {"prediction": "neu", "label": "neg"},
            {"prediction": "NEG", "label": "neg"}]
    result = metrics.macro_f1(rows, labels=["pos", "neg", "neu", "mixed"])
    # pos: 1.0; neg: tp 1, fn 1 -> 2/3; neu: no support but one prediction -> 0.0;
    # mixed: no support, no prediction -> excluded
    assert result["per_label"] == pytest.approx({"pos": 1.0, "neg": 2 / 3, "neu": 0.0})
    assert result["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_macro_f1_none_prediction_is_a_miss() -> None:
    rows = [{"prediction": None, "label": "x"}, {"prediction": "x", "label": "x"}]
    assert metrics.macro_f1(rows)["per_label"] == pytest.approx({"x": 2 / 3})


# --- math ---------------------------------------------------------------------------

MATH_ROWS: list[dict[str, Any]] = [
    {"prediction": "0.5", "answer": r"\frac{1}{2}"},
    {"prediction": "$1,000.00", "answer": "1000"},
    {"prediction": "x = 5", "answer": "5"},
    {"prediction": "7", "answer": "8"},
    {"prediction": None, "answer": "3"},
]


def test_math_accuracy() -> None:
    assert metrics.math_accuracy(MATH_ROWS) == {"math_accuracy": 0.6, "n": 5, "correct": 3}


def test_math_accuracy_with_extraction_from_full_solutions() -> None:
    rows = [{"solution": "2 + 2 = 4.\n#### 4", "gold": 4},
            {"solution": "The total is 12.\n#### 12", "gold": "13"}]
    result = metrics.math_accuracy(rows, prediction="solution", reference="gold", extract=True)
    assert result == {"math_accuracy": 0.5, "n": 2, "correct": 1}
    # without extraction the whole solution is compared as a string, and fails
    assert metrics.math_accuracy(rows, prediction="solution", reference="gold")["correct"] == 0
    # ... except that math_equal always reads the last \boxed{} of what it is given
    boxed = [{"solution": r"2 + 2 = 4, so \boxed{4}", "gold": 4}]
    assert metrics.math_accuracy(boxed, prediction="solution", reference="gold")["correct"] == 1


def test_score_math_adds_a_column_without_mutating_rows() -> None:
    rows = [dict(r) for r in MATH_ROWS] + [{"prediction": "1", "answer": None}]
    scored = metrics.score_math(rows, output="ok")
    assert [r["ok"] for r in scored] == [1, 1, 1, 0, 0, None]
    assert scored[0]["prediction"] == "0.5" and scored[0]["answer"] == r"\frac{1}{2}"
    assert all("ok" not in r for r in rows)
