"""The report data model: everything a renderer needs, normalised once by `build`.

A `Report` holds the statistics (`retort.stats.Comparison`), one `CostRow` per
strategy, the Pareto front and the missing predictions, plus what a caller adds
as data: more `Table`s (`retort compare`'s strategies and all metrics),
`PairDisagreements` (the items two strategies answer differently) and `details`
for the JSON file only. The verdict and the significance rule are worded here
once, for every format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from retort.report.formats import ci, num, pval
from retort.stats import Comparison, StrategyResult, pareto_front


@dataclass(frozen=True, slots=True)
class CostRow:
    """What running one strategy cost, summed over its items."""

    strategy: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    cost_usd: float | None = None  # None when the model has no known price (a local model)
    metric: float | None = None  # filled from the comparison when None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "wall_seconds": self.wall_seconds, "cost_usd": self.cost_usd, "metric": self.metric}


CostRowLike = CostRow | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    numeric: bool = False  # right-aligned; a key number (not a detail) stays on one line
    detail: bool = False  # dropped where space is short (a narrow terminal)


@dataclass(frozen=True, slots=True)
class Table:
    """A table a caller adds after the report's own: a heading, columns, cells as text, a note under the heading.

    The first column names the row (a strategy)."""

    section_id: str  # the HTML page's ids, for links and browser tests
    table_id: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One item that two strategies answer differently (None: no prediction, or no text)."""

    item_id: str
    text: Any
    a: Any
    b: Any
    reference: Any


@dataclass(frozen=True, slots=True)
class PairDisagreements:
    """The items strategies a and b answer differently: the first few, how many there are in all, and the
    command that lists every one."""

    a: str
    b: str
    items: tuple[Disagreement, ...]
    total: int
    command: str


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a renderer needs, normalised once."""

    comparison: Comparison
    costs: dict[str, CostRow]  # by strategy name; strategies without a row are absent
    title: str
    spec: str | None
    generated: str
    metric_name: str
    front: tuple[str, ...]  # Pareto front over (total tokens, metric), cheapest first
    missing: dict[str, int] = field(default_factory=dict)  # items without a prediction, by strategy
    tables: tuple[Table, ...] = ()  # after the report's own tables, in every format but JSON
    disagreements: tuple[PairDisagreements, ...] = ()  # the HTML page's "where strategies disagree"
    details: dict[str, Any] = field(default_factory=dict)  # more top-level keys of the JSON file

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "spec": self.spec, "generated": self.generated,
                "metric": self.metric_name, "verdict": verdict(self), "significance": rule(self.comparison),
                "missing": self.missing, "comparison": self.comparison.to_dict(),
                "costs": [self.costs[s.name].to_dict() for s in self.comparison.strategies
                          if s.name in self.costs],
                "pareto_front": list(self.front), **self.details}


def build(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, title: str = "Strategy comparison",
          spec: str | None = None, generated: datetime | str | None = None, metric_name: str = "accuracy",
          missing: Mapping[str, int] | None = None, tables: Sequence[Table] = (),
          disagreements: Sequence[PairDisagreements] = (), details: Mapping[str, Any] | None = None) -> Report:
    """The report of a comparison: cost rows checked against its strategies, the Pareto front, the date."""
    names = [s.name for s in comparison.strategies]
    rows: dict[str, CostRow] = {}
    for raw in costs:
        row = raw if isinstance(raw, CostRow) else CostRow(**dict(raw))
        if row.strategy not in names:
            raise ValueError(f"cost row for {row.strategy!r}, which is not a strategy in the comparison "
                             f"({', '.join(map(repr, names))})")
        if row.metric is None:
            row = replace(row, metric=comparison.strategy(row.strategy).metric.estimate)
        rows[row.strategy] = row
    points = [(n, float(rows[n].total_tokens), comparison.strategy(n).metric.estimate)
              for n in names if n in rows]
    if generated is None:
        generated = datetime.now(UTC)
    stamp = generated.strftime("%Y-%m-%d %H:%M %Z").strip() if isinstance(generated, datetime) else generated
    return Report(comparison, rows, title, spec, stamp, metric_name, tuple(pareto_front(points)),
                  {name: int(k) for name, k in (missing or {}).items() if k}, tuple(tables), tuple(disagreements),
                  dict(details or {}))


def rule(c: Comparison) -> str:
    """The one stated rule for "significant", as every report prints it."""
    return (f"A pair is significant when its p-value, adjusted for the {len(c.pairs)} pairs by Holm's method, is "
            f"below {1 - c.confidence:.2g}; p is McNemar's exact test when both strategies score right/wrong, "
            "otherwise a paired bootstrap.")


def best_strategy(r: Report) -> StrategyResult | None:
    """The best strategy among those with a prediction for at least one item."""
    n = r.comparison.n_items
    usable = [s for s in r.comparison.strategies if r.missing.get(s.name, 0) < n]
    return max(usable, key=lambda s: s.metric.estimate) if usable else None


def verdict(r: Report) -> list[str]:
    """A few plain sentences: warnings about missing predictions, then how the best strategy compares."""
    c, n = r.comparison, r.comparison.n_items
    lines = []
    for s in c.strategies:
        gone = r.missing.get(s.name, 0)
        if gone >= n:
            lines.append(f"warning: {s.name} has no prediction for any of the {n} items (every call failed or no "
                         "answer parsed): its score says nothing about the strategy")
        elif gone:
            lines.append(f"warning: {s.name} has no prediction for {gone} of {n} items; they count as wrong")
    best = best_strategy(r)
    if best is None:
        return [*lines, "no strategy produced a prediction: nothing to compare"]
    points = all(0.0 <= s.metric.estimate <= 1.0 for s in c.strategies)

    def amount(x: float) -> str:
        return f"{abs(x) * 100:.1f} points" if points else f"{abs(x):.3g}"

    for p in c.pairs:
        if best.name not in (p.a, p.b):
            continue
        other = p.b if p.a == best.name else p.a
        sign = 1 if p.a == best.name else -1
        low, high = sorted((sign * p.diff.low, sign * p.diff.high))
        shown = (f"[{low * 100:+.1f}, {high * 100:+.1f}]" if points else f"[{low:+.3g}, {high:+.3g}]")
        if p.significant:
            lines.append(f"{best.name} beats {other} by {amount(p.diff.estimate)} {shown}, significant after Holm "
                         f"correction (p = {pval(p.p_holm)})")
        else:
            lines.append(f"{best.name} vs {other}: {'+' if sign * p.diff.estimate >= 0 else '-'}"
                         f"{amount(p.diff.estimate)} {shown}, not significant after Holm correction "
                         f"(p = {pval(p.p_holm)})")
    if not c.pairs:
        lines.append(f"{best.name}: {num(best.metric.estimate)} {ci(best.metric)} ({r.metric_name})")
    return lines


