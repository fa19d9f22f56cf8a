"""The Python API: what the CLI does, as functions that return results you can read.

    import retort
    result = retort.run("sse_cot", input=rows, models={"default": "openai:gpt-4o-mini"},
                        limit=100, set={"stages.classify.samples": 3})
    result.table("classify").to_pandas()     # or .to_arrow(), .to_polars(), .to_dataset(), .to_pylist()

`input` is a path, a list of dicts, a pandas or polars DataFrame, or an Arrow table (no
temporary file). Each call opens the workspace's DuckDB file, runs, and closes it, so the CLI
and a notebook can take turns. Inside a running event loop (Jupyter), the blocking functions
run the pipeline on a thread of their own; `await retort.arun(...)` does it on your loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from retort.errors import DatasetError, NotFoundError, UserError

T = TypeVar("T")
# A path, rows as dicts, an Arrow table, or a pandas or polars DataFrame (Any: neither is a dependency).
Input = Any
Models = Mapping[str, str | Mapping[str, Any]]  # a name → a target as `--model` takes it, or a model entry

@dataclass
class Table:
    """A stage table, read once from the store."""

    name: str
    arrow: pa.Table

    def to_arrow(self) -> pa.Table:
        return self.arrow

    def to_pylist(self) -> list[dict[str, Any]]:
        return list(self.arrow.to_pylist())

    def to_pandas(self) -> Any:
        return self.arrow.to_pandas()

    def to_polars(self) -> Any:
        import polars

        return polars.from_arrow(self.arrow)

    def to_dataset(self) -> Any:
        """A Hugging Face `datasets.Dataset` (pip install datasets)."""
        try:
            import datasets
        except ImportError:
            raise UserError("Table.to_dataset needs the `datasets` package: pip install datasets") from None
        return datasets.Dataset(self.arrow)

    def __len__(self) -> int:
        return int(self.arrow.num_rows)


@dataclass
class Result:
    """A finished run: its status, its counts and its tables (`table(name)`)."""

    run_id: int | None
    pipeline: str
    status: str
    up_to_date: bool
    db: Path
    stages: list[Any] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """What each Python stage returned as numbers, by stage."""
        return {s.name: s.metrics for s in self.stages if s.metrics}

    def failures(self) -> list[dict[str, Any]]:
        """This run's failed calls and crashed stages: row_id, stage, error, status."""
        from retort.cache import Cache

        if self.run_id is None:
            return []
        cache = Cache(self.db, read_only=True)
        try:
            return [{k: f[k] for k in ("row_id", "stage", "error", "status")} for f in cache.failures(self.run_id)]
        finally:
            cache.close()

    def table(self, stage: str) -> Table:
        """This run's table `stage` (a stage's extra tables: `stage__suffix`)."""
        from retort.cache import Cache

        if self.run_id is None:
            raise NotFoundError(f"{self.pipeline}: this was not a run, it has no tables")
        cache = Cache(self.db, read_only=True)
        try:
            relation, _, _ = cache.resolve(stage, self.run_id)
            return Table(stage, cache.table(relation))
        finally:
            cache.close()


def run(pipeline: str | Path, *, input: Input | None = None, models: Models | None = None,
        limit: int | None = None, sample: int | None = None, seed: int = 0, set: Mapping[str, Any] | None = None,
        map: Mapping[str, str] | None = None,
        until: str | None = None, workspace: str | Path = ".", db: str | Path | None = None, reuse: bool = True,
        max_failures: int = 0, retries: int = 5, progress: bool = False, on: str = "local",
        ray_address: str | None = None) -> Result:
    """Run a pipeline (a name in the workspace or the built-in library, or a YAML path) and
    return its result. `until` stops after that stage (what follows it does not run).
    `on="ray"` makes the calls the cache lacks on a Ray cluster (`ray_address`; docs/ray.md)."""
    return _blocking(arun(pipeline, input=input, models=models, limit=limit, sample=sample, seed=seed, set=set,
                          map=map, until=until,
                          workspace=workspace, db=db, reuse=reuse, max_failures=max_failures, retries=retries,
                          progress=progress, on=on, ray_address=ray_address))


async def arun(pipeline: str | Path, *, input: Input | None = None, models: Models | None = None,
               limit: int | None = None, sample: int | None = None, seed: int = 0,
               set: Mapping[str, Any] | None = None, map: Mapping[str, str] | None = None,
               until: str | None = None, workspace: str | Path = ".", db: str | Path | None = None,
               reuse: bool = True, max_failures: int = 0, retries: int = 5, progress: bool = False,
               on: str = "local", ray_address: str | None = None) -> Result:
    """`run`, awaited on the caller's event loop."""
    return await _execute("run", pipeline, input, models, limit, set, map, until, workspace, db, reuse,
                          max_failures, retries, progress, sample, seed, on=on, ray_address=ray_address)


