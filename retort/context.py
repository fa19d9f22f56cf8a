"""What every stage of one run shares: the spec, the store, the models, where this run's tables live,
and the few questions every executor asks (a table's name and columns, a stage's rows, its template
and parser, a located error). The runner makes one; the stage executors read from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from retort.cache import Cache
from retort.errors import NotFoundError, RetortError, SpecError, TemplateError
from retort.models import Models
from retort.parsers import Parser, build_parser
from retort.results import Progress
from retort.spec import EmbedStage, Pipeline, PromptStage, Source, with_params
from retort.sql import NotReadOnly, first_line
from retort.sql import render as render_sql
from retort.templates import Template, environment
from retort.workspace import Workspace

LINEAGE = ("_id", "_parent", "_sample", "_call", "_raw", "_error")
NOT_CACHED = "not cached (dry run)"  # a plan's placeholder output, so downstream row counts stay right


@dataclass
class Context:
    ws: Workspace
    spec: Pipeline
    src: Source
    cache: Cache
    models: Models
    progress: Progress
    dry: bool
    max_retries: int
    run_id: int | None = None
    schema: str = "temp"  # this run's tables: run_N, or the session's temp schema for a plan
    input_has: str = "the input has"  # how an error names the input: "FILE has", or "the input rows have"
    known: dict[str, list[str]] = field(default_factory=dict)  # columns of the tables this run reused
    completion: dict[str, float] = field(default_factory=dict)  # plan: expected completion tokens per call
    _env: Any = None  # the workspace's Jinja environment, made on first use
    # A pipeline stage's template and parser, compiled once per run: the fingerprint (parts) and the
    # build (run) both need them. Keyed by the stage object, which the spec holds, so ids stay unique.
    _compiled: dict[int, tuple[Template, Parser]] = field(default_factory=dict)
    ray: Any = None  # under --on ray, the run's retort.cluster.RayCluster: prompt-stage misses go there

    def table(self, name: str) -> str:
        return f'{self.schema}."{name}"'

    def columns(self, name: str) -> list[str]:
        if name in self.known:
            return list(self.known[name])
        return self.cache.columns(self.table(name))

    def stage_error(self, stage: Any, field_name: str, message: str) -> SpecError:
        index = self.spec.stages.index(stage)
        return SpecError(message, file=self.src.file, line=self.src.line(("stages", index, field_name)),
                         field=f"stages[{index}] ({stage.name}).{field_name}")

    def source_table(self, stage: Any, name: str) -> str:
        earlier = ["input", *(s.name for s in self.spec.stages[: self.spec.stages.index(stage)])]
        if name not in earlier:
            raise self.stage_error(stage, "from", f"no table {name!r} before this stage "
                                                  f"(tables: {', '.join(earlier)})")
        if name not in self.known and not self.cache.table_exists(self.schema, name):
            raise RetortError(f"stage {stage.name}: its input table {name!r} was not produced "
                              "(an earlier stage failed)")
        return self.table(name)

    def read_rows(self, stage: PromptStage | EmbedStage, source: str, columns: list[str]) -> pa.Table:
        """The rows a model stage works on: its `from` table without the rows an upstream parse failed
        (a plan keeps its placeholders: their _error is NULL), filtered by its `where:` (a template
        over params)."""
        filters = []
        if "_error" in columns:
            filters.append("_error IS NULL")
        if stage.where:
            try:
                filters.append(f"({render_sql(stage.where, self.spec.params)})")
            except TemplateError as exc:
                raise self.stage_error(stage, "where", str(exc)) from None
        try:  # a `where:` is pasted into the query: the store runs it only as one SELECT
            return self.cache.select(f"SELECT * FROM {source}" + (f" WHERE {' AND '.join(filters)}" if filters else ""))
        except (duckdb.Error, NotReadOnly) as exc:
            raise self.stage_error(stage, "where", first_line(exc)) from None

    def compiled(self, stage: PromptStage) -> tuple[Template, Parser]:
        """The stage's template and parser; a stage of the spec's compiles once per run, a stage made on
        the fly (a Python stage's `ctx.prompt`) each time."""
        key = id(stage)
        if key in self._compiled:
            return self._compiled[key]
        pair = self.template(stage), self.parser(stage)
        if any(s is stage for s in self.spec.stages):
            self._compiled[key] = pair
        return pair

    def template(self, stage: PromptStage) -> Template:
        if stage.template is not None:
            return Template(stage.template, f"{self.src.file} (stage {stage.name})")
        assert stage.prompt is not None  # the spec model requires one of the two
        path = self.ws.prompt(stage.prompt)
        if path is None:
            raise self.stage_error(stage, "prompt", f"no template {stage.prompt!r} in prompts/ of "
                                                    f"{self.ws.root} or the built-in library")
        if self._env is None:
            self._env = environment([root / "prompts" for root in self.ws.roots])
        return Template.from_file(path, f"prompts/{stage.prompt}", self._env)

    def parser(self, stage: PromptStage) -> Parser:
        try:
            return build_parser(with_params(stage.parse, self.spec.params), stage.output or stage.name,
                                workspace=self.ws)
        except (SpecError, NotFoundError) as exc:
            raise self.stage_error(stage, "parse", getattr(exc, "detail", str(exc))) from None
