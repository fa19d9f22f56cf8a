"""Render a strategy comparison as Markdown, JSON, a terminal table or one HTML file.

    to_markdown(comparison, costs, spec=...)      -> str, for a README or a PR comment
    to_json(comparison, costs, spec=...)          -> str, for machines
    render_terminal(comparison, costs, spec=...)  -> prints rich tables
    to_html(comparison, costs, spec=...)          -> str, one self-contained page

`costs` are one `CostRow` (or a mapping with the same keys) per strategy: calls,
tokens, wall time and dollars, which the statistics do not know about.

The HTML page must open offline and never reach another host: CSS is inline,
the charts are SVG drawn here in Python, there is no script, and a
Content-Security-Policy of `default-src 'none'` makes the browser refuse any
request a future edit might add by mistake. Every user string (strategy names,
spec, title) goes through `html.escape`. Charts and marks carry stable ids and
classes (`#chart-metric .bar`, `#chart-pareto .point`, `#chart-diffs .diff`)
for browser tests.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from retort.stats import Comparison, Interval, PairResult, StrategyResult, pareto_front

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["CostRow", "render_terminal", "to_html", "to_json", "to_markdown"]


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
class _Report:
    """Everything a renderer needs, normalised once."""

    comparison: Comparison
    costs: dict[str, CostRow]  # by strategy name; strategies without a row are absent
    title: str
    spec: str | None
    generated: str
    metric_name: str
    front: tuple[str, ...]  # Pareto front over (total tokens, metric), cheapest first
    missing: dict[str, int] = field(default_factory=dict)  # items without a prediction, by strategy

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "spec": self.spec, "generated": self.generated,
                "metric": self.metric_name, "verdict": verdict(self), "significance": rule(self.comparison),
                "missing": self.missing, "comparison": self.comparison.to_dict(),
                "costs": [self.costs[s.name].to_dict() for s in self.comparison.strategies
                          if s.name in self.costs],
                "pareto_front": list(self.front)}


def _prepare(comparison: Comparison, costs: Sequence[CostRowLike], *, title: str, spec: str | None,
             generated: datetime | str | None, metric_name: str,
             missing: Mapping[str, int] | None = None) -> _Report:
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
    return _Report(comparison, rows, title, spec, stamp, metric_name, tuple(pareto_front(points)),
                   {name: int(k) for name, k in (missing or {}).items() if k})


# --------------------------------------------------------------------------- number formats


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def _ci(iv: Interval, *, signed: bool = False) -> str:
    f = _signed if signed else _num
    return f"[{f(iv.low)}, {f(iv.high)}]"


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _int(n: int) -> str:
    return f"{n:,}"


def _usd(x: float | None) -> str:
    if x is None:
        return "\u2014"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _seconds(x: float) -> str:
    return f"{x:,.1f} s"


def _compact(n: float) -> str:
    """12,345 -> 12.3k; for axis ticks where space is short."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def _digits(step: float) -> int:
    """Decimals a tick label needs so that ticks `step` apart read differently (0.25 needs two)."""
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 2
    while digits < 6 and not math.isclose(step * 10**digits, round(step * 10**digits)):
        digits += 1
    return digits


def _disagreement_text(p: PairResult, limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in p.disagreements[:limit])
    more = len(p.disagreements) - limit
    return f"{shown}, \u2026 {more} more" if more > 0 else shown


def rule(c: Comparison) -> str:
    """The one stated rule for "significant", as every report prints it."""
    return (f"A pair is significant when its p-value, adjusted for the {len(c.pairs)} pairs by Holm's method, is "
            f"below {1 - c.confidence:.2g}; p is McNemar's exact test when both strategies score right/wrong, "
            "otherwise a paired bootstrap.")


def _best(r: _Report) -> StrategyResult | None:
    """The best strategy among those with a prediction for at least one item."""
    n = r.comparison.n_items
    usable = [s for s in r.comparison.strategies if r.missing.get(s.name, 0) < n]
    return max(usable, key=lambda s: s.metric.estimate) if usable else None


def verdict(r: _Report) -> list[str]:
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
    best = _best(r)
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
                         f"correction (p = {_p(p.p_holm)})")
        else:
            lines.append(f"{best.name} vs {other}: {'+' if sign * p.diff.estimate >= 0 else '-'}"
                         f"{amount(p.diff.estimate)} {shown}, not significant after Holm correction "
                         f"(p = {_p(p.p_holm)})")
    if not c.pairs:
        lines.append(f"{best.name}: {_num(best.metric.estimate)} {_ci(best.metric)} ({r.metric_name})")
    return lines