def plan(pipeline: str | Path, *, input: Input | None = None, models: Models | None = None,
         limit: int | None = None, set: Mapping[str, Any] | None = None, map: Mapping[str, str] | None = None,
         until: str | None = None, workspace: str | Path = ".", db: str | Path | None = None) -> Result:
    """Rows, calls needed, cache hits and estimated tokens per stage (`result.stages`); nothing is
    called and nothing is written."""
    return _blocking(_execute("plan", pipeline, input, models, limit, set, map, until, workspace, db, False, 0, 0,
                              False))


def compare(spec: str | Path, *, models: Mapping[str, str] | None = None, limit: int | None = None,
            workspace: str | Path = ".", db: str | Path | None = None, retries: int = 5,
            progress: bool = False) -> Any:
    """Run a comparison spec (comparisons/NAME.yaml or a path) and return its scored result
    (`retort.comparison.Result`: per-strategy metrics, paired tests, costs)."""
    from retort.cache import Cache
    from retort.comparison import find_comparison, run_comparison
    from retort.workspace import Workspace

    ws = Workspace(workspace)
    path = find_comparison(ws, str(spec))

    def work() -> Any:
        cache = Cache(Path(db) if db else ws.db_path)
        try:
            return run_comparison(ws, path, cache, limit=limit, model_targets=dict(models or {}),
                                  max_retries=retries, progress=progress, log=lambda _: None)
        finally:
            cache.close()

    return _in_thread(work) if _loop_running() else work()


async def _execute(mode: str, pipeline: str | Path, input: Input | None, models: Models | None,
                   limit: int | None, overrides: Mapping[str, Any] | None, columns: Mapping[str, str] | None,
                   until: str | None, workspace: str | Path, db: str | Path | None, reuse: bool,
                   max_failures: int, retries: int, progress: bool, sample: int | None = None,
                   seed: int = 0, *, on: str = "local", ray_address: str | None = None) -> Result:
    from retort import backends
    from retort.cache import Cache
    from retort.runner import Progress, Runner
    from retort.spec import load_pipeline
    from retort.workspace import Workspace

    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive number of rows, not {value}")
    if on not in ("local", "ray"):
        raise UserError(f"on must be 'local' or 'ray', not {on!r}")
    ws = Workspace(workspace)
    spec, src = load_pipeline(ws.pipeline(str(pipeline)),
                              [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()])
    if until is not None:
        names = [s.name for s in spec.stages]
        if until not in names:
            raise NotFoundError(f"{src.file}: no stage {until!r} (stages: {', '.join(names)})")
        spec = spec.model_copy(update={"stages": spec.stages[: names.index(until) + 1]})
    targets = {name: dict(target) if isinstance(target, Mapping) else backends.parse_target(target)
               for name, target in (models or {}).items()}
    path, data = (str(input), None) if isinstance(input, (str, Path)) else (None, _arrow(input))
    cache = Cache(Path(db) if db else ws.db_path)
    shown: Any = None
    if progress:
        from retort.progress import RichProgress

        shown = RichProgress(enabled=True)
    try:
        runner = Runner(ws, spec, src, cache, mode=mode, input_path=path, input_data=data,
                        columns=dict(columns or {}), limit=limit, sample=sample, seed=seed, model_targets=targets,
                        progress=shown or Progress(), max_retries=retries, reuse=reuse, max_failures=max_failures,
                        argv=f"python: retort.{mode}({str(pipeline)!r})", on=on, ray_address=ray_address)
        runner.models.check_targets()
        if shown is not None:
            with shown:
                outcome = await runner.execute()
        else:
            outcome = await runner.execute()
    finally:
        cache.close()
    return Result(outcome.run_id, outcome.pipeline, outcome.status, outcome.up_to_date, cache.path,
                  outcome.stages, outcome.totals(), outcome.seconds)


def _arrow(rows: Input | None) -> pa.Table | None:
    """Rows given in memory as an Arrow table, without a temporary file."""
    if rows is None:
        return None
    if isinstance(rows, pa.Table):
        return rows
    if hasattr(rows, "to_arrow") and callable(rows.to_arrow):  # polars
        return rows.to_arrow()
    if type(rows).__module__.startswith("pandas"):
        return pa.Table.from_pandas(rows, preserve_index=False)
    if isinstance(rows, Sequence) and all(isinstance(r, Mapping) for r in rows):
        if not rows:
            raise DatasetError("input: no rows")
        from retort.datasets import table_from_rows

        try:
            return table_from_rows(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DatasetError(f"input: rows of inconsistent types: {exc}") from None
    raise UserError(f"input must be a path, a list of dicts, a pandas or polars DataFrame or an Arrow table, "
                    f"not {type(rows).__name__}")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to the end: on this thread, or on a thread of its own when this one already runs
    an event loop (a notebook), which it must not block with a second one."""
    if not _loop_running():
        return asyncio.run(coro)
    return _in_thread(lambda: asyncio.run(coro))


def _in_thread(fn: Any) -> Any:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retort-api") as pool:
        return pool.submit(fn).result()
