"""The HTML page's three charts as inline SVG, drawn here in Python: no script, no request to any host.

Marks carry stable ids and classes for browser tests: `#chart-metric .bar`,
`#chart-pareto .point`, `#chart-diffs .diff`, each with its number in `data-value`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from retort.report.formats import ci, compact, digits, grouped, num, pval, signed, usd
from retort.report.model import Report

# --------------------------------------------------------------------------- SVG building blocks

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
            "#edc948", "#ff9da7", "#9c755f", "#8c8c8c")
_CHART_W = 880
_CHAR_W = 6.9  # average glyph width of the 12.5px system sans, for layout estimates


def esc(s: object) -> str:
    """Every user string (strategy names, spec, title) goes through here on its way into the page."""
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
            f'<title id="{chart_id}-title">{esc(label)}</title>')


def _x_axis(scale: _Scale, ticks: Sequence[float], top: float, bottom: float, fmt: Any, label: str) -> list[str]:
    out = [(f'<g class="axis x-axis"><line class="domain" x1="{_f(scale.px0)}" x2="{_f(scale.px1)}" '
           f'y1="{_f(bottom)}" y2="{_f(bottom)}"/>')]
    for t in ticks:
        x = _f(scale(t))
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{_f(top)}" y2="{_f(bottom)}"/>'
                   f'<line class="tick" x1="{x}" x2="{x}" y1="{_f(bottom)}" y2="{_f(bottom + 5)}"/>'
                   f'<text class="tick-label" x="{x}" y="{_f(bottom + 18)}" text-anchor="middle">{esc(fmt(t))}</text>')
    mid = (scale.px0 + scale.px1) / 2
    out.append(f'<text class="axis-label" x="{_f(mid)}" y="{_f(bottom + 38)}" text-anchor="middle">'
               f"{esc(label)}</text></g>")
    return out


def _y_axis(scale: _Scale, ticks: Sequence[float], left: float, right: float, fmt: Any, label: str) -> list[str]:
    out = [(f'<g class="axis y-axis"><line class="domain" x1="{_f(left)}" x2="{_f(left)}" '
           f'y1="{_f(scale.px0)}" y2="{_f(scale.px1)}"/>')]
    for t in ticks:
        y = _f(scale(t))
        out.append(f'<line class="grid" x1="{_f(left)}" x2="{_f(right)}" y1="{y}" y2="{y}"/>'
                   f'<line class="tick" x1="{_f(left - 5)}" x2="{_f(left)}" y1="{y}" y2="{y}"/>'
                   f'<text class="tick-label" x="{_f(left - 8)}" y="{y}" dy="0.32em" text-anchor="end">'
                   f"{esc(fmt(t))}</text>")
    mid = (scale.px0 + scale.px1) / 2
    out.append(f'<text class="axis-label" transform="translate({_f(left - 48)} {_f(mid)}) rotate(-90)" '
               f'text-anchor="middle">{esc(label)}</text></g>')
    return out


def color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _unit_domain(values: Sequence[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in values)


# --------------------------------------------------------------------------- the three charts


def metric_chart(r: Report) -> str:
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
    out += _x_axis(x, ticks, top, bottom, lambda t: num(t, digits(step)), r.metric_name)
    zero = x(0.0)
    for i, s in enumerate(strategies):
        cy = top + row_h * i + row_h / 2 + 3
        est, lo, hi = x(s.metric.estimate), x(s.metric.low), x(s.metric.high)
        tip = f"{s.name}: {num(s.metric.estimate)} {ci(s.metric)}, n={s.n}"
        out.append(
            f'<g class="strategy" data-strategy="{esc(s.name)}">'
            f'<text class="row-label" x="{_f(left - 10)}" y="{_f(cy)}" dy="0.32em" text-anchor="end">'
            f"{esc(_clip(s.name, label_w - 20))}</text>"
            f'<rect class="bar" x="{_f(min(zero, est))}" y="{_f(cy - 10)}" width="{_f(abs(est - zero))}" '
            f'height="20" rx="2" fill="{color(i)}" data-value="{s.metric.estimate!r}"><title>{esc(tip)}</title></rect>'
            f'<g class="ci"><line x1="{_f(lo)}" x2="{_f(hi)}" y1="{_f(cy)}" y2="{_f(cy)}"/>'
            f'<line x1="{_f(lo)}" x2="{_f(lo)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<line x1="{_f(hi)}" x2="{_f(hi)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/></g>'
            f'<text class="value-label" x="{_f(max(hi, est) + 8)}" y="{_f(cy)}" dy="0.32em">'
            f"{num(s.metric.estimate)}</text></g>")
    out.append("</svg>")
    return "".join(out)


def pareto_chart(r: Report) -> str:
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
    out += _x_axis(x, xt, top, bottom, compact, "total tokens (prompt + completion)" + (", log scale" if log else ""))
    out += _y_axis(y, yt, left, right, lambda t: num(t, digits(step)), r.metric_name)

    front = [p for name in r.front for p in pts if p[1].name == name]
    if len(front) > 1:
        coords = " ".join(f"{_f(x(row.total_tokens))},{_f(y(s.metric.estimate))}" for _, s, row in front)
        out.append(f'<polyline class="front-line" points="{coords}"/>')

    placed: list[tuple[float, float, float, float]] = []
    labels: list[str] = []
    for i, s, row in pts:
        px, py = x(row.total_tokens), y(s.metric.estimate)
        on_front = s.name in r.front
        tip = (f"{s.name}: {r.metric_name} {num(s.metric.estimate)} {ci(s.metric)}, "
               f"{grouped(row.total_tokens)} tokens, cost {usd(row.cost_usd)}"
               + (" \u2014 on the Pareto front" if on_front else ""))
        out.append(
            f'<g class="point-group" data-strategy="{esc(s.name)}">'
            f'<line class="ci" x1="{_f(px)}" x2="{_f(px)}" y1="{_f(y(s.metric.low))}" y2="{_f(y(s.metric.high))}"/>'
            f'<circle class="point{" front" if on_front else ""}" cx="{_f(px)}" cy="{_f(py)}" '
            f'r="{7 if on_front else 5.5}" fill="{color(i)}" data-tokens="{row.total_tokens}" '
            f'data-value="{s.metric.estimate!r}"><title>{esc(tip)}</title></circle></g>')
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
            f'text-anchor="{"end" if anchor_end else "start"}">{esc(text)}</text>')


def diffs_chart(r: Report) -> str:
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
    out += _x_axis(x, ticks, top, bottom, lambda t: signed(t, digits(step)) if t else "0",
                   f"difference in {r.metric_name} (A \u2212 B)")
    zx = _f(x(0.0))
    out.append(f'<line class="zero" x1="{zx}" x2="{zx}" y1="{_f(top - 4)}" y2="{_f(bottom)}"/>')
    for k, (p, label) in enumerate(zip(c.pairs, labels, strict=True)):
        cy = top + row_h * k + row_h / 2 + 3
        est, lo, hi = x(p.diff.estimate), x(p.diff.low), x(p.diff.high)
        state = "significant" if p.significant else "ns"
        mc = f", McNemar p={pval(p.mcnemar.p_value)}" if p.mcnemar else ""
        tip = f"{label}: {signed(p.diff.estimate)} {ci(p.diff, signed=True)}{mc}"
        note = f"{signed(p.diff.estimate)} {ci(p.diff, signed=True)}"
        verdict = (f"{p.a if p.diff.estimate > 0 else p.b} better" if p.significant else "not significant")
        out.append(
            f'<g class="diff {state}" data-a="{esc(p.a)}" data-b="{esc(p.b)}" data-value="{p.diff.estimate!r}">'
            f"<title>{esc(tip)}</title>"
            f'<text class="row-label" x="{_f(left - 10)}" y="{_f(cy)}" dy="0.32em" text-anchor="end">'
            f"{esc(_clip(label, label_w - 20))}</text>"
            f'<line class="diff-ci" x1="{_f(lo)}" x2="{_f(hi)}" y1="{_f(cy)}" y2="{_f(cy)}"/>'
            f'<line class="diff-ci" x1="{_f(lo)}" x2="{_f(lo)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<line class="diff-ci" x1="{_f(hi)}" x2="{_f(hi)}" y1="{_f(cy - 6)}" y2="{_f(cy + 6)}"/>'
            f'<rect class="diff-mark" x="{_f(est - 6)}" y="{_f(cy - 6)}" width="12" height="12" '
            f'transform="rotate(45 {_f(est)} {_f(cy)})"/>'
            f'<text class="diff-note" x="{_f(right + 16)}" y="{_f(cy - 6)}" dy="0.32em">{esc(note)}</text>'
            f'<text class="diff-verdict" x="{_f(right + 16)}" y="{_f(cy + 8)}" dy="0.32em">'
            f"{esc(_clip(verdict, 230))}</text></g>")
    out.append("</svg>")
    return "".join(out)


