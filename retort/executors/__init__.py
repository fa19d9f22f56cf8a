"""One executor per stage kind, behind one small interface.

    parts(ctx, stage, stats)     what the stage's table depends on beyond its settings, its model
                                 and its `from` table (a template's digest, a parser's identity),
                                 or None: never reused, always runs (SQL and Python stages)
    run(ctx, stage, stats)       build the stage's table in this run's schema, counting into `stats`

The runner picks the executor by the stage's kind; whether a stage runs at all or links an
earlier build with the same fingerprint is the runner's business (retort.reuse), not theirs.
"""

from __future__ import annotations

from typing import Any, Protocol

from retort.context import Context
from retort.executors.embed import EmbedExecutor
from retort.executors.prompt import PromptExecutor
from retort.executors.python import PythonExecutor
from retort.executors.sql import SqlExecutor
from retort.results import StageStats
from retort.spec import EmbedStage, PromptStage, PythonStage, SqlStage


class Executor(Protocol):
    def parts(self, ctx: Context, stage: Any, stats: StageStats) -> tuple[str | None, ...] | None: ...
    async def run(self, ctx: Context, stage: Any, stats: StageStats) -> None: ...


EXECUTORS: dict[type, Executor] = {PromptStage: PromptExecutor(), EmbedStage: EmbedExecutor(),
                                   SqlStage: SqlExecutor(), PythonStage: PythonExecutor()}


def executor(stage: Any) -> Executor:
    return EXECUTORS[type(stage)]
