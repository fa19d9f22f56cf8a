"""The report as rich tables in a terminal: the verdict, the strategies, the pairs, a caller's tables.

rich is imported inside the functions, so that writing HTML or JSON does not pay for its import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from retort.report import model
from retort.report.formats import ci, compact, grouped, num, pval, seconds, signed, usd
from retort.report.model import Disagreement, Report, best_strategy, verdict

if TYPE_CHECKING:
    from rich.console import Console


def render(r: Report, console: Console | None = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

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
    top = best_strategy(r)
    best = top.metric.estimate if top else None
    for s in c.strategies:
        row = r.costs.get(s.name)
        if row is None:
            money = ["\u2014"] * (4 if wide else 2)
        elif wide:
            money = [grouped(row.calls), f"{compact(row.prompt_tokens)} / {compact(row.completion_tokens)}",
                     seconds(row.wall_seconds), usd(row.cost_usd)]
        else:
            money = [compact(row.total_tokens), usd(row.cost_usd)]
        metric = num(s.metric.estimate)
        table.add_row(escape(s.name), f"[green]{metric}[/]" if s.metric.estimate == best else metric,
                      ci(s.metric), *money, "\u2605" if s.name in r.front else "")
    console.print(table)

    if c.pairs:
        _pairs(r, console, name_w, wide)
    for extra in r.tables:
        _table(extra, console)


def _pairs(r: Report, console: Console, name_w: int, wide: bool) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    c = r.comparison
    level = f"{c.confidence:.0%}"
    pairs = Table(title=f"Paired differences (A \u2212 B, {escape(r.metric_name)})", title_style="bold",
                  box=box.SIMPLE_HEAD)
    pairs.add_column("A", overflow="fold", min_width=min(name_w, 12))
    pairs.add_column("B", overflow="fold", min_width=min(name_w, 12))
    for name in ("A \u2212 B", f"{level} CI", "sig.", *(["b01/b10"] if wide else []), "p (Holm)",
                 *(["disagree"] if wide else [])):
        pairs.add_column(name, justify="center" if name == "sig." else "right", no_wrap=True)
    for p in c.pairs:
        diff = signed(p.diff.estimate)
        b01_b10 = f"{p.mcnemar.b01}/{p.mcnemar.b10}" if p.mcnemar else "\u2014"
        p_value = pval(p.p_holm)
        cells = [escape(p.a), escape(p.b), f"[bold]{diff}[/]" if p.significant else diff,
                 ci(p.diff, signed=True), "[green]yes[/]" if p.significant else "[dim]no[/]"]
        cells += [b01_b10, p_value, grouped(len(p.disagreements))] if wide else [p_value]
        pairs.add_row(*cells)
    console.print(pairs)


def _table(extra: model.Table, console: Console) -> None:
    """A caller's table; detail columns go where the terminal is narrow, the numbers stay readable."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    keep = [i for i, col in enumerate(extra.columns) if console.width >= 110 or not col.detail]
    table = Table(title=escape(extra.title), title_style="bold", box=box.SIMPLE_HEAD)
    for i in keep:
        col = extra.columns[i]
        table.add_column(escape(col.name), justify="right" if col.numeric else "left", overflow="fold",
                         no_wrap=col.numeric and not col.detail,
                         min_width=min(18, max(len(row[0]) for row in extra.rows)) if not i else None)
    for row in extra.rows:
        table.add_row(*(escape(row[i]) for i in keep))
    console.print(table)


def print_disagreements(items: Sequence[Disagreement], a: str, b: str, console: Console | None = None) -> None:
    """`retort compare --disagree A B`: every item the two answer differently, as a table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(items)} items on which {escape(a)} and {escape(b)} disagree", title_justify="left")
    for col in ("item", "text", a, b, "reference"):
        table.add_column(escape(col), overflow="fold", max_width=70 if col == "text" else 30)
    for d in items:
        table.add_row(*("\u2014" if v is None else escape(str(v)) for v in (d.item_id, d.text, d.a, d.b, d.reference)))
    (console or Console()).print(table)
