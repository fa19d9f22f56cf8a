"""SQL stages: one SELECT over earlier tables (checked read-only before DuckDB sees it), made a table."""

from __future__ import annotations

import duckdb

from retort.cache import create
from retort.context import Context
from retort.errors import TemplateError
from retort.results import StageStats
from retort.spec import SqlStage
from retort.sql import NotReadOnly, check_select, first_line, literal
from retort.sql import render as render_sql


class SqlExecutor:
    def parts(self, ctx: Context, stage: SqlStage, stats: StageStats) -> None:
        return None  # never reused: it is cheap, and may read anything

    async def run(self, ctx: Context, stage: SqlStage, stats: StageStats) -> None:
        ctx.cache.release()  # user SQL that fails must not take the held transaction with it
        ctx.cache.flush()
        ctx.progress.stage_started(stats, None)
        try:
            sql = render_sql(stage.sql, ctx.spec.params)
        except TemplateError as exc:
            raise ctx.stage_error(stage, "sql", str(exc)) from None
        try:
            check_select(sql)  # before DuckDB sees it: one SELECT, nothing that writes
            described = ctx.cache.columns(sql)  # DESCRIBE SELECT ...: its columns, nothing run
            body = sql if "_id" in described else \
                f"SELECT {literal(stage.name + ':')} || (row_number() OVER () - 1) AS _id, * FROM ({sql})"
            ctx.cache.execute(f"{create(ctx.table(stage.name))} AS {body}")
        except (duckdb.Error, NotReadOnly) as exc:
            raise ctx.stage_error(stage, "sql", first_line(exc)) from None
        stats.rows_out = ctx.cache.count(ctx.table(stage.name))
