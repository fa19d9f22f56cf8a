"""The runner: one pipeline run's lifecycle, over one executor per stage kind (retort.executors).

    up to date?   the latest complete run has every fingerprint this run would have: nothing to do
    pre-flight    endpoints answer, keys are set, the input reads and maps; before any record
    start         a run record (run N) and its schema run_N
    stages        in order, each by its kind's executor, into run_N; the store group-commits
    finish        the record's status: only a complete run (`ok`) becomes the latest

Three modes share this one path:

    run       calls what is not cached and writes the stage tables of run N
    plan      (dry) looks up the cache, counts the calls still needed, calls nothing
    validate  (dry, in-memory cache, a few rows) renders every template, binds every
              SQL stage, resolves every model, prompt and evaluator
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from retort import cluster
from retort.backends.base import Backend
from retort.cache import Cache, quote
from retort.context import LINEAGE, NOT_CACHED, Context
from retort.datasets import read_table
from retort.errors import CacheError, DatasetError, NotFoundError, RetortError, SpecError, TemplateError
from retort.executors import executor
from retort.models import Models
from retort.results import Progress, RunResult, StageStats
from retort.reuse import Reuse, engine_digest
from retort.spec import Pipeline, PythonStage, Source
from retort.sql import NotReadOnly, first_line
from retort.workspace import Workspace

__all__ = ["LINEAGE", "NOT_CACHED", "Progress", "RunResult", "Runner", "StageStats"]


class Runner:
    def __init__(self, workspace: Workspace, pipeline: Pipeline, source: Source, cache: Cache, *,
                 mode: str = "run", input_path: str | None = None, columns: dict[str, str] | None = None,
                 limit: int | None = None, model_targets: dict[str, dict[str, Any]] | None = None,
                 progress: Progress | None = None, max_retries: int = 5,
                 backend_factory: Callable[[str, dict[str, Any]], Backend] | None = None,
                 argv: str = "", reuse: bool = True, namespace: str | None = None,
                 max_failures: int = 0, input_data: pa.Table | None = None, sample: int | None = None,
                 seed: int = 0, on: str = "local", ray_address: str | None = None) -> None:
        """`namespace` names where the run's tables become the latest (default: the pipeline's
        name); a run with more than `max_failures` failed calls ends `failed` and does not.
        `on="ray"`: prompt-stage calls the cache lacks run on a Ray cluster (retort.cluster)."""
        assert mode in ("run", "plan", "validate")
        self.ws, self.spec, self.src, self.cache = workspace, pipeline, source, cache
        self.mode, self.dry = mode, mode != "run"
        self.input_path, self.limit = input_path, limit
        self.input_data = input_data  # rows given in memory (the Python API) instead of a file
        self.sample, self.seed = sample, seed  # a seeded random subset of the input rows
        self.columns = {**pipeline.input.columns, **(columns or {})}
        self.progress = progress or Progress()
        self.argv = argv
        self.namespace = namespace or pipeline.name or "pipeline"
        self.max_failures = max_failures
        self._began = time.monotonic()
        self.models = Models(pipeline, source, workspace, targets=model_targets, factory=backend_factory)
        self.ctx = Context(workspace, pipeline, source, cache, self.models, self.progress, self.dry, max_retries)
        self.reuse = Reuse(self.ctx, reuse and mode == "run")
        self.on, self.ray_address = on, ray_address
        self.run_id: int | None = None
        self.spec_dir = Path(source.file).resolve().parent.parent
        # The spec's file as one string however it was named (`p`, `pipelines/p.yaml`, an absolute path),
        # so the up-to-date check knows it is the same pipeline.
        self.spec_path = str(Path(source.file).resolve()) if Path(source.file).exists() else source.file

    def model_config(self, name: str) -> dict[str, Any]:
        """The settings model `name` runs with in this run (the spec's, with `--model` over them)."""
        return self.models.config(name)

    async def execute(self) -> RunResult:
        """The run lifecycle: nothing to do (up to date); or pre-flight and input, then a run record,
        the stages in order, and the record closed with its status. Only a complete run (`ok`)
        becomes the latest; a run that fails before it starts leaves no record at all."""
        started = time.monotonic()
        result = RunResult(None, self.spec.name or "pipeline", str(self.cache.path),
                           fingerprints=self.reuse.prints)
        try:
            if self.reuse.enabled and self.reuse.up_to_date(result, self.namespace, self.spec_path, self._input[2],
                                                           self._fingerprint):
                result.seconds = time.monotonic() - started
                return result
            self._began = started
            # Before any record: an unreachable model or a missing key changes nothing.
            if self.on == "ray" and self.mode == "run":  # Ray installed? Its workers load local/vllm models
                self.ctx.ray = cluster.RayCluster(cluster.RayOptions(address=self.ray_address))
            await self.models.preflight(here=not self.dry and self.ctx.ray is None)
            self.reuse.load(["input", *(s.name for s in self.spec.stages)])
            source = self._read_input()
            path, limit, _ = self._input
            result.input = {"path": str(path.resolve()) if self.input_data is None else str(path),
                            "sha256": self.input_sha256, "limit": limit}
            if self.mode == "run":
                self._start(result)
            await self._stages(result, source)
        finally:
            result.seconds = time.monotonic() - started
            await self.models.aclose()
            if self.ctx.ray is not None:
                self.ctx.ray.close()
        return result

    def _start(self, result: RunResult) -> None:
        text = Path(self.src.file).read_bytes() if Path(self.src.file).is_file() else b""
        spec_hash = hashlib.sha256(text + self.spec.model_dump_json().encode()).hexdigest()[:16]
        # Held open while stages are only reused (views): a wholly reused rerun commits once.
        self.run_id = self.cache.start_run(result.pipeline, self.spec_path, spec_hash, self.argv,
                                           namespace=self.namespace, hold=self.reuse.enabled)
        result.run_id = self.ctx.run_id = self.run_id
        self.ctx.schema = f"run_{self.run_id}"

    async def _stages(self, result: RunResult, source: pa.Table | None) -> None:
        # Bare table names in SQL stages and where: filters mean this run's tables, then the records.
        self.cache.search_path(self.ctx.schema, "main")
        try:
            self._write_input(source)
            ticker = asyncio.create_task(self._tick())
            try:
                for stage in self.spec.stages:
                    stats = StageStats(stage.name, getattr(stage, "kind", "?"))
                    result.stages.append(stats)
                    begun = time.monotonic()
                    try:
                        await self._build(stage, stats)
                    except (SpecError, TemplateError, DatasetError, NotFoundError, CacheError):
                        raise
                    except RetortError as exc:
                        if not isinstance(stage, PythonStage):
                            raise
                        stats.error = str(exc)
                        if not self.dry:  # a plan records nothing
                            self.cache.add_failure(self.run_id or 0, stage.name, None, None, str(exc))
                    stats.seconds = time.monotonic() - begun
                    self.progress.stage_finished(stats)
                    self.cache.maybe_flush()  # raises if the group commit keeps failing
            finally:
                ticker.cancel()
            result.status = "ok" if result.failures <= self.max_failures else "failed"
        except BaseException as exc:
            result.status = "interrupted" if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)) \
                else "error"
            raise
        finally:
            self.cache.search_path("main")
            if self.run_id is not None:
                result.seconds = time.monotonic() - self._began
                self.cache.finish_run(self.run_id, result.status, result.to_dict(),
                                      ["input", *(s.name for s in self.spec.stages)], self.namespace)
            else:
                self.cache.flush()

    def _fingerprint(self, stage: Any) -> str | None:
        """What the up-to-date check compares: the fingerprint the stage's table would have now."""
        parts = executor(stage).parts(self.ctx, stage, StageStats(stage.name, getattr(stage, "kind", "?")))
        return None if parts is None else self.reuse.fingerprint(stage, *parts)

    async def _build(self, stage: Any, stats: StageStats) -> None:
        """The stage's table: linked to an earlier build with the same fingerprint, else built."""
        parts, fingerprint = executor(stage).parts(self.ctx, stage, stats), None
        if parts is not None:  # a model stage
            self.ctx.source_table(stage, stage.from_)  # its located error comes before any digest of it
            fingerprint = self.reuse.fingerprint(stage, *parts)
        if fingerprint and self.reuse.reused(stage, stats, fingerprint):
            return
        await executor(stage).run(self.ctx, stage, stats)
        if fingerprint:
            self.reuse.remember(stage, stats, fingerprint)

    async def _tick(self) -> None:
        while True:  # the group commit's clock: at least one flush a second
            await asyncio.sleep(0.25)
            self.cache.maybe_flush()

    @functools.cached_property
    def _input(self) -> tuple[Path, int | None, str | None]:
        """The input, the row limit this run reads, and their fingerprint (the same bytes, mapping and
        limit: the same input table; None without reuse). The content is hashed once, and its
        SHA-256 kept for the run's record (`input_sha256`: export manifests name it)."""
        limit = self.limit or self.spec.input.limit
        if self.mode == "validate":
            limit = min(limit or 5, 5)
        self.input_sha256: str | None = None
        if self.input_data is not None:
            path, kind = Path("<rows given in memory>"), "arrow"
            if self.dry:
                return path, limit, None
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.input_data.schema) as writer:
                writer.write_table(self.input_data)
            content = hashlib.sha256(sink.getvalue()).hexdigest()
        else:
            path = self.ws.data(self.input_path or self.spec.input.path, base=self.spec_dir)
            kind = path.suffix.lower()
            if self.dry or not path.is_file():
                return path, limit, None
            with path.open("rb") as f:
                content = hashlib.file_digest(f, "sha256").hexdigest()
        self.input_sha256 = content
        if not self.reuse.enabled:
            return path, limit, None
        return path, limit, hashlib.sha256(orjson.dumps(
            [engine_digest(), "input", content, kind, self.columns, limit, self.sample, self.seed])).hexdigest()

    def _read_input(self) -> pa.Table | None:
        """The input rows, mapped, read before the run starts (a bad file or mapping makes no run);
        None when an earlier build of the same input can be linked instead."""
        path, limit, fingerprint = self._input
        self.ctx.input_has = "the input rows have" if self.input_data is not None else f"{path} has"
        if fingerprint and ("input", fingerprint) in self.reuse.builds:
            return None
        if self.input_data is not None:
            data = self.input_data.slice(0, limit) if limit else self.input_data
        else:
            data = read_table(path, limit)
        ids = pa.array([str(i) for i in range(data.num_rows)], pa.string())  # the row's place in the file
        if self.sample is not None and self.sample < data.num_rows:
            keep = sorted(random.Random(self.seed).sample(range(data.num_rows), self.sample))
            data, ids = data.take(keep), ids.take(keep)
        data = data.append_column("_id", ids)
        if not self.columns:
            return data
        kept = [c for c in data.column_names if c not in self.columns]
        select = [quote(c) for c in kept]
        for target, expr in self.columns.items():
            select.append(f"{quote(expr) if expr in data.column_names else expr} AS {quote(target)}")
        try:  # the mapping's expressions are pasted into a query: the store runs it only as one SELECT
            return self.cache.select(f"SELECT {', '.join(select)} FROM _source", _source=data)
        except (duckdb.Error, NotReadOnly) as exc:
            raise SpecError(f"column mapping does not apply to {path} "
                            f"(columns: {', '.join(data.column_names[:-1])}): {first_line(exc)}",
                            file=self.src.file, line=self.src.line(("input", "columns")),
                            field="input.columns") from None

    def _write_input(self, data: pa.Table | None) -> None:
        fingerprint = self._input[2]
        if data is None:
            assert fingerprint
            self.reuse.link("input", fingerprint)
            return
        self.cache.write_table(self.ctx.table("input"), data)
        if fingerprint:
            self.reuse.memo("input", fingerprint, {"rows_out": data.num_rows, "columns": data.column_names})
