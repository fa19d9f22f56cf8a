"""How every report format writes a number: the same digits in the terminal, Markdown and HTML."""

from __future__ import annotations

import math

from retort.stats import Interval, PairResult


def num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def ci(iv: Interval, *, signed: bool = False) -> str:
    f = _signed_number if signed else num
    return f"[{f(iv.low)}, {f(iv.high)}]"


_signed_number = signed  # for ci(), whose keyword argument hides the name


def pval(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def grouped(n: int) -> str:
    return f"{n:,}"


def usd(x: float | None) -> str:
    if x is None:
        return "\u2014"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def seconds(x: float) -> str:
    return f"{x:,.1f} s"


def compact(n: float) -> str:
    """12,345 -> 12.3k; for axis ticks where space is short."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def digits(step: float) -> int:
    """Decimals a tick label needs so that ticks `step` apart read differently (0.25 needs two)."""
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 2
    while digits < 6 and not math.isclose(step * 10**digits, round(step * 10**digits)):
        digits += 1
    return digits


def disagreement_text(p: PairResult, limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in p.disagreements[:limit])
    more = len(p.disagreements) - limit
    return f"{shown}, \u2026 {more} more" if more > 0 else shown

