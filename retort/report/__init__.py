"""Render a strategy comparison as a terminal table, Markdown, JSON or one HTML page.

    to_markdown(comparison, costs, spec=...)      -> str, for a README or a PR comment
    to_json(comparison, costs, spec=...)          -> str, for machines
    render_terminal(comparison, costs, spec=...)  -> prints rich tables
    to_html(comparison, costs, spec=...)          -> str, one self-contained page

`costs` are one `CostRow` (or a mapping with the same keys) per strategy: calls,
tokens, wall time and dollars, which the statistics do not know about.

Each function is `build` (model.py: the one report data model, with the verdict
and the significance rule) followed by one format's `render`: terminal.py,
markdown.py, json_doc.py, html_page.py (its SVG charts in charts.py, the number
formats every format shares in formats.py). A caller with more to show, such as
`retort compare`, builds a `Report` with its tables, disagreements and JSON
details and calls the renderers itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from retort.report import html_page, json_doc, markdown, terminal
from retort.report.model import (
    Column,
    CostRow,
    CostRowLike,
    Disagreement,
    PairDisagreements,
    Report,
    Table,
    build,
    rule,
    verdict,
)
from retort.stats import Comparison

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Column", "CostRow", "Disagreement", "PairDisagreements", "Report", "Table", "build", "render_terminal",
           "rule", "to_html", "to_json", "to_markdown", "verdict"]


def to_markdown(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
                title: str = "Strategy comparison", generated: datetime | str | None = None,
                metric_name: str = "accuracy", missing: Mapping[str, int] | None = None) -> str:
    return markdown.render(build(comparison, costs, title=title, spec=spec, generated=generated,
                                 metric_name=metric_name, missing=missing))


def to_json(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
            title: str = "Strategy comparison", generated: datetime | str | None = None,
            metric_name: str = "accuracy", indent: int | None = 2, missing: Mapping[str, int] | None = None) -> str:
    return json_doc.render(build(comparison, costs, title=title, spec=spec, generated=generated,
                                 metric_name=metric_name, missing=missing), indent=indent)


def render_terminal(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
                    title: str = "Strategy comparison", generated: datetime | str | None = None,
                    metric_name: str = "accuracy", console: Console | None = None,
                    missing: Mapping[str, int] | None = None) -> None:
    terminal.render(build(comparison, costs, title=title, spec=spec, generated=generated, metric_name=metric_name,
                          missing=missing), console)


def to_html(comparison: Comparison, costs: Sequence[CostRowLike] = (), *, spec: str | None = None,
            title: str = "Strategy comparison", generated: datetime | str | None = None,
            metric_name: str = "accuracy", missing: Mapping[str, int] | None = None) -> str:
    """One self-contained HTML page: inline CSS, inline SVG, no script, no request to any host."""
    return html_page.render(build(comparison, costs, title=title, spec=spec, generated=generated,
                                  metric_name=metric_name, missing=missing))
