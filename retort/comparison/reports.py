"""A comparison's reports: its `Result` as the report data model, then every format from it.

The generic report (retort/report/) knows the primary metric's statistics and
the costs; a comparison adds, as data, the table of strategies and all metrics,
the items each pair answers differently (the HTML page shows the first 20 per
pair) and the JSON details (runs, every metric, item ids).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from retort.comparison.result import Result
from retort.comparison.scoring import disagreements
from retort.report import (
    Column,
    CostRow,
    Disagreement,
    PairDisagreements,
    Report,
    Table,
    build,
    html_page,
    json_doc,
    markdown,
    terminal,
)
from retort.stats import Interval

__all__ = ["disagreement_list", "print_disagreements", "render", "report", "write_reports"]

DISAGREEMENTS_SHOWN = 20  # items per pair listed in the HTML report (--disagree A B lists them all)


def report(result: Result) -> Report:
    return build(result.comparison, cost_rows(result), spec=result.spec_path, title=f"Comparison: {result.spec.name}",
                 missing={run.name: result.missing(run) for run in result.runs}, metric_name=result.primary,
                 tables=[_strategies_table(result)], disagreements=_disagreements(result),
                 details={"compare": _details(result)})


def write_reports(result: Result, out: Path) -> dict[str, Path]:
    r = report(result)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "json": out / "report.json", "html": out / "report.html"}
    paths["md"].write_text(markdown.render(r), encoding="utf-8")
    paths["json"].write_text(json_doc.render(r) + "\n", encoding="utf-8")
    paths["html"].write_text(html_page.render(r), encoding="utf-8")
    return paths


def render(result: Result, console: Any = None) -> None:
    """The report in the terminal; in a log or a pipe, wide enough that the tables do not fold."""
    if console is None:
        from rich.console import Console

        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 140
    terminal.render(report(result), console)


def disagreement_list(result: Result, a: str, b: str) -> list[Disagreement]:
    return [Disagreement(str(d["item_id"]), d["text"], d[a], d[b], d["reference"])
            for d in disagreements(result, a, b)]


def print_disagreements(result: Result, a: str, b: str, fmt: str) -> None:
    """`--disagree A B`: every item the two answer differently, as JSON, Markdown or a table."""
    if fmt == "json":
        print(json.dumps(disagreements(result, a, b), indent=2, ensure_ascii=False, default=str))
    elif fmt == "md":
        print(markdown.disagreement_table(disagreement_list(result, a, b), a, b), end="")
    else:
        terminal.print_disagreements(disagreement_list(result, a, b), a, b)


def cost_rows(result: Result) -> list[CostRow]:
    return [CostRow(run.name, calls=run.calls, prompt_tokens=run.prompt_tokens,
                    completion_tokens=run.completion_tokens, wall_seconds=run.wall_seconds, cost_usd=run.cost_usd)
            for run in result.runs]


def _strategies_table(result: Result) -> Table:
    level = f"{result.spec.confidence:.0%}"
    columns = (Column("strategy"), Column("pipeline", detail=True), Column("run", numeric=True, detail=True),
               Column("predict", detail=True), Column("missing", numeric=True),
               *(Column(f"{m.name} ({level} CI)", numeric=True) for m in result.spec.metrics))
    rows = tuple((run.name, str(run.pipeline.name), str(run.run_id), f"{run.stage}.{run.column}",
                  f"{result.missing(run)} of {len(result.items)}",
                  *(_fmt(result.intervals[m.name][run.name]) for m in result.spec.metrics)) for run in result.runs)
    return Table("strategies", "table-metrics", "Strategies and all metrics", columns, rows, _method_note(result))


def _fmt(iv: Interval) -> str:
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _method_note(result: Result) -> str:
    corpus = [m.name for m in result.spec.metrics if m.name not in result.scores]
    note = ("Missing: items with no usable prediction (a failed call or an answer that did not parse); they "
            "score 0. Several predictions for one item are reduced to their majority.")
    if corpus:
        note += (f" {', '.join(corpus)} is corpus-level: its interval resamples items and recomputes it "
                 f"({', '.join(str(result.resamples[m]) for m in corpus)} resamples).")
    return note


def _disagreements(result: Result) -> list[PairDisagreements]:
    names = [run.name for run in result.runs]
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            items = disagreement_list(result, a, b)
            if items:
                out.append(PairDisagreements(a, b, tuple(items[:DISAGREEMENTS_SHOWN]), len(items),
                                             f"retort compare {result.spec.name} --disagree {a} {b}"))
    return out


def _details(result: Result) -> dict[str, Any]:
    """What the generic report does not know: strategies' runs, every metric, missing predictions."""
    spec = result.spec
    return {
        "name": spec.name, "description": spec.description, "dataset": spec.dataset.model_dump(exclude_none=True),
        "reference": spec.reference, "primary_metric": result.primary,
        "item_ids": [str(item["_id"]) for item in result.items],  # what the pairs' disagreement indices point at
        "metrics": [{"name": m.name, "resamples": result.resamples[m.name],
                     "per_item": m.name in result.scores} for m in spec.metrics],
        "strategies": [{
            "name": run.name, "pipeline": run.pipeline.name, "run_id": run.run_id,
            "set": spec.strategies[run.name].set_, "model": spec.strategies[run.name].model,
            "predict": f"{run.stage}.{run.column}", "rows": run.rows, "missing": result.missing(run),
            "calls_made": run.calls_made, "cache_hits": run.cache_hits, "failures": run.failures,
            "metrics": {m.name: result.intervals[m.name][run.name].to_dict() for m in spec.metrics}}
            for run in result.runs],
    }
