"""Python stages: a workspace function over the rows of a table; what it returns becomes the stage's
table (a dict: one row, and its numbers the run's metrics). `ctx` gives it prompts through the engine."""

from __future__ import annotations

import inspect
import math
from typing import Any

import orjson
import pyarrow as pa

from retort.context import Context
from retort.datasets import table_from_rows
from retort.errors import RetortError
from retort.executors.prompt import PromptExecution
from retort.parsers import build_parser
from retort.results import StageStats
from retort.spec import PromptStage, PythonStage, with_params


class PythonExecutor:
    def parts(self, ctx: Context, stage: PythonStage, stats: StageStats) -> None:
        return None  # never reused: its function may read anything

    async def run(self, ctx: Context, stage: PythonStage, stats: StageStats) -> None:
        ctx.cache.release()
        fn = ctx.ws.evaluator(stage.python)
        index = ctx.spec.stages.index(stage)
        source = stage.from_ or (ctx.spec.stages[index - 1].name if index else "input")
        ctx.cache.flush()
        ctx.progress.stage_started(stats, None)
        rows = ctx.cache.select(f"SELECT * FROM {ctx.source_table(stage, source)}")
        stats.rows_in = rows.num_rows
        kwargs = dict(stage.with_)
        if "ctx" in inspect.signature(fn).parameters:
            kwargs["ctx"] = StageContext(ctx, stage, stats)
        try:
            out = fn(rows.to_pylist(), **kwargs)
            if inspect.isawaitable(out):
                out = await out
        except RetortError:
            raise
        except Exception as exc:  # a crashing evaluator is a failure row, not an abort
            raise RetortError(f"evaluator {stage.python} failed: {type(exc).__name__}: {exc}") from None
        if isinstance(out, dict):
            _record_metrics(ctx, stage, stats, out)
            out = [out]
        table = out if isinstance(out, pa.Table) else table_from_rows(list(out or []), lenient=True)
        if table.num_columns == 0:
            table = pa.table({"_id": pa.array([], pa.string())})
        ctx.cache.write_table(ctx.table(stage.name), table)
        stats.rows_out = table.num_rows


def _record_metrics(ctx: Context, stage: PythonStage, stats: StageStats, values: dict[str, Any]) -> None:
    stats.metrics = {k: v for k, v in values.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if ctx.run_id is None:
        return
    data = orjson.dumps(values, default=str).decode()
    ctx.cache.record_metrics([[ctx.run_id, ctx.spec.name, stage.name, name, float(value), data]
                               for name, value in stats.metrics.items()])


class StageContext:
    """What a Python stage gets as `ctx` when its function takes one: prompts through the runner.

    `await ctx.prompt(...)` renders a template over rows and calls a model with the
    same cache, concurrency, retries and accounting as a prompt stage, so loops
    that depend on earlier answers (LbT M3's refinement rounds) stay cached and
    resumable. `ctx.write_table(suffix, rows)` keeps intermediate tables as
    `<stage>__<suffix>`.
    """

    def __init__(self, ctx: Context, stage: PythonStage, stats: StageStats) -> None:
        self._ctx, self._stage, self.stats = ctx, stage, stats
        self.params = ctx.spec.params
        self.run_id = ctx.run_id

    async def prompt(self, prompt: str, rows: list[dict[str, Any]], *, model: str = "default", samples: int = 1,
                     params: dict[str, Any] | None = None, parse: str | dict[str, Any] = "text",
                     output: str = "output", reask: int = 0) -> list[dict[str, Any]]:
        """One output row per input row and sample, in input order; `_error` set where parsing failed."""
        ctx = self._ctx
        stage = PromptStage.model_validate({"name": self._stage.name, "prompt": prompt, "model": model,
                                            "samples": samples, "params": params or {}, "parse": parse,
                                            "output": output, "reask": reask})
        template = ctx.template(stage)
        parser = build_parser(with_params(parse, ctx.spec.params), output, workspace=ctx.ws)
        keyed = [{**row, "_id": str(row.get("_id", i))} for i, row in enumerate(rows)]
        columns = sorted({c for row in keyed for c in row})
        template.check_columns(columns)
        sink: list[dict[str, Any]] = []
        exec_ = PromptExecution(ctx, stage, self.stats, template, parser, "", columns, sink=sink)
        await exec_.run(table_from_rows(keyed))
        order = {row["_id"]: i for i, row in enumerate(keyed)}
        sink.sort(key=lambda row: (order[row["_parent"]], row["_sample"]))
        return sink

    def write_table(self, suffix: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._ctx.cache.write_table(self._ctx.table(f"{self._stage.name}__{suffix}"),
                                           table_from_rows(rows))
