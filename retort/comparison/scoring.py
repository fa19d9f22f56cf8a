"""Scores per item and per strategy, and every metric's intervals, from the strategies' predictions.

Several rows for one item (samples > 1) become their majority prediction, ties
going to the lowest `_id`; an item with no usable prediction (a failed call, an
answer that did not parse) scores 0 and is counted as missing.

Metrics are evaluators (`evaluators/*.py`) called with `prediction=` and
`reference=` column names. A per-item metric (accuracy, exact match, math,
choice match, and user evaluators by default) scores each item 0/1 (or any
number), so `stats.compare_strategies` gives paired bootstrap intervals and
McNemar tests. A corpus-level metric (macro-F1) has no per-item score:
`stats.compare_statistics` recomputes it on the same resampled items, so its
paired differences are paired too. All intervals come from the one resampling
loop in `retort.stats`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from retort.comparison.result import Result, StrategyRun
from retort.comparison.spec import ComparisonSpec, MetricSpec
from retort.errors import UserError
from retort.stats import Comparison, Interval, compare_statistics, compare_strategies

__all__ = ["BUILTIN_METRICS", "Metric", "choice_match", "corpus_resamples", "disagreements", "majority",
           "natural_order", "resolve_metric", "score"]

# Corpus-level metrics are recomputed on every resample; cap the rows an evaluator sees
# per strategy (macro-F1 runs ~3 µs a row) so 2,000 items stay a few seconds, not a minute.
CORPUS_ROW_BUDGET = 500_000


# --------------------------------------------------------------------------- metrics


def _choice_key(value: Any) -> str:
    """"(B) Paris", "B.", "b" -> "b"; any other answer -> itself, case- and space-insensitive."""
    text = re.sub(r"\s+", " ", str(value)).strip().casefold()
    m = re.match(r"^[\(\[]?([a-z0-9])(?:[\)\]\.:]|$)", text)
    if m and (len(text) == 1 or text[1] in ")].:" or text[0] in "(["):
        return m.group(1)
    return text.strip("()[]. ")


def choice_match(rows: Sequence[dict[str, Any]], prediction: str = "prediction",
                 reference: str = "label") -> dict[str, Any]:
    """Share of rows whose predicted choice is the reference choice: "(B) Paris", "B." and "b" all read B."""
    scored = [(r.get(prediction), r.get(reference)) for r in rows if r.get(reference) is not None]
    correct = sum(1 for p, g in scored if p is not None and _choice_key(p) == _choice_key(g))
    return {"choice_match": correct / len(scored) if scored else 0.0, "n": len(scored), "correct": correct}


# name -> (evaluator, key of its dict, scored per item)
BUILTIN_METRICS: dict[str, tuple[str | Callable[..., Any], str, bool]] = {
    "accuracy": ("metrics.accuracy", "accuracy", True),
    "exact_match": ("metrics.exact_match", "exact_match", True),
    "math_equal": ("metrics.math_accuracy", "math_accuracy", True),
    "math_accuracy": ("metrics.math_accuracy", "math_accuracy", True),
    "choice": (choice_match, "choice_match", True),
    "choice_match": (choice_match, "choice_match", True),
    "macro_f1": ("metrics.macro_f1", "macro_f1", False),
}


@dataclass
class Metric:
    name: str
    fn: Callable[..., Any]
    key: str
    per_item: bool
    kwargs: dict[str, Any]

    def value(self, rows: list[dict[str, Any]], reference: str) -> float:
        out = self.fn(rows, prediction="prediction", reference=reference, **self.kwargs)
        if isinstance(out, dict):
            if self.key not in out:
                raise UserError(f"metric {self.name}: the evaluator returned no {self.key!r} "
                                f"(keys: {', '.join(map(str, out))}); name one with `key:`")
            out = out[self.key]
        if isinstance(out, bool):
            return float(out)
        if not isinstance(out, int | float) or not math.isfinite(out):
            raise UserError(f"metric {self.name}: expected a finite number, got {out!r}")
        return float(out)


def resolve_metric(spec: MetricSpec, workspace: Any) -> Metric:
    builtin = BUILTIN_METRICS.get(spec.evaluator or spec.name)
    ref: str | Callable[..., Any]
    if builtin:
        ref, key, per_item = builtin
    else:
        ref = spec.evaluator or spec.name
        key, per_item = re.split(r"[.:]", ref)[-1], True
    fn = workspace.evaluator(ref) if isinstance(ref, str) else ref
    key = spec.key or key
    return Metric(spec.name, fn, key, spec.per_item if spec.per_item is not None else per_item, spec.with_)


def corpus_resamples(n: int, resamples: int) -> int:
    return max(1, min(resamples, max(200, CORPUS_ROW_BUDGET // max(n, 1))))


# --------------------------------------------------------------------------- one prediction per item


def natural_order(item_id: str) -> tuple[tuple[int, Any], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in str(item_id).split("."))


def _vote_key(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"\s+", " ", value).strip().casefold()
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


def majority(rows: Sequence[tuple[str, Any]]) -> Any:
    """The most frequent prediction of one item's rows; a tie goes to the lowest `_id`; None if none."""
    ordered = sorted(((i, p) for i, p in rows if p is not None), key=lambda r: natural_order(r[0]))
    if not ordered:
        return None
    counts = Counter(_vote_key(p) for _, p in ordered)
    top = max(counts.values())
    return next(p for _, p in ordered if counts[_vote_key(p)] == top)


