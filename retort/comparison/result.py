"""What a comparison produced: each strategy's run and predictions, then every metric's scores and intervals.

`run.py` fills a `StrategyRun` per strategy; `scoring.py` turns them into the
`Result` that is recorded in the store and rendered as reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retort.comparison.spec import ComparisonSpec
from retort.errors import NotFoundError
from retort.spec import Pipeline
from retort.stats import Comparison, Interval

__all__ = ["Result", "StrategyRun"]


@dataclass
class StrategyRun:
    name: str
    pipeline: Pipeline
    stage: str
    column: str
    run_id: int | None = None
    predictions: dict[str, Any] = field(default_factory=dict)  # item id -> majority prediction (or None)
    rows: int = 0
    calls: int = 0
    calls_made: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    cost_usd: float | None = None


@dataclass
class Result:
    spec: ComparisonSpec
    spec_path: str
    items: list[dict[str, Any]]  # dataset rows with a reference, in dataset order
    runs: list[StrategyRun]
    scores: dict[str, dict[str, list[float]]]  # metric -> strategy -> per-item scores (per-item metrics)
    intervals: dict[str, dict[str, Interval]]  # metric -> strategy -> interval
    resamples: dict[str, int]  # metric -> resamples used
    comparison: Comparison  # the primary metric, with pairs
    item_scores: dict[str, list[float]]  # strategy -> per-item score kept in `compare_items`

    @property
    def primary(self) -> str:
        return self.spec.metrics[0].name

    def missing(self, run: StrategyRun) -> int:
        return sum(1 for item in self.items if run.predictions.get(item["_id"]) is None)

    def run(self, name: str) -> StrategyRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise NotFoundError(f"no strategy {name!r} in {self.spec.name} (strategies: "
                            f"{', '.join(r.name for r in self.runs)})")
