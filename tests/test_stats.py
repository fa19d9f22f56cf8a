"""retort.stats: paired bootstrap, exact McNemar, Pareto front, win rate, the whole comparison."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest

from retort import stats
from retort.stats import (
    Interval,
    bootstrap_ci,
    bootstrap_statistic,
    compare_statistics,
    compare_strategies,
    mcnemar_exact,
    paired_bootstrap_diff,
    pareto_front,
    win_rate,
)

# --------------------------------------------------------------------------- bootstrap_ci


def test_bootstrap_ci_of_a_constant_is_degenerate() -> None:
    iv = bootstrap_ci([0.25] * 50)
    assert iv == Interval(0.25, 0.25, 0.25)


def test_bootstrap_ci_estimate_is_the_sample_mean_and_inside_the_interval() -> None:
    rng = random.Random(1)
    values = [rng.gauss(3.0, 1.0) for _ in range(200)]
    iv = bootstrap_ci(values, seed=5)
    assert iv.estimate == pytest.approx(sum(values) / len(values))
    assert iv.low < iv.estimate < iv.high
    # about 2 * 1.96 * sd / sqrt(n) wide; a loose check that it is the interval of the mean
    assert 0.2 < iv.high - iv.low < 0.36


def test_bootstrap_ci_is_reproducible_for_a_seed_and_varies_across_seeds() -> None:
    values = [i % 7 / 7 for i in range(120)]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_narrows_as_confidence_drops() -> None:
    values = [float(i % 2) for i in range(80)]
    wide, narrow = bootstrap_ci(values, confidence=0.99), bootstrap_ci(values, confidence=0.5)
    assert wide.low < narrow.low <= narrow.high < wide.high


def test_bootstrap_ci_accepts_bools_and_a_single_item() -> None:
    assert bootstrap_ci([True, False, True, True]).estimate == 0.75
    assert bootstrap_ci([0.4]) == Interval(0.4, 0.4, 0.4)


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([1.0, math.nan], {}, "finite"),
        ([1.0, math.inf], {}, "finite"),
        ([1.0, None], {}, "number"),
        ([1.0, "0.5"], {}, "number"),
        ([1.0], {"confidence": 1.0}, "confidence"),
        ([1.0], {"confidence": 0.0}, "confidence"),
        ([1.0], {"resamples": 0}, "resamples"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(values: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)


def test_bootstrap_ci_coverage_on_simulated_bernoulli_data() -> None:
    """The nominal 95% interval covers the true p = 0.7 in 90-99% of 200 seeded replications.

    1,000 resamples rather than the default 2,000 keeps this test quick; the
    interval's coverage does not depend on it at this precision.
    """
    rng = random.Random(20240601)
    truth, n, replications = 0.7, 100, 200
    covered = 0
    for rep in range(replications):
        sample = [rng.random() < truth for _ in range(n)]
        covered += bootstrap_ci(sample, confidence=0.95, resamples=1000, seed=rep).contains(truth)
    assert 0.90 <= covered / replications <= 0.99


# --------------------------------------------------------------------------- paired_bootstrap_diff


def test_paired_diff_of_an_exact_shift_is_degenerate_at_the_shift() -> None:
    rng = random.Random(7)
    b = [rng.random() for _ in range(150)]
    a = [x + 0.2 for x in b]  # a beats b by exactly 0.2 on every item
    iv = paired_bootstrap_diff(a, b)
    assert iv.estimate == pytest.approx(0.2, abs=1e-12)
    assert iv.low == pytest.approx(0.2, abs=1e-12)
    assert iv.high == pytest.approx(0.2, abs=1e-12)
    assert iv.excludes_zero
    # and reversed, the same shift with the sign flipped
    back = paired_bootstrap_diff(b, a)
    assert (back.estimate, back.low, back.high) == pytest.approx((-0.2, -0.2, -0.2), abs=1e-12)


def test_paired_diff_on_a_noisy_constructed_case() -> None:
    # 200 right/wrong items: A right on 140, B right on 120, so the sample difference is exactly +0.10;
    # they disagree on 60 items (40 only A right, 20 only B right), a clear but noisy effect.
    a = [True] * 100 + [True] * 40 + [False] * 20 + [False] * 40
    b = [True] * 100 + [False] * 40 + [True] * 20 + [False] * 40
    perm = list(range(200))
    random.Random(11).shuffle(perm)  # order must not matter
    a, b = [a[i] for i in perm], [b[i] for i in perm]
    known = (sum(a) - sum(b)) / 200
    assert known == pytest.approx(0.10)

    iv = paired_bootstrap_diff(a, b, seed=2)
    assert iv.estimate == pytest.approx(known)
    assert iv.contains(known)
    assert iv.low < known < iv.high
    # the pairing matters: the paired interval is narrower than treating the samples as independent
    independent = math.sqrt(0.7 * 0.3 / 200 + 0.6 * 0.4 / 200) * 2 * 1.96
    assert iv.high - iv.low < independent


def test_paired_diff_of_identical_strategies_is_zero() -> None:
    values = [float(i % 3 == 0) for i in range(90)]
    assert paired_bootstrap_diff(values, values) == Interval(0.0, 0.0, 0.0)


def test_paired_diff_needs_equal_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_diff([1.0, 0.0], [1.0])


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_matches_the_hand_computed_case() -> None:
    # b01 = 1 (a wrong, b right), b10 = 9; p = 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    a = [False] + [True] * 9 + [True] * 5 + [False] * 3
    b = [True] + [False] * 9 + [True] * 5 + [False] * 3
    result = mcnemar_exact(a, b)
    assert (result.b01, result.b10, result.n) == (1, 9, 10)
    assert result.p_value == 0.021484375
    assert mcnemar_exact(b, a).p_value == 0.021484375  # two-sided: symmetric
    assert (mcnemar_exact(b, a).b01, mcnemar_exact(b, a).b10) == (9, 1)


def test_mcnemar_without_disagreements_has_p_one() -> None:
    assert mcnemar_exact([True, False, True], [True, False, True]).p_value == 1.0


def test_mcnemar_balanced_disagreements_cap_p_at_one() -> None:
    # b01 = b10 = 3: 2 * (1 + 6 + 15 + 20) / 64 > 1, reported as 1
    a = [True] * 3 + [False] * 3
    assert mcnemar_exact(a, [not x for x in a]).p_value == 1.0


def test_mcnemar_accepts_zero_one_and_stays_finite_for_thousands_of_discordant_items() -> None:
    a = [1] * 700 + [0] * 600
    b = [0] * 700 + [1] * 600
    result = mcnemar_exact(a, b)
    assert (result.b01, result.b10) == (600, 700)
    assert 0.0 < result.p_value < 0.01  # 2**1300 overflows a float; the exact computation does not


def test_mcnemar_agrees_with_scipy_when_available() -> None:
    stats = pytest.importorskip("scipy.stats")  # a cross-check only; scipy is not a dependency
    for b01, b10 in [(1, 9), (4, 7), (12, 30), (50, 50), (0, 5)]:
        a = [False] * b01 + [True] * b10
        b = [True] * b01 + [False] * b10
        expected = stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue
        assert mcnemar_exact(a, b).p_value == pytest.approx(expected, rel=1e-9)


def test_mcnemar_rejects_non_binary_and_unequal_input() -> None:
    with pytest.raises(ValueError, match="right/wrong"):
        mcnemar_exact([0.5], [1])  # type: ignore[list-item]  # a score is not right/wrong
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([True], [True, False])


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_on_a_hand_made_set() -> None:
    points = [
        ("cheap", 10.0, 0.50),         # cheapest: on the front
        ("mid", 20.0, 0.70),           # on the front
        ("cheap-worse", 15.0, 0.40),   # dominated by cheap (cheaper and better)
        ("mid-pricier", 30.0, 0.70),   # dominated by mid (same metric, cheaper)
        ("best", 40.0, 0.90),          # most accurate: on the front
        ("mid-twin", 20.0, 0.70),      # identical to mid: neither dominates the other
        ("worst", 50.0, 0.10),         # dominated by everything
    ]
    assert pareto_front(points) == ["cheap", "mid", "mid-twin", "best"]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([("only", 5.0, 0.1)]) == ["only"]
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front([("x", math.nan, 0.1)])


# --------------------------------------------------------------------------- win rate


def test_win_rate_counts_and_half_counts_ties() -> None:
    result = win_rate(["a", "a", "b", "tie", "a", "tie", "b", "a"])
    assert (result.wins, result.losses, result.ties, result.n) == (4, 2, 2, 8)
    assert result.win_rate == 5 / 8
    assert result.tie_rate == 2 / 8
    assert result.interval.estimate == 5 / 8
    assert result.interval.contains(5 / 8)
    assert json.loads(json.dumps(result.to_dict()))["wins"] == 4


def test_win_rate_extremes_and_errors() -> None:
    assert win_rate(["a"] * 5).interval == Interval(1.0, 1.0, 1.0)
    assert win_rate(["tie"] * 4).win_rate == 0.5
    with pytest.raises(ValueError, match="'a', 'b' or 'tie'"):
        win_rate(["a", "A"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        win_rate([])


# --------------------------------------------------------------------------- compare_strategies


def _three() -> dict[str, list[bool]]:
    rng = random.Random(4)
    truth = [rng.random() for _ in range(120)]
    return {
        "zero-shot": [t < 0.55 for t in truth],
        "cot": [t < 0.70 for t in truth],
        "sse-cot": [t < 0.72 or i % 10 == 0 for i, t in enumerate(truth)],
    }


def test_compare_strategies_matches_the_standalone_functions() -> None:
    items = _three()
    c = compare_strategies(items, seed=9, resamples=500)
    assert [s.name for s in c.strategies] == ["zero-shot", "cot", "sse-cot"]
    assert [(p.a, p.b) for p in c.pairs] == [("zero-shot", "cot"), ("zero-shot", "sse-cot"), ("cot", "sse-cot")]
    for name, values in items.items():
        assert c.strategy(name).metric == bootstrap_ci(values, seed=9, resamples=500)
        assert c.strategy(name).binary
    for p in c.pairs:
        assert p.diff == paired_bootstrap_diff(items[p.a], items[p.b], seed=9, resamples=500)
        assert p.mcnemar == mcnemar_exact(items[p.a], items[p.b])
        assert p.disagreements == tuple(i for i, (x, y) in enumerate(zip(items[p.a], items[p.b], strict=True))
                                        if x != y)
        assert p.significant == p.diff.excludes_zero


def test_compare_strategies_detects_a_known_improvement() -> None:
    items = _three()
    c = compare_strategies(items)
    better = c.pair("zero-shot", "cot")
    # cot is right wherever zero-shot is, and on 15-20% more items: a one-sided, significant gain
    assert better.mcnemar is not None and better.mcnemar.b10 == 0
    assert better.diff.high < 0 and better.significant
    assert better.mcnemar.p_value < 0.001


def test_compare_strategies_with_scores_skips_mcnemar() -> None:
    c = compare_strategies({"judge-a": [0.2, 0.9, 0.5], "judge-b": [0.2, 0.7, 1.0]}, resamples=200)
    (pair,) = c.pairs
    assert pair.mcnemar is None
    assert pair.disagreements == (1, 2)
    assert pair.diff.estimate == pytest.approx((0.0 + 0.2 - 0.5) / 3)
    assert not c.strategy("judge-a").binary


def test_compare_strategies_single_strategy_has_no_pairs() -> None:
    c = compare_strategies({"only": [True, False]}, resamples=100)
    assert c.pairs == ()
    assert c.n_items == 2


def test_compare_strategies_to_dict_is_plain_json() -> None:
    c = compare_strategies(_three(), resamples=100)
    data = json.loads(json.dumps(c.to_dict()))
    assert data["n_items"] == 120
    assert data["strategies"][0]["metric"].keys() == {"estimate", "low", "high"}
    assert data["pairs"][0]["mcnemar"].keys() == {"b01", "b10", "n", "p_value"}
    assert isinstance(data["pairs"][0]["disagreements"], list)


def test_compare_strategies_rejects_uneven_or_empty_input() -> None:
    with pytest.raises(ValueError, match="same items"):
        compare_strategies({"a": [True, False], "b": [True]})
    with pytest.raises(ValueError, match="no strategies"):
        compare_strategies({})
    with pytest.raises(ValueError, match="empty"):
        compare_strategies({"a": [], "b": []})
    with pytest.raises(KeyError):
        compare_strategies({"a": [True]}, resamples=10).strategy("b")


# --------------------------------------------------------------------------- one resampling loop


def test_every_interval_comes_from_the_one_resampling_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int]] = []
    real = stats.bootstrap_statistic

    def spy(n: int, statistics: list, *, resamples: int = 2000, seed: int = 0) -> list[list[float]]:
        seen.append((n, len(statistics), resamples))
        return real(n, statistics, resamples=resamples, seed=seed)

    monkeypatch.setattr(stats, "bootstrap_statistic", spy)
    a, b = [1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0]
    bootstrap_ci(a, resamples=50)
    paired_bootstrap_diff(a, b, resamples=60)
    win_rate(["a", "b", "tie"], resamples=70)
    compare_strategies({"a": a, "b": b, "c": a}, resamples=80)
    compare_statistics(6, {"a": lambda idx: 0.0, "b": lambda idx: 1.0}, resamples=90)
    assert seen == [(6, 1, 50), (6, 2, 60), (3, 1, 70), (6, 3, 80), (6, 2, 90)]


def test_compare_statistics_with_the_mean_reproduces_compare_strategies() -> None:
    """A statistic over resampled indices pairs exactly like per-item values: the same draws, the same numbers."""
    rng = random.Random(3)
    columns = {name: [float(rng.random() < p) for _ in range(40)] for name, p in (("a", 0.8), ("b", 0.5), ("c", 0.6))}

    def mean_of(column: list[float]) -> Callable[[list[int]], float]:
        return lambda idx: sum(column[i] for i in idx) / len(idx)

    by_values = compare_strategies(columns, resamples=400, seed=9)
    names = list(columns)
    by_statistic = compare_statistics(
        40, {name: mean_of(col) for name, col in columns.items()}, resamples=400, seed=9,
        disagreements=lambda i, j: [k for k in range(40) if columns[names[i]][k] != columns[names[j]][k]])
    for x, y in zip(by_values.strategies, by_statistic.strategies, strict=True):
        assert (x.name, x.n) == (y.name, y.n) and not y.binary
        assert (y.metric.estimate, y.metric.low, y.metric.high) == pytest.approx(
            (x.metric.estimate, x.metric.low, x.metric.high), abs=1e-12)
    for x, y in zip(by_values.pairs, by_statistic.pairs, strict=True):
        assert (x.a, x.b, x.disagreements) == (y.a, y.b, y.disagreements) and y.mcnemar is None
        assert (y.diff.estimate, y.diff.low, y.diff.high) == pytest.approx(
            (x.diff.estimate, x.diff.low, x.diff.high), abs=1e-12)
        assert 0 < y.p_value <= 1 and y.p_holm >= y.p_value
    assert by_values.pair("a", "b").diff.low > 0  # a clear difference, so the comparison is not vacuous
    assert compare_statistics(40, {"a": mean_of(columns["a"])}, resamples=10).pairs == ()


def test_bootstrap_statistic_rejects_no_items() -> None:
    with pytest.raises(ValueError, match="no items"):
        bootstrap_statistic(0, [lambda idx: 0.0])
