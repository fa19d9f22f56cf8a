"""Classification scoring for one pipeline stage: accuracy and macro-F1 together.

    classification_metrics(rows, prediction="prediction", reference="label", labels=None, loose=False)

A Python stage calls one function, and the SSE-CoT pipelines (and their
baselines) report both numbers from one `metrics` stage, so this combines
`accuracy` and `macro_f1` of evaluators/metrics.py rather than reimplementing them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retort.workspace import Workspace, import_object

# metrics.py sits next to this file; loading it by name through the workspace
# gives the same module object the runner uses for `python: accuracy`.
_HERE = Workspace(Path(__file__).resolve().parent.parent)
_accuracy = import_object("metrics:accuracy", _HERE)
_macro_f1 = import_object("metrics:macro_f1", _HERE)

Row = dict[str, Any]

_NON_WORD = re.compile(r"[\W_]+")


def _loose(value: Any) -> str:
    """The key under which "Sci-Tech." and "sci_tech" are one label, as in CDMT's SQL gate."""
    return _NON_WORD.sub(" ", str(value)).strip().casefold()


def classification_metrics(rows: Sequence[Row], prediction: str = "prediction", reference: str = "label",
                           labels: Sequence[Any] | None = None, loose: bool = False) -> dict[str, Any]:
    """Accuracy and macro-F1 of `prediction` against `reference`, plus counts.

    Labels compare ignoring case and spacing. Macro-F1 averages over the gold
    labels, plus `labels` when given (then a class the model predicts but the
    sample lacks also costs F1). A None prediction (an answer that did not
    parse) counts as wrong; `unparsed` counts them. Rows without a reference
    are not scored. With `loose`, a prediction also matches a gold label that
    differs only in punctuation, as free-text labels (a JSON field) often do.
    """
    if loose:
        gold = {_loose(row[reference]): row[reference] for row in rows if row.get(reference) is not None}
        rows = [{**row, prediction: gold.get(_loose(row[prediction]), row[prediction])}
                if row.get(prediction) is not None else row for row in rows]
    acc = _accuracy(rows, prediction=prediction, reference=reference)
    f1 = _macro_f1(rows, prediction=prediction, reference=reference, labels=labels)
    unparsed = sum(1 for row in rows if row.get(reference) is not None and row.get(prediction) is None)
    return {"accuracy": acc["accuracy"], "macro_f1": f1["macro_f1"], "n": acc["n"], "correct": acc["correct"],
            "unparsed": unparsed, "per_label": f1["per_label"]}
