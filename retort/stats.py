"""Paired statistics for comparing prompting strategies on the same items.

Every strategy in a comparison is scored on the same items, so the honest
comparison is *paired*: resample item indices, not each strategy on its own.
There is one resampling loop, `bootstrap_statistic`: it draws item indices from
one seeded `random.Random` stream that depends only on (number of items,
resamples, seed) and evaluates every statistic on each draw. Every interval
here comes from it. Hence `compare_strategies(..., seed=s)` reports exactly the
intervals that `bootstrap_ci(column, seed=s)` and `paired_bootstrap_diff(a, b,
seed=s)` give on their own, `compare_statistics` (a corpus-level metric such as
macro-F1, recomputed on each draw) pairs its differences the same way, and a
rerun with the same seed reproduces a report bit for bit.

Intervals are percentile bootstrap intervals of the mean (linear interpolation
between order statistics, like numpy's default). Pure stdlib on purpose:
numpy is not a runtime dependency, and a few thousand items times 2,000
resamples takes about a second.

Inputs that cannot be compared (unequal lengths, no items, a missing or
non-finite value) raise `ValueError`; the caller decides how to word it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from operator import itemgetter
from typing import Any, Literal

__all__ = [
    "Comparison",
    "Interval",
    "McNemar",
    "PairResult",
    "StrategyResult",
    "WinRate",
    "adjust",
    "bootstrap_ci",
    "bootstrap_p",
    "bootstrap_statistic",
    "compare_statistics",
    "compare_strategies",
    "holm",
    "interval",
    "mcnemar_exact",
    "paired_bootstrap_diff",
    "pareto_front",
    "win_rate",
]

Outcome = Literal["a", "b", "tie"]


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a confidence interval around it."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (a significant difference)."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True, slots=True)
class McNemar:
    """Exact McNemar test on paired right/wrong outcomes.

    `b01` counts items that strategy A got wrong and B got right, `b10` the
    reverse; items both got right or both got wrong carry no information.
    """

    b01: int
    b10: int
    p_value: float

    @property
    def n(self) -> int:
        return self.b01 + self.b10

    def to_dict(self) -> dict[str, Any]:
        return {"b01": self.b01, "b10": self.b10, "n": self.n, "p_value": self.p_value}


@dataclass(frozen=True, slots=True)
class WinRate:
    """Pairwise judgments of A against B; a tie counts as half a win."""

    wins: int
    losses: int
    ties: int
    win_rate: float
    tie_rate: float
    interval: Interval

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "win_rate": self.win_rate, "tie_rate": self.tie_rate,
                "interval": self.interval.to_dict()}


@dataclass(frozen=True, slots=True)
class StrategyResult:
    name: str
    n: int
    metric: Interval
    binary: bool  # every value was 0/1 (right/wrong), so McNemar applies

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "binary": self.binary, "metric": self.metric.to_dict()}


@dataclass(frozen=True, slots=True)
class PairResult:
    """Strategy `a` against strategy `b`; `diff` is the mean of a - b over the same items."""

    a: str
    b: str
    diff: Interval
    mcnemar: McNemar | None  # only when both strategies' values are all 0/1
    disagreements: tuple[int, ...]  # item indices where the two values differ
    p_value: float = 1.0  # McNemar's exact p for right/wrong scores, else the paired bootstrap's two-sided p
    p_holm: float = 1.0  # p_value adjusted by Holm's step-down method over every pair of the comparison
    alpha: float = 0.05  # 1 - confidence

    @property
    def significant(self) -> bool:
        """The one rule: significant when the Holm-adjusted p-value is below alpha."""
        return self.p_holm < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "diff": self.diff.to_dict(), "significant": self.significant,
                "p_value": self.p_value, "p_holm": self.p_holm, "alpha": self.alpha,
                "mcnemar": self.mcnemar.to_dict() if self.mcnemar else None,
                "disagreements": list(self.disagreements)}


@dataclass(frozen=True, slots=True)
class Comparison:
    n_items: int
    confidence: float
    resamples: int
    seed: int
    strategies: tuple[StrategyResult, ...]
    pairs: tuple[PairResult, ...] = field(default=())

    def strategy(self, name: str) -> StrategyResult:
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(name)

    def pair(self, a: str, b: str) -> PairResult:
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
        raise KeyError((a, b))

    def to_dict(self) -> dict[str, Any]:
        return {"n_items": self.n_items, "confidence": self.confidence, "resamples": self.resamples,
                "seed": self.seed, "strategies": [s.to_dict() for s in self.strategies],
                "pairs": [p.to_dict() for p in self.pairs]}


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `values`."""
    column = _floats(values, "values")
    _check_params(confidence, resamples)
    (means,) = _resampled_means([column], resamples, seed)
    return interval(_mean(column), means, confidence)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of mean(a - b), resampling item indices jointly."""
    col_a, col_b = _floats(a, "a"), _floats(b, "b")
    if len(col_a) != len(col_b):
        raise ValueError(f"paired samples differ in length: a has {len(col_a)} items, b has {len(col_b)}")
    _check_params(confidence, resamples)
    means_a, means_b = _resampled_means([col_a, col_b], resamples, seed)
    return interval(_mean_diff(col_a, col_b), _differences(means_a, means_b), confidence)


def bootstrap_statistic(n: int, statistics: Sequence[Callable[[list[int]], float]], *, resamples: int = 2000,
                        seed: int = 0) -> list[list[float]]:
    """Each statistic over `resamples` shared draws of n item indices (with replacement): retort's one
    resampling loop.

    One index draw serves every statistic, which is what makes a comparison paired:
    the difference of two statistics' replicates is a paired bootstrap of their difference.
    """
    if n < 1:
        raise ValueError("no items")
    rng = random.Random(seed)
    population = range(n)
    out = [[0.0] * resamples for _ in statistics]
    for r in range(resamples):
        idx = rng.choices(population, k=n)
        for s, stat in enumerate(statistics):
            out[s][r] = stat(idx)
    return out


def _resampled_means(columns: Sequence[Sequence[float]], resamples: int, seed: int) -> list[list[float]]:
    """Means of every column over the shared draws of `bootstrap_statistic`."""
    return bootstrap_statistic(len(columns[0]), [_mean_of(col) for col in columns], resamples=resamples, seed=seed)


def _mean_of(column: Sequence[float]) -> Callable[[list[int]], float]:
    """The mean of `column` at drawn indices; itemgetter, because this runs resamples x strategies times."""
    n = len(column)
    if n == 1:  # itemgetter with one key returns the item, not a tuple
        only = column[0]
        return lambda idx: only
    return lambda idx: sum(itemgetter(*idx)(column)) / n


def _differences(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(xs, ys, strict=True)]


def interval(estimate: float, replicates: Sequence[float], confidence: float) -> Interval:
    ordered = sorted(replicates)
    tail = (1.0 - confidence) / 2.0
    return Interval(estimate, _quantile(ordered, tail), _quantile(ordered, 1.0 - tail))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, 'linear')."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac if frac else ordered[lo]


def _mean(column: Sequence[float]) -> float:
    return math.fsum(column) / len(column)


def _mean_diff(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x - y for x, y in zip(a, b, strict=True)) / len(a)


def _check_params(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples!r}")


def _floats(values: Iterable[float | bool], name: str) -> list[float]:
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool):
            out.append(1.0 if v else 0.0)
            continue
        if not isinstance(v, int | float):  # one exception type for every bad input, as documented
            raise ValueError(f"{name}[{i}] is {v!r}; expected a number or a bool")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{name}[{i}] is {v!r}; expected a finite number")
        out.append(f)
    if not out:
        raise ValueError(f"{name} is empty; need at least one item")
    return out


def _is_binary(column: Sequence[float]) -> bool:
    return all(v == 0.0 or v == 1.0 for v in column)


# --------------------------------------------------------------------------- McNemar


def mcnemar_exact(a: Sequence[bool | int], b: Sequence[bool | int]) -> McNemar:
    """Exact (binomial) two-sided McNemar test on paired right/wrong outcomes.

    p = min(1, 2 * sum_{k <= min(b01, b10)} C(n, k) / 2^n) with n = b01 + b10,
    and p = 1 when the strategies never disagree. Computed in exact rationals,
    so it stays right for thousands of discordant items where 2^n overflows a float.
    """
    col_a, col_b = _bools(a, "a"), _bools(b, "b")
    if len(col_a) != len(col_b):
        raise ValueError(f"paired samples differ in length: a has {len(col_a)} items, b has {len(col_b)}")
    b01 = sum(1 for x, y in zip(col_a, col_b, strict=True) if not x and y)
    b10 = sum(1 for x, y in zip(col_a, col_b, strict=True) if x and not y)
    return McNemar(b01, b10, _mcnemar_p(b01, b10))


def _mcnemar_p(b01: int, b10: int) -> float:
    n = b01 + b10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b01, b10) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def _bools(values: Iterable[bool | int], name: str) -> list[bool]:
    out: list[bool] = []
    for i, v in enumerate(values):
        if isinstance(v, bool):
            out.append(v)
        elif isinstance(v, int | float) and v in (0, 1):
            out.append(v == 1)
        else:
            raise ValueError(f"{name}[{i}] is {v!r}; McNemar needs right/wrong outcomes (bool or 0/1)")
    return out


# --------------------------------------------------------------------------- Pareto front


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point dominates, cheapest first.

    Each point is (name, cost, metric); lower cost and higher metric are better.
    A point is dominated when another is at least as good on both and strictly
    better on one, so two identical points both stay on the front.
    """
    for name, cost, metric in points:
        if not (math.isfinite(cost) and math.isfinite(metric)):
            raise ValueError(f"point {name!r} has a non-finite cost or metric: ({cost!r}, {metric!r})")
    front = [
        (cost, -metric, i, name)
        for i, (name, cost, metric) in enumerate(points)
        if not any(
            oc <= cost and om >= metric and (oc < cost or om > metric)
            for j, (_, oc, om) in enumerate(points) if j != i
        )
    ]
    return [name for *_, name in sorted(front)]