def _verdict_html(r: _Report) -> str:
    items = "".join(f'<li class="{"warn" if line.startswith("warning") else ""}">{_e(line)}</li>'
                    for line in verdict(r))
    return (f'<section id="verdict"><h2>Verdict</h2><ul>{items}</ul>'
            f'<p class="sub">{_e(rule(r.comparison))}</p></section>')


# --------------------------------------------------------------------------- Markdown and JSON


def to_markdown(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
                title: str = "Strategy comparison", generated: datetime | str | None = None,
                metric_name: str = "accuracy", missing: Mapping[str, int] | None = None) -> str:
    r = _prepare(comparison, costs, title=title, spec=spec, generated=generated, metric_name=metric_name,
                 missing=missing)
    c = r.comparison
    level = f"{c.confidence:.0%}"

    def cell(s: str) -> str:
        return html.escape(s, quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    out = [f"# {cell(r.title)}", ""]
    meta = [f"spec `{cell(r.spec)}`"] if r.spec else []
    meta += [r.generated, f"{c.n_items:,} items",
             f"{level} percentile bootstrap CI, {c.resamples:,} resamples, seed {c.seed}"]
    out += [" \u00b7 ".join(meta), "", "## Verdict", ""]
    out += [f"- {cell(line)}" for line in verdict(r)] + [""]

    out += ["| strategy | " + cell(r.metric_name) + f" | {level} CI | calls | prompt tokens "
            "| completion tokens | wall | cost | Pareto |",
            "|---|--:|---|--:|--:|--:|--:|--:|:-:|"]
    for s in c.strategies:
        row = r.costs.get(s.name)
        money = ([_int(row.calls), _int(row.prompt_tokens), _int(row.completion_tokens),
                  _seconds(row.wall_seconds), _usd(row.cost_usd)] if row else ["\u2014"] * 5)
        front = "\u2605" if s.name in r.front else ""
        out.append("| " + " | ".join([cell(s.name), _num(s.metric.estimate), _ci(s.metric), *money, front]) + " |")

    if c.pairs:
        out += ["", f"## Paired differences ({cell(r.metric_name)}, A \u2212 B)", "",
                f"| A | B | difference | {level} CI | significant | McNemar b01 / b10 | p | p (Holm) | disagreements |",
                "|---|---|--:|---|:-:|--:|--:|--:|--:|"]
        for p in c.pairs:
            mc = f"{p.mcnemar.b01} / {p.mcnemar.b10}" if p.mcnemar else "\u2014"
            out.append("| " + " | ".join([cell(p.a), cell(p.b), _signed(p.diff.estimate), _ci(p.diff, signed=True),
                                          "yes" if p.significant else "no", mc, _p(p.p_value), _p(p.p_holm),
                                          _int(len(p.disagreements))]) + " |")
    out += ["", "b01: items A got wrong and B got right; b10: the reverse. " + rule(c), ""]
    return "\n".join(out)


def to_json(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
            title: str = "Strategy comparison", generated: datetime | str | None = None,
            metric_name: str = "accuracy", indent: int | None = 2, missing: Mapping[str, int] | None = None) -> str:
    r = _prepare(comparison, costs, title=title, spec=spec, generated=generated, metric_name=metric_name,
                 missing=missing)
    return json.dumps(r.to_dict(), indent=indent, ensure_ascii=False)


# --------------------------------------------------------------------------- terminal


def render_terminal(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
                    title: str = "Strategy comparison", generated: datetime | str | None = None,
                    metric_name: str = "accuracy", console: Console | None = None,
                    missing: Mapping[str, int] | None = None) -> None:
    # imported here so that writing HTML or JSON does not pay for rich's import
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    r = _prepare(comparison, costs, title=title, spec=spec, generated=generated, metric_name=metric_name,
                 missing=missing)
    c = r.comparison
    console = console or Console()
    for line in verdict(r):
        console.print(("[bold yellow]" if line.startswith("warning") else "[bold]") + escape(line) + "[/]")
    level = f"{c.confidence:.0%}"
    caption = f"{c.n_items:,} items \u00b7 {level} bootstrap CI \u00b7 {c.resamples:,} resamples \u00b7 seed {c.seed}"
    heading = f"{r.title} \u2014 {r.spec}" if r.spec else r.title

    wide = console.width >= 110  # a narrow terminal keeps the names readable and drops detail columns
    name_w = min(18, max(len(s.name) for s in c.strategies))

    table = Table(title=escape(heading), caption=escape(caption), title_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("strategy", style="bold", overflow="fold", min_width=name_w)
    table.add_column(escape(r.metric_name), justify="right", no_wrap=True)
    table.add_column(f"{level} CI", justify="right", no_wrap=True)
    for name in (("calls", "tokens in/out", "wall", "cost") if wide else ("tokens", "cost")):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("front", justify="center", no_wrap=True, min_width=5)
    top = _best(r)
    best = top.metric.estimate if top else None
    for s in c.strategies:
        row = r.costs.get(s.name)
        if row is None:
            money = ["\u2014"] * (4 if wide else 2)
        elif wide:
            money = [_int(row.calls), f"{_compact(row.prompt_tokens)} / {_compact(row.completion_tokens)}",
                     _seconds(row.wall_seconds), _usd(row.cost_usd)]
        else:
            money = [_compact(row.total_tokens), _usd(row.cost_usd)]
        metric = _num(s.metric.estimate)
        table.add_row(escape(s.name), f"[green]{metric}[/]" if s.metric.estimate == best else metric,
                      _ci(s.metric), *money, "\u2605" if s.name in r.front else "")
    console.print(table)

    if not c.pairs:
        return
    pairs = Table(title=f"Paired differences (A \u2212 B, {escape(r.metric_name)})", title_style="bold",
                  box=box.SIMPLE_HEAD)
    pairs.add_column("A", overflow="fold", min_width=min(name_w, 12))
    pairs.add_column("B", overflow="fold", min_width=min(name_w, 12))
    for name in ("A \u2212 B", f"{level} CI", "sig.", *(["b01/b10"] if wide else []), "p (Holm)",
                 *(["disagree"] if wide else [])):
        pairs.add_column(name, justify="center" if name == "sig." else "right", no_wrap=True)
    for p in c.pairs:
        diff = _signed(p.diff.estimate)
        b01_b10 = f"{p.mcnemar.b01}/{p.mcnemar.b10}" if p.mcnemar else "\u2014"
        p_value = _p(p.p_holm)
        cells = [escape(p.a), escape(p.b), f"[bold]{diff}[/]" if p.significant else diff,
                 _ci(p.diff, signed=True), "[green]yes[/]" if p.significant else "[dim]no[/]"]
        cells += [b01_b10, p_value, _int(len(p.disagreements))] if wide else [p_value]
        pairs.add_row(*cells)
    console.print(pairs)


# --------------------------------------------------------------------------- SVG building blocks

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
            "#edc948", "#ff9da7", "#9c755f", "#8c8c8c")
_CHART_W = 880
_CHAR_W = 6.9  # average glyph width of the 12.5px system sans, for layout estimates


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _f(x: float) -> str:
    """Coordinates with two decimals, trailing zeros dropped, to keep the SVG small."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _clip(label: str, width_px: float) -> str:
    room = max(4, int(width_px / _CHAR_W))
    return label if len(label) <= room else label[: room - 1] + "\u2026"


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    count = round((end - start) / step)
    return [round(start + i * step, 12) for i in range(count + 1)]


@dataclass(frozen=True, slots=True)
class _Scale:
    lo: float
    hi: float
    px0: float
    px1: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            v, lo, hi = math.log10(max(v, 1e-12)), math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        return self.px0 + (v - lo) / (hi - lo) * (self.px1 - self.px0)


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = [10.0**k for k in range(a, b + 1)]
    if b - a > 2:
        return decades
    ticks = [d * m for d in decades[:-1] for m in (1, 2, 5)] + [decades[-1]]
    # trim to the data, keeping one tick on each side
    first = max(i for i, t in enumerate(ticks) if t <= lo)
    last = min(i for i, t in enumerate(ticks) if t >= hi)
    return ticks[first:last + 1]


def _svg_open(chart_id: str, height: float, label: str) -> str:
    return (f'<svg id="{chart_id}" class="chart" viewBox="0 0 {_CHART_W} {_f(height)}" '
            f'width="100%" role="img" aria-labelledby="{chart_id}-title">'
            f'<title id="{chart_id}-title">{_e(label)}</title>')


def _x_axis(scale: _Scale, ticks: Sequence[float], top: float, bottom: float, fmt: Any, label: str) -> list[str]:
    out = [(f'<g class="axis x-axis"><line class="domain" x1="{_f(scale.px0)}" x2="{_f(scale.px1)}" '
           f'y1="{_f(bottom)}" y2="{_f(bottom)}"/>')]
    for t in ticks:
        x = _f(scale(t))
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{_f(top)}" y2="{_f(bottom)}"/>'
                   f'<line class="tick" x1="{x}" x2="{x}" y1="{_f(bottom)}" y2="{_f(bottom + 5)}"/>'
                   f'<text class="tick-label" x="{x}" y="{_f(bottom + 18)}" text-anchor="middle">{_e(fmt(t))}</text>')
    mid = (scale.px0 + scale.px1) / 2
    out.append(f'<text class="axis-label" x="{_f(mid)}" y="{_f(bottom + 38)}" text-anchor="middle">'
               f"{_e(label)}</text></g>")
    return out


def _y_axis(scale: _Scale, ticks: Sequence[float], left: float, right: float, fmt: Any, label: str) -> list[str]:
    out = [(f'<g class="axis y-axis"><line class="domain" x1="{_f(left)}" x2="{_f(left)}" '
           f'y1="{_f(scale.px0)}" y2="{_f(scale.px1)}"/>')]
    for t in ticks:
        y = _f(scale(t))
        out.append(f'<line class="grid" x1="{_f(left)}" x2="{_f(right)}" y1="{y}" y2="{y}"/>'
                   f'<line class="tick" x1="{_f(left - 5)}" x2="{_f(left)}" y1="{y}" y2="{y}"/>'
                   f'<text class="tick-label" x="{_f(left - 8)}" y="{y}" dy="0.32em" text-anchor="end">'
                   f"{_e(fmt(t))}</text>")
    mid = (scale.px0 + scale.px1) / 2
    out.append(f'<text class="axis-label" transform="translate({_f(left - 48)} {_f(mid)}) rotate(-90)" '
               f'text-anchor="middle">{_e(label)}</text></g>')
    return out


def _color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _unit_domain(values: Sequence[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in values)


# --------------------------------------------------------------------------- the three charts


def _chart_metric(r: _Report) -> str:
    """Horizontal bars from zero, one per strategy, with the CI as a whisker."""
    strategies = r.comparison.strategies
    values = [v for s in strategies for v in (s.metric.low, s.metric.high, s.metric.estimate)]
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0] if _unit_domain(values) else _nice_ticks(min(0.0, *values), max(0.0, *values))
    step = ticks[1] - ticks[0]
    label_w = min(240.0, max(90.0, max(len(s.name) for s in strategies) * _CHAR_W + 20))
    left, right, top, row_h = label_w, _CHART_W - 70, 12.0, 34.0
    bottom = top + row_h * len(strategies) + 6
    x = _Scale(ticks[0], ticks[-1], left, right)
    alt = f"{r.metric_name} by strategy with {r.comparison.confidence:.0%} confidence intervals"
    out = [_svg_open("chart-metric", bottom + 48, alt)]
    out += _x_axis(x, ticks, top, bottom, lambda t: _num(t, _digits(step)), r.metric_name)
    zero = x(0.0)
    for i, s in enumerate(strategies):
        cy = top + row_h * i + row_h / 2 + 3
        est, lo, hi = x(s.metric.estimate), x(s.metric.low), x(s.metric.high)
        tip = f"{s.name}: {_num(s.metric.estimate)} {_ci(s.metric)}, n={s.n}"
        out.append(
            f'<g class="strategy" data-strategy="{_e(s.name)}">'
            f'<text class="row-label" x="{_f(left - 10)}" y="{_f(cy)}" dy="0.32em" text-anchor="end">'
            f"{_e(_clip(s.name, label_w - 20))}</text>"
            f'<rect class="bar" x="{_f(min(zero, est))}" y="{_f(cy - 10)}" width="{_f(abs(est - zero))}" '
            f'height="20" rx="2" fill="{_color(i)}" data-value="{s.metric.estimate!r}"><title>{_e(tip)}</title></rect>'
            f'<g class="ci"><line x1="{_f(lo)}" x2="{_f(hi)}" y1="{_f(cy)}" y2="{_f(cy)}"/>'
            f'<line x1="{_f(lo)}" x2="{_f(lo)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<line x1="{_f(hi)}" x2="{_f(hi)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/></g>'
            f'<text class="value-label" x="{_f(max(hi, est) + 8)}" y="{_f(cy)}" dy="0.32em">'
            f"{_num(s.metric.estimate)}</text></g>")
    out.append("</svg>")
    return "".join(out)


def _chart_pareto(r: _Report) -> str:
    """Metric against total tokens; the Pareto front joined by a line, every point labelled."""
    c = r.comparison
    pts = [(i, s, r.costs[s.name]) for i, s in enumerate(c.strategies) if s.name in r.costs]
    left, right, top, bottom = 72.0, _CHART_W - 24.0, 16.0, 330.0
    out = [_svg_open("chart-pareto", bottom + 50, f"{r.metric_name} against tokens; Pareto front highlighted")]
    if not pts:
        out.append(f'<text class="empty" x="{_CHART_W / 2}" y="{(top + bottom) / 2}" text-anchor="middle">'
                   "No cost rows: nothing to plot.</text></svg>")
        return "".join(out)

    tokens = [float(row.total_tokens) for *_, row in pts]
    t_lo, t_hi = min(tokens), max(tokens)
    log = t_lo > 0 and t_hi / t_lo >= 30
    if log:
        xt = _log_ticks(t_lo, t_hi)
    else:
        pad = (t_hi - t_lo) * 0.08 or t_hi * 0.1 or 1.0
        xt = _nice_ticks(max(0.0, t_lo - pad), t_hi + pad)
    x = _Scale(xt[0], xt[-1], left, right, log=log)

    ys = [v for _, s, _ in pts for v in (s.metric.low, s.metric.high)]
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or 0.05
    yt = _nice_ticks(y_lo - pad, y_hi + pad)
    if _unit_domain(ys):
        yt = [t for t in yt if -1e-9 <= t <= 1 + 1e-9] or [0.0, 1.0]
        if len(yt) < 2:
            yt = [0.0, 1.0]
    y = _Scale(yt[0], yt[-1], bottom, top)
    step = yt[1] - yt[0]
    out += _x_axis(x, xt, top, bottom, _compact, "total tokens (prompt + completion)" + (", log scale" if log else ""))
    out += _y_axis(y, yt, left, right, lambda t: _num(t, _digits(step)), r.metric_name)

    front = [p for name in r.front for p in pts if p[1].name == name]
    if len(front) > 1:
        coords = " ".join(f"{_f(x(row.total_tokens))},{_f(y(s.metric.estimate))}" for _, s, row in front)
        out.append(f'<polyline class="front-line" points="{coords}"/>')

    placed: list[tuple[float, float, float, float]] = []
    labels: list[str] = []
    for i, s, row in pts:
        px, py = x(row.total_tokens), y(s.metric.estimate)
        on_front = s.name in r.front
        tip = (f"{s.name}: {r.metric_name} {_num(s.metric.estimate)} {_ci(s.metric)}, "
               f"{_int(row.total_tokens)} tokens, cost {_usd(row.cost_usd)}"
               + (" \u2014 on the Pareto front" if on_front else ""))
        out.append(
            f'<g class="point-group" data-strategy="{_e(s.name)}">'
            f'<line class="ci" x1="{_f(px)}" x2="{_f(px)}" y1="{_f(y(s.metric.low))}" y2="{_f(y(s.metric.high))}"/>'
            f'<circle class="point{" front" if on_front else ""}" cx="{_f(px)}" cy="{_f(py)}" '
            f'r="{7 if on_front else 5.5}" fill="{_color(i)}" data-tokens="{row.total_tokens}" '
            f'data-value="{s.metric.estimate!r}"><title>{_e(tip)}</title></circle></g>')
        labels.append(_place_label(s.name, px, py, left, right, top, bottom, placed, on_front))
    out += labels
    out.append("</svg>")
    return "".join(out)


def _place_label(name: str, px: float, py: float, left: float, right: float, top: float, bottom: float,
                 placed: list[tuple[float, float, float, float]], bold: bool) -> str:
    """Put a point's label beside it, nudged down or up until it overlaps no earlier label."""
    text = _clip(name, 200)
    w, h = len(text) * _CHAR_W + 4, 14.0
    anchor_end = px + 10 + w > right
    x0 = px - 10 - w if anchor_end else px + 10
    offsets = [0.0] + [d * k for k in range(1, 8) for d in (h, -h)]
    for dy in offsets:
        y0 = min(max(py - h / 2 + dy, top), bottom - h)
        box = (x0, y0, x0 + w, y0 + h)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            break
    placed.append(box)
    tx = px - 10 if anchor_end else px + 10
    cls = "point-label front" if bold else "point-label"
    return (f'<text class="{cls}" x="{_f(tx)}" y="{_f(box[1] + h / 2)}" dy="0.32em" '
            f'text-anchor="{"end" if anchor_end else "start"}">{_e(text)}</text>')


def _chart_diffs(r: _Report) -> str:
    """A forest plot of every pair's paired difference around a zero line."""
    c = r.comparison
    top, row_h = 12.0, 34.0
    if not c.pairs:
        out = [_svg_open("chart-diffs", 70, "paired differences"),
               (f'<text class="empty" x="{_CHART_W / 2}" y="40" text-anchor="middle">'
               "One strategy only: no pairs to compare.</text></svg>")]
        return "".join(out)
    labels = [f"{p.a} \u2212 {p.b}" for p in c.pairs]
    label_w = min(300.0, max(110.0, max(map(len, labels)) * _CHAR_W + 20))
    left, right = label_w, _CHART_W - 250.0
    bottom = top + row_h * len(c.pairs) + 6
    values = [v for p in c.pairs for v in (p.diff.low, p.diff.high, p.diff.estimate)] + [0.0]
    span = max(values) - min(values)
    ticks = _nice_ticks(min(values) - span * 0.05, max(values) + span * 0.05)
    step = ticks[1] - ticks[0]
    x = _Scale(ticks[0], ticks[-1], left, right)
    out = [_svg_open("chart-diffs", bottom + 48, f"paired differences in {r.metric_name} with confidence intervals")]
    # zebra bands first, so the grid and the marks draw over them
    out += [f'<rect class="row-band" x="0" y="{_f(top + row_h * k + 3)}" width="{_CHART_W}" height="{_f(row_h)}"/>'
            for k in range(0, len(c.pairs), 2)]
    out += _x_axis(x, ticks, top, bottom, lambda t: _signed(t, _digits(step)) if t else "0",
                   f"difference in {r.metric_name} (A \u2212 B)")
    zx = _f(x(0.0))
    out.append(f'<line class="zero" x1="{zx}" x2="{zx}" y1="{_f(top - 4)}" y2="{_f(bottom)}"/>')
    for k, (p, label) in enumerate(zip(c.pairs, labels, strict=True)):
        cy = top + row_h * k + row_h / 2 + 3
        est, lo, hi = x(p.diff.estimate), x(p.diff.low), x(p.diff.high)
        state = "significant" if p.significant else "ns"
        mc = f", McNemar p={_p(p.mcnemar.p_value)}" if p.mcnemar else ""
        tip = f"{label}: {_signed(p.diff.estimate)} {_ci(p.diff, signed=True)}{mc}"
        note = f"{_signed(p.diff.estimate)} {_ci(p.diff, signed=True)}"
        verdict = (f"{p.a if p.diff.estimate > 0 else p.b} better" if p.significant else "not significant")
        out.append(
            f'<g class="diff {state}" data-a="{_e(p.a)}" data-b="{_e(p.b)}" data-value="{p.diff.estimate!r}">'
            f"<title>{_e(tip)}</title>"
            f'<text class="row-label" x="{_f(left - 10)}" y="{_f(cy)}" dy="0.32em" text-anchor="end">'
            f"{_e(_clip(label, label_w - 20))}</text>"
            f'<line class="diff-ci" x1="{_f(lo)}" x2="{_f(hi)}" y1="{_f(cy)}" y2="{_f(cy)}"/>'
            f'<line class="diff-ci" x1="{_f(lo)}" x2="{_f(lo)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<line class="diff-ci" x1="{_f(hi)}" x2="{_f(hi)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<rect class="diff-mark" x="{_f(est - 6)}" y="{_f(cy - 6)}" width="12" height="12" '
            f'transform="rotate(45 {_f(est)} {_f(cy)})"/>'
            f'<text class="diff-note" x="{_f(right + 16)}" y="{_f(cy - 6)}" dy="0.32em">{_e(note)}</text>'
            f'<text class="diff-verdict" x="{_f(right + 16)}" y="{_f(cy + 8)}" dy="0.32em">'
            f"{_e(_clip(verdict, 230))}</text></g>")
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- the page

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--faint:#8b949e;--bg:#ffffff;--panel:#f6f8fa;--line:#d1d9e0;
--grid:#eaeef2;--accent:#0969da;--good:#1a7f37;--band:#f6f8fa}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--faint:#6e7681;--bg:#0d1117;
--panel:#151b23;--line:#3d444d;--grid:#21262d;--accent:#4493f8;--good:#3fb950;--band:#151b23}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue","Noto Sans","Liberation Sans",Arial,sans-serif;font-feature-settings:"tnum"}
main{max-width:960px;margin:0 auto;padding:40px 24px 56px}
header{border-bottom:1px solid var(--line);padding-bottom:16px;margin-bottom:24px}
h1{font-size:28px;line-height:1.25;margin:0 0 6px;font-weight:650;letter-spacing:-0.01em}
h2{font-size:18px;margin:0 0 4px;font-weight:620}
.meta{color:var(--muted);margin:0;font-size:14px}
.meta span+span::before{content:"\\00b7";margin:0 8px;color:var(--faint)}
code{font:13px/1.4 ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Liberation Mono",monospace;
background:var(--panel);border:1px solid var(--line);border-radius:4px;padding:1px 5px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:0 0 28px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:20px;font-weight:600;margin-top:2px;overflow-wrap:anywhere}
.card .s{color:var(--muted);font-size:13px}
section{margin:0 0 36px}
.sub{color:var(--muted);margin:0 0 10px;font-size:14px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:12px 8px 4px;background:var(--bg)}
svg.chart{display:block;height:auto;font-size:12.5px;overflow:visible}
svg text{fill:var(--fg)}
.grid{stroke:var(--grid);stroke-width:1}
.domain,.tick{stroke:var(--faint);stroke-width:1}
.tick-label{fill:var(--muted);font-size:11.5px}
.axis-label{fill:var(--muted);font-size:12px}
.row-label{font-size:13px}
.value-label{font-weight:600}
.ci line,line.ci{stroke:var(--fg);stroke-width:1.5;stroke-linecap:round}
.bar{opacity:.9}
.bar:hover,.point:hover{opacity:1;stroke:var(--fg);stroke-width:1.5}
.point{stroke:var(--bg);stroke-width:1.5}
.point.front{stroke:var(--fg);stroke-width:2}
g.point-group line.ci{stroke-width:2;opacity:.45}
.front-line{fill:none;stroke:var(--fg);stroke-width:1.5;stroke-dasharray:5 4;opacity:.6}
.point-label{font-size:12.5px;fill:var(--muted);paint-order:stroke;stroke:var(--bg);stroke-width:3px;stroke-linejoin:round}
.point-label.front{fill:var(--fg);font-weight:600}
.zero{stroke:var(--fg);stroke-width:1.5;stroke-dasharray:4 3}
.row-band{fill:var(--band)}
.diff-ci{stroke:var(--faint);stroke-width:2;stroke-linecap:round}
.diff-mark{fill:var(--bg);stroke:var(--faint);stroke-width:2}
.diff.significant .diff-ci{stroke:var(--accent)}
.diff.significant .diff-mark{fill:var(--accent);stroke:var(--accent)}
.diff-note{font-size:12.5px;font-weight:600}
.diff-verdict{font-size:11.5px;fill:var(--muted)}
.diff.significant .diff-verdict{fill:var(--accent);font-weight:600}
.empty{fill:var(--muted)}
figcaption{color:var(--muted);font-size:13px;padding:6px 8px 8px;border-top:1px solid var(--grid);margin-top:6px}
.legend{display:inline-flex;gap:14px;flex-wrap:wrap}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.table-wrap{overflow-x:auto;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{padding:7px 10px;border-bottom:1px solid var(--grid);text-align:left;vertical-align:top;white-space:nowrap}
th{white-space:normal;vertical-align:bottom}
th{background:var(--panel);font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
tr:last-child td{border-bottom:0}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-weight:600;white-space:normal;overflow-wrap:anywhere;min-width:120px;max-width:260px}
.yes{color:var(--good);font-weight:600}
.no{color:var(--faint)}
.star{color:var(--accent)}
#verdict li.warn{color:#b45309;font-weight:600}
details summary{cursor:pointer;color:var(--accent)}
details div{white-space:normal;max-width:280px;color:var(--muted);font-size:12.5px;margin-top:4px}
footer{color:var(--faint);font-size:12.5px;border-top:1px solid var(--line);padding-top:12px}
@media print{main{padding:0}figure,.table-wrap{break-inside:avoid}}
"""


def _cards(r: _Report) -> str:
    c = r.comparison
    best = _best(r)
    sig = sum(p.significant for p in c.pairs)
    cheapest = r.front[0] if r.front else None
    cards = [("best " + r.metric_name, best.name if best else "none",
              f"{_num(best.metric.estimate)} {_ci(best.metric)}" if best else "no strategy has predictions"),
             ("significant pairs", f"{sig} of {len(c.pairs)}", f"Holm-adjusted p < {1 - c.confidence:.2g}")]
    if cheapest is not None:
        row = r.costs[cheapest]
        cards.append(("cheapest on the front", cheapest,
                      f"{_int(row.total_tokens)} tokens \u00b7 {_usd(row.cost_usd)}"))
    cards.append(("items", _int(c.n_items), f"{len(c.strategies)} strategies \u00b7 seed {c.seed}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div></div>'
        for k, v, s in cards) + "</div>"


def _legend(r: _Report) -> str:
    return '<span class="legend">' + "".join(
        f'<span><i class="swatch" style="background:{_color(i)}"></i>{_e(s.name)}</span>'
        for i, s in enumerate(r.comparison.strategies)) + "</span>"


def _tables(r: _Report) -> str:
    c = r.comparison
    level = f"{c.confidence:.0%}"
    head = ("<tr><th>strategy</th>" f'<th class="n">{_e(r.metric_name)}</th><th class="n">{level} CI</th>'
            '<th class="n">calls</th><th class="n">prompt tokens</th>'
            '<th class="n">completion tokens</th><th class="n">wall</th><th class="n">cost</th><th>Pareto</th></tr>')
    rows = []
    for s in c.strategies:
        row = r.costs.get(s.name)
        money = ([_int(row.calls), _int(row.prompt_tokens), _int(row.completion_tokens),
                  _seconds(row.wall_seconds), _usd(row.cost_usd)] if row else ["\u2014"] * 5)
        front = '<span class="star" title="on the Pareto front">\u2605</span>' if s.name in r.front else ""
        rows.append(f'<tr><td class="name">{_e(s.name)}</td><td class="n">{_num(s.metric.estimate)}</td>'
                    f'<td class="n">{_ci(s.metric)}</td>'
                    + "".join(f'<td class="n">{_e(m)}</td>' for m in money) + f"<td>{front}</td></tr>")
    out = [f'<section id="numbers"><h2>Numbers</h2><p class="sub">Per strategy, over {_int(c.n_items)} items.</p>',
           f'<div class="table-wrap"><table id="table-strategies"><thead>{head}</thead>'
           f'<tbody>{"".join(rows)}</tbody></table></div>']
    if c.pairs:
        head = ('<tr><th>A</th><th>B</th><th class="n">A \u2212 B</th>'
                f'<th class="n">{level} CI</th><th>significant</th><th class="n">b01 / b10</th>'
                '<th class="n">McNemar p</th><th>disagreements</th></tr>')
        rows = []
        for p in c.pairs:
            mc = ([f"{p.mcnemar.b01} / {p.mcnemar.b10}", _p(p.mcnemar.p_value)] if p.mcnemar
                  else ["\u2014", "\u2014"])
            sig = '<span class="yes">yes</span>' if p.significant else '<span class="no">no</span>'
            dis = (f"<details><summary>{_int(len(p.disagreements))} items</summary>"
                   f"<div>{_e(_disagreement_text(p, 200))}</div></details>" if p.disagreements else "0")
            rows.append(f'<tr><td class="name">{_e(p.a)}</td><td class="name">{_e(p.b)}</td>'
                        f'<td class="n">{_signed(p.diff.estimate)}</td><td class="n">{_ci(p.diff, signed=True)}</td>'
                        f'<td>{sig}</td><td class="n">{mc[0]}</td><td class="n">{mc[1]}</td><td>{dis}</td></tr>')
        out.append('<p class="sub" style="margin-top:18px">Paired differences. b01: items A got wrong and B got '
                   "right; b10: the reverse. Disagreements list item indices.</p>"
                   f'<div class="table-wrap"><table id="table-pairs"><thead>{head}</thead>'
                   f'<tbody>{"".join(rows)}</tbody></table></div>')
    out.append("</section>")
    return "".join(out)


def to_html(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
            title: str = "Strategy comparison", generated: datetime | str | None = None,
            metric_name: str = "accuracy", missing: Mapping[str, int] | None = None) -> str:
    """One self-contained HTML page: inline CSS, inline SVG, no script, no request to any host."""
    r = _prepare(comparison, costs, title=title, spec=spec, generated=generated, metric_name=metric_name,
                 missing=missing)
    c = r.comparison
    level = f"{c.confidence:.0%}"
    method = f"{level} percentile bootstrap intervals over items ({_int(c.resamples)} resamples, seed {c.seed})"
    meta = ([f"<span>spec <code>{_e(r.spec)}</code></span>"] if r.spec else []) + [
        f"<span><time>{_e(r.generated)}</time></span>", f"<span>{_int(c.n_items)} items</span>",
        f"<span>{len(c.strategies)} strategies</span>"]
    no_cost = [s.name for s in c.strategies if s.name not in r.costs]
    missing_note = (f" Not shown, no cost row: {_e(', '.join(no_cost))}." if no_cost and r.costs else "")
    page_title = f"{r.title} \u00b7 {r.spec}" if r.spec else r.title
    return "".join([
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="generator" content="retort">',
        f"<title>{_e(page_title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header><h1>{_e(r.title)}</h1><p class="meta">{"".join(meta)}</p></header>',
        _verdict_html(r),
        _cards(r),
        f'<section id="metric"><h2>{_e(r.metric_name.capitalize())} by strategy</h2>',
        f'<p class="sub">Mean over items; whiskers are {_e(method)}.</p>',
        f"<figure>{_chart_metric(r)}<figcaption>{_legend(r)}</figcaption></figure></section>",
        f'<section id="pareto"><h2>{_e(r.metric_name.capitalize())} versus tokens</h2>',
        ('<p class="sub">Up and to the left is better. Ringed points joined by the dashed line are the Pareto '
        f"front: no other strategy is both cheaper and better.{missing_note}</p>"),
        (f"<figure>{_chart_pareto(r)}<figcaption>Front, cheapest first: "
        f"{_e(', '.join(r.front)) if r.front else 'none'}</figcaption></figure></section>"),
        '<section id="diffs"><h2>Paired differences</h2>',
        (f'<p class="sub">Mean of A \u2212 B over the same items, with {level} paired bootstrap intervals. '
        f"Filled marks are significant. {_e(rule(c))}</p>"),
        f"<figure>{_chart_diffs(r)}</figure></section>",
        _tables(r),
        f"<footer>Generated by retort compare \u00b7 {_e(method)}.</footer>",
        "</main></body></html>\n",
    ])