# --------------------------------------------------------------------------- scoring


def score(spec: ComparisonSpec, spec_path: str, items: list[dict[str, Any]], runs: list[StrategyRun],
          metrics: list[Metric], workspace: Any) -> Result:
    """Per-item scores, intervals for every metric, and the primary metric's paired comparison.

    `compare_items.score` is the primary metric per item; when that metric is corpus-level
    (macro-F1), it is accuracy per item instead (prediction equals reference).
    """
    ref = spec.reference
    rows = {run.name: [{**item, "prediction": run.predictions.get(item["_id"])} for item in items] for run in runs}
    scores: dict[str, dict[str, list[float]]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    used: dict[str, int] = {}
    comparison: Comparison | None = None
    for k, metric in enumerate(metrics):
        if metric.per_item:
            per = {run.name: [0.0 if r["prediction"] is None else metric.value([r], ref) for r in rows[run.name]]
                   for run in runs}
            scores[metric.name] = per
            c = compare_strategies(per, confidence=spec.confidence, resamples=spec.resamples, seed=spec.seed)
            used[metric.name] = spec.resamples
        else:
            c = _corpus_comparison(metric, rows, ref, spec, runs, items, pairs=k == 0)
            used[metric.name] = c.resamples
        intervals[metric.name] = {s.name: s.metric for s in c.strategies}
        if k == 0:
            comparison = c
    assert comparison is not None
    primary = metrics[0]
    if primary.name in scores:
        per_item = scores[primary.name]
    else:
        acc = resolve_metric(MetricSpec.model_validate({"name": "accuracy"}), workspace)
        per_item = {name: [0.0 if r["prediction"] is None else acc.value([r], ref) for r in column]
                    for name, column in rows.items()}
    return Result(spec, spec_path, items, runs, scores, intervals, used, comparison, per_item)


def _corpus_comparison(metric: Metric, rows: dict[str, list[dict[str, Any]]], ref: str, spec: ComparisonSpec,
                       runs: list[StrategyRun], items: list[dict[str, Any]], pairs: bool) -> Comparison:
    n = len(items)

    def stat(name: str) -> Callable[[list[int]], float]:
        column = rows[name]
        return lambda idx: metric.value([column[i] for i in idx], ref)

    def differing(i: int, j: int) -> list[int]:
        a, b = runs[i].predictions, runs[j].predictions
        return [k for k, item in enumerate(items) if _differ(a.get(item["_id"]), b.get(item["_id"]))]

    return compare_statistics(n, {run.name: stat(run.name) for run in runs}, disagreements=differing if pairs else None,
                              confidence=spec.confidence, resamples=corpus_resamples(n, spec.resamples),
                              seed=spec.seed)


def _differ(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return bool(_vote_key(a) != _vote_key(b))


def disagreements(result: Result, a: str, b: str) -> list[dict[str, Any]]:
    """Items on which strategies `a` and `b` predict differently (a missing prediction differs from any)."""
    ra, rb = result.run(a), result.run(b)
    text = result.spec.text or ("text" if result.items and "text" in result.items[0] else None)
    out = []
    for item in result.items:
        pa_, pb = ra.predictions.get(item["_id"]), rb.predictions.get(item["_id"])
        if _differ(pa_, pb):
            out.append({"item_id": item["_id"], "text": item.get(text) if text else None, a: pa_, b: pb,
                        "reference": item[result.spec.reference]})
    return out