# --------------------------------------------------------------------------- pairwise judgments


def win_rate(outcomes: Iterable[Outcome], *, confidence: float = 0.95, resamples: int = 2000,
             seed: int = 0) -> WinRate:
    """Win rate of A over B from pairwise judgments "a" (A wins), "b" (B wins) or "tie".

    win_rate = (wins + ties / 2) / n, with a bootstrap interval over judgments.
    """
    scores: list[float] = []
    wins = losses = ties = 0
    for i, o in enumerate(outcomes):
        if o == "a":
            wins += 1
            scores.append(1.0)
        elif o == "b":
            losses += 1
            scores.append(0.0)
        elif o == "tie":
            ties += 1
            scores.append(0.5)
        else:
            raise ValueError(f"outcomes[{i}] is {o!r}; expected 'a', 'b' or 'tie'")
    if not scores:
        raise ValueError("outcomes is empty; need at least one judgment")
    n = len(scores)
    interval = bootstrap_ci(scores, confidence=confidence, resamples=resamples, seed=seed)
    return WinRate(wins, losses, ties, (wins + 0.5 * ties) / n, ties / n, interval)


# --------------------------------------------------------------------------- all together


def compare_strategies(items: Mapping[str, Sequence[float | bool]], *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> Comparison:
    """Compare strategies scored on the same items, in the order given.

    `items` maps a strategy name to its per-item values (bools for right/wrong,
    or any number such as a judge score); position i is the same item for
    every strategy. Each strategy gets its mean and interval; each pair (i < j)
    gets the paired interval of mean(i - j), McNemar when both are right/wrong,
    and the indices of the items on which they disagree.
    """
    if not items:
        raise ValueError("no strategies to compare")
    _check_params(confidence, resamples)
    names = list(items)
    columns = [_floats(items[name], f"items[{name!r}]") for name in names]
    lengths = {name: len(col) for name, col in zip(names, columns, strict=True)}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name!r}: {k}" for name, k in lengths.items())
        raise ValueError(f"strategies must be scored on the same items, but the counts differ ({shown})")
    n = len(columns[0])
    means = _resampled_means(columns, resamples, seed)
    binary = [_is_binary(col) for col in columns]

    strategies = tuple(
        StrategyResult(name, n, interval(_mean(col), reps, confidence), is_bin)
        for name, col, reps, is_bin in zip(names, columns, means, binary, strict=True)
    )
    pairs: list[PairResult] = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = columns[i], columns[j]
            test = mcnemar_exact([x == 1.0 for x in a], [y == 1.0 for y in b]) if binary[i] and binary[j] else None
            disagree = tuple(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            pairs.append(_pair(names[i], names[j], _mean_diff(a, b), means[i], means[j], confidence, test, disagree))
    return Comparison(n, confidence, resamples, seed, strategies, adjust(pairs))


def compare_statistics(n: int, statistics: Mapping[str, Callable[[list[int]], float]], *,
                       disagreements: Callable[[int, int], Sequence[int]] | None = None, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> Comparison:
    """Compare strategies by a statistic of all their items at once (macro-F1), not a mean of per-item values.

    `statistics` maps a strategy name to a function of item indices (with repeats) that returns
    the statistic over those items; it is evaluated on all n items for the estimate and on the
    draws of `bootstrap_statistic` for the interval. With `disagreements` (the positions i, j of
    two strategies -> the item indices where they differ) every pair gets its paired interval
    and a paired bootstrap p; without it the comparison has no pairs. No McNemar: there is no
    per-item right/wrong.
    """
    if not statistics:
        raise ValueError("no strategies to compare")
    _check_params(confidence, resamples)
    names = list(statistics)
    functions = [statistics[name] for name in names]
    replicates = bootstrap_statistic(n, functions, resamples=resamples, seed=seed)  # first: it rejects n < 1
    everything = list(range(n))
    estimates = [f(everything) for f in functions]
    strategies = tuple(StrategyResult(name, n, interval(e, reps, confidence), False)
                       for name, e, reps in zip(names, estimates, replicates, strict=True))
    pairs: list[PairResult] = []
    if disagreements is not None:
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                pairs.append(_pair(names[i], names[j], estimates[i] - estimates[j], replicates[i], replicates[j],
                                   confidence, None, tuple(disagreements(i, j))))
    return Comparison(n, confidence, resamples, seed, strategies, adjust(pairs))


def _pair(a: str, b: str, estimate: float, reps_a: Sequence[float], reps_b: Sequence[float], confidence: float,
          test: McNemar | None, disagree: tuple[int, ...]) -> PairResult:
    """Strategy a against b from their replicates over the same draws; p is McNemar's when there is
    one, else the paired bootstrap's."""
    replicates = _differences(reps_a, reps_b)
    p = test.p_value if test else bootstrap_p(replicates)
    return PairResult(a, b, interval(estimate, replicates, confidence), test, disagree, p_value=p,
                      alpha=1 - confidence)


def adjust(pairs: Sequence[PairResult]) -> tuple[PairResult, ...]:
    """The pairs with their Holm-adjusted p-values (over all of them: one family of comparisons)."""
    adjusted = holm([p.p_value for p in pairs])
    return tuple(replace(p, p_holm=q) for p, q in zip(pairs, adjusted, strict=True))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment for multiple comparisons: the i-th smallest p is multiplied by the
    number of hypotheses not yet rejected, kept monotone, capped at 1. Controls the family-wise error."""
    m = len(p_values)
    order = sorted(range(m), key=lambda k: p_values[k])
    adjusted = [1.0] * m
    running = 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[k]))
        adjusted[k] = running
    return adjusted


def bootstrap_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of a paired bootstrap: twice the share of resampled differences on the far
    side of zero (at least one resample counted, so p is never 0)."""
    n = len(differences)
    if n == 0:
        return 1.0
    below = sum(1 for d in differences if d <= 0)
    above = sum(1 for d in differences if d >= 0)
    return min(1.0, 2 * (min(below, above) + 1) / (n + 1))
