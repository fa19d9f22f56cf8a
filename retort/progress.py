"""Drawing a run: a rich progress line per stage, then a summary table."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from retort.results import Progress as RunnerProgress
from retort.results import RunResult, StageStats
from retort.spec import Pipeline


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that tables do not fold
        console.width = 140
    return console



class RichProgress(RunnerProgress):
    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description:<14}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("hits {task.fields[hits]}  fail {task.fields[fail]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(), TextColumn("[yellow]{task.fields[wait]}"), console=self.console, transient=False,
            disable=not enabled, refresh_per_second=4)
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.waits: dict[str, float] = {}  # stage → when its latest long wait ends (monotonic)
        self._last = 0.0

    def __enter__(self) -> RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def stage_started(self, stats: StageStats, total: int | None) -> None:
        self.started[stats.name] = time.monotonic()
        self.tasks[stats.name] = self.bar.add_task(f"{stats.name} ({stats.kind})", total=total, hits=0, fail=0,
                                                   tps="-", wait="")

    def advance(self, stats: StageStats) -> None:
        task = self.tasks.get(stats.name)
        now = time.monotonic()
        if task is None or now - self._last < 0.1:  # called per call: redraw state ten times a second at most
            return
        self._last = now
        elapsed = max(1e-6, time.monotonic() - self.started[stats.name])
        self.bar.update(task, completed=stats.done, hits=stats.cache_hits, fail=stats.failures,
                        tps=f"{stats.completion_tokens / elapsed:,.0f}" if stats.calls_made else "-")
        if stats.name in self.waits and self.waits[stats.name] <= now:
            del self.waits[stats.name]
            self.bar.update(task, wait="")

    def waiting(self, stats: StageStats, seconds: float, reason: str) -> None:
        """Say that a call waits, and until when (a clock time stays true without redraws)."""
        task = self.tasks.get(stats.name)
        if task is None:
            return
        until = time.monotonic() + seconds
        if until <= self.waits.get(stats.name, 0.0):
            return  # an earlier wait ends later: keep showing that one
        self.waits[stats.name] = until
        clock = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
        self.bar.update(task, wait=f"waiting {seconds:,.0f}s (until {clock}): {reason[:80]}")

    def stage_finished(self, stats: StageStats) -> None:
        task = self.tasks.get(stats.name)
        if task is None:
            return
        self._last = 0.0
        self.advance(stats)
        if self.bar.tasks[task].total is None:
            self.bar.update(task, total=max(stats.rows_out, 1), completed=max(stats.rows_out, 1))


PARSE_ERROR_RATE = 0.2  # a prompt stage with at least this share of unparsed rows is warned about


def run_warnings(result: RunResult, spec: Pipeline) -> list[str]:
    """What the summary must not let pass as a plain `ok`: a prompt stage where PARSE_ERROR_RATE or
    more of the rows did not parse, and an empty stage table that is not simply the echo of an
    empty input: one whose own input had rows, or one no later stage reads (what the pipeline
    delivers). An empty intermediate table, such as CDMT's `retry` when the teacher was always
    right, is normal; its emptiness shows downstream if it matters."""
    stages = list(spec.stages)
    read: set[str] = set()
    for i, stage in enumerate(stages):
        later = " ".join(str(getattr(s, attr, None) or "") for s in stages[i + 1:] for attr in ("sql", "where"))
        readers = {getattr(s, "from_", None) or (stages[j - 1].name if j else "input")
                   for j, s in enumerate(stages) if j > i and not hasattr(s, "sql")}
        if stage.name in readers or re.search(rf"\b{re.escape(stage.name)}\b", later):
            read.add(stage.name)
    out = []
    for s in result.stages:
        if s.error:
            continue  # a crashed stage is a failure already, counted and shown as one
        if s.kind == "prompt" and s.rows_out and s.parse_errors / s.rows_out >= PARSE_ERROR_RATE:
            out.append(f"{s.name}: {s.parse_errors} of {s.rows_out} rows did not parse "
                       f"({s.parse_errors / s.rows_out:.0%}); their parsed columns are null, see "
                       f"retort show {s.name} --where \"_error IS NOT NULL\" --columns _raw,_error")
        elif s.rows_out == 0 and s.rows_in > 0:
            out.append(f"{s.name} is empty: none of its {s.rows_in} input rows gave a row"
                       + (f" ({s.failures} failed calls, see retort show failures)" if s.failures else ""))
        elif s.rows_out == 0 and s.name not in read:
            out.append(f"{s.name} is empty, and no later stage reads it: the run delivers no rows there")
    return out


def print_summary(result: RunResult, warnings: list[str] | tuple[str, ...] = ()) -> None:
    console = _console()
    state = "up to date" if result.up_to_date else f"{result.status} in {result.seconds:.1f}s"
    if warnings:
        state = f"{state}, {len(warnings)} warning{'s' if len(warnings) > 1 else ''}"
    table = Table(title=f"run {result.run_id} of {result.pipeline}: {state}", title_justify="left")
    for col in ("stage", "kind", "rows in", "rows out", "calls", "cache hits", "made", "failures",
                "parse errors", "tokens", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "kind") else "right")
    for s in result.stages:
        kind = f"{s.kind}, reused run {s.reused_from}" if s.reused_from else s.kind
        table.add_row(s.name, kind, str(s.rows_in) if s.kind in ("prompt", "embed", "python") else "",
                      str(s.rows_out), str(s.calls_needed), str(s.cache_hits),
                      str(s.calls_made), str(s.failures) + (" (crashed)" if s.error else ""), str(s.parse_errors),
                      f"{s.prompt_tokens + s.completion_tokens:,}", f"{s.seconds:.2f}")
    console.print(table)
    t = result.totals()
    cost = result.cost_usd
    spent = "" if result.up_to_date or cost is None else f", cost ${cost:,.4f}"
    console.print(f"calls made {t['calls_made']}, cache hits {t['cache_hits']}, failures {result.failures}, "
                  f"tokens {t['prompt_tokens'] + t['completion_tokens']:,} "
                  f"(prompt {t['prompt_tokens']:,}, completion {t['completion_tokens']:,}){spent}, "
                  f"wall {result.seconds:.1f}s")
    reused = [s.name for s in result.stages if s.reused_from]
    if result.up_to_date:
        console.print(f"up to date: the input and every stage are as run {result.run_id} left them, so no new "
                      "run was made and nothing was called (--no-reuse rebuilds)")
    elif reused:
        console.print(f"reused unchanged: {', '.join(reused)} (the rows of the run that built them from the same "
                      "inputs; --no-reuse rebuilds them)")
    last = f"{result.pipeline}.{result.stages[-1].name}" if result.stages else result.pipeline
    if result.status == "ok":
        console.print(f"results: {result.db_path} (schema run_{result.run_id}; the latest complete tables are "
                      f"views in schema {result.pipeline})\n"
                      f"  retort show {last}    retort export {last} --format jsonl")
    else:
        console.print(f"results: run {result.run_id} is {result.status}: its tables are kept under schema "
                      f"run_{result.run_id} (`--run {result.run_id}`); the latest complete tables are unchanged")
    for s in result.stages:
        if s.metrics:
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.metrics.items())
            console.print(f"[bold]{s.name}[/bold]: {shown}")
    for s in result.stages:
        if s.error:
            print(f"stage {s.name} failed: {s.error}", file=sys.stderr)
    for warning in warnings:
        console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", highlight=False)


def print_plan(result: RunResult) -> None:
    console = _console()
    table = Table(title=f"plan for {result.pipeline} (nothing called)", title_justify="left")
    columns = ("stage", "kind", "model", "rows", "calls", "cached", "to call", "est. prompt tokens",
               "est. completion tokens", "est. cost")
    for col in columns:
        table.add_column(col, justify="left" if col in ("stage", "kind", "model") else "right")
    for s in result.stages:
        calls = s.calls_needed  # prompt stages, and Python stages that prompt through ctx
        cost = "" if not s.model else ("unknown" if s.cost_usd is None else f"${s.cost_usd:,.4f}")
        table.add_row(s.name, s.kind, s.model or "", str(s.rows_in if s.kind == "prompt" else s.rows_out),
                      str(calls), str(s.cache_hits), str(calls - s.cache_hits), f"{s.est_prompt_tokens:,}",
                      f"{s.est_completion_tokens:,}" if s.model else "", cost)
    console.print(table)
    need = sum(s.calls_needed - s.cache_hits for s in result.stages)
    total = result.cost_usd
    bases = sorted({f"{s.name}: {s.completion_basis}" for s in result.stages if s.completion_basis})
    cost = "unknown (a model has no price: set price_input/price_output)" if total is None else f"${total:,.4f}"
    console.print(f"{need} call(s) to make, estimated cost {cost}"
                  "; rows after an uncached stage are counted as if every call answered (placeholder outputs), "
                  "so a stage that filters on parsed answers may make fewer calls")
    if bases:
        console.print("completion tokens per call from " + "; ".join(bases))
