"""A pipeline as a LangChain `Runnable`, so it composes in LCEL.

    from retort.runnable import PipelineRunnable

    sse = PipelineRunnable("sse_cot", workspace=".", output_stage="classify")
    sse.invoke({"text": "a gripping, funny film"})         # → [{"text": ..., "classify": "positive", ...}]
    sse.batch([{"text": "..."}, {"text": "..."}])           # → one list of rows per input
    chain = RunnableLambda(lambda t: {"text": t}) | sse | RunnableLambda(lambda rows: rows[0]["classify"])

Input: a row (a dict) or a list of rows, in the pipeline's input columns; they replace
the pipeline's dataset (its `input.columns` mapping still applies, its `input.limit`
does not). Output: the rows of `output_stage` (default: the last stage) in input
order, without lineage columns unless `lineage=True`.

Every invocation is an ordinary run in the workspace's DuckDB file: recorded in
`runs`, its stage tables kept, every call cached, so invoking again on the same rows
makes no call. `batch` puts all its inputs in one run (full concurrency) and splits
the output rows by lineage; when the output stage's rows do not trace back to input
rows (an aggregate), each input runs on its own, and the calls still come from the cache.

Concurrency: DuckDB allows one writer per file, so runs on the same file are
serialized in this process by one lock per file: `invoke` waits on it, `ainvoke`
polls it without blocking the event loop. The file is opened for each run and
closed after, so the CLI can use it between invocations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from retort import api, backends
from retort.context import LINEAGE
from retort.errors import BackendError, NotFoundError, RetortError, UserError
from retort.spec import load_pipeline, parse_override
from retort.workspace import Workspace

try:  # an extra: retort[langchain]
    from langchain_core.language_models import BaseChatModel
    from langchain_core.runnables import Runnable, RunnableConfig
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "langchain_core":
        raise
    raise ModuleNotFoundError(backends.LANGCHAIN_MISSING, name=exc.name) from None

Row = dict[str, Any]
RowInput = Row | list[Row]
T = TypeVar("T")

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path.resolve()), threading.Lock())


def _target(target: str | dict[str, Any] | BaseChatModel) -> dict[str, Any]:
    """A model target: a CLI short form, `langchain:module:attr`, a config dict, or a chat model object."""
    if isinstance(target, BaseChatModel):
        return {"backend": "langchain", "factory": target}
    if isinstance(target, dict):
        return dict(target)
    if target.startswith("langchain:"):
        return {"backend": "langchain", "factory": target.removeprefix("langchain:")}
    return backends.parse_target(target)


def _order(row_id: Any) -> tuple[int, ...] | None:
    """`"12.3"` → (12, 3): input order, then sample. None when the id is not lineage (`stage:4`, missing)."""
    if not isinstance(row_id, str):
        return None
    parts = row_id.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


class _Failure(NamedTuple):
    order: tuple[int, ...] | None  # the failed row's lineage id, when it has one
    error: str
    status: int | None


class _Unattributable(Exception):
    """The output stage's rows do not trace back to input rows (batch falls back to one run per input)."""


class PipelineRunnable(Runnable[RowInput, list[Row]]):
    """A retort pipeline as a `Runnable[dict | list[dict], list[dict]]`; see the module docstring."""

    def __init__(self, pipeline: str | Path, workspace: str | Path | Workspace = ".", *,
                 output_stage: str | None = None,
                 model_targets: dict[str, str | dict[str, Any] | BaseChatModel] | None = None,
                 db: str | Path | None = None, lineage: bool = False, overrides: Sequence[str] = (),
                 max_failures: int = 0, max_retries: int = 5, name: str | None = None) -> None:
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.path = self.workspace.pipeline(str(pipeline))
        self.overrides = dict(_override(text) for text in overrides)
        spec, _ = load_pipeline(self.path, list(overrides))  # a broken spec fails here, not at the first invoke
        stages = [s.name for s in spec.stages]
        self.output_stage = output_stage or stages[-1]
        if self.output_stage not in stages:
            raise NotFoundError(f"{self.path}: no stage {self.output_stage!r} (stages: {', '.join(stages)})")
        self.model_targets = {model: _target(t) for model, t in (model_targets or {}).items()}
        self.db_path = Path(db) if db else self.workspace.db_path
        self.lineage = lineage
        self.max_failures = max_failures
        self.max_retries = max_retries
        self.name = name or f"PipelineRunnable[{spec.name or self.path.stem}]"

    def __repr__(self) -> str:
        return f"PipelineRunnable({str(self.path)!r}, output_stage={self.output_stage!r}, db={str(self.db_path)!r})"

    # --- the Runnable interface -------------------------------------------------------------

    def invoke(self, input: RowInput, config: RunnableConfig | None = None, **kwargs: Any) -> list[Row]:
        return self._call_with_config(lambda x: self._sync(lambda: self._arun_one(x)), input, config)

    async def ainvoke(self, input: RowInput, config: RunnableConfig | None = None, **kwargs: Any) -> list[Row]:
        return await self._acall_with_config(self._aone, input, config)

    def batch(self, inputs: list[RowInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[list[Row]]:
        def many(items: list[RowInput]) -> list[Exception | list[Row]]:
            return self._sync(lambda: self._arun_many(items))

        return self._batch_with_config(many, inputs, config, return_exceptions=return_exceptions)

    async def abatch(self, inputs: list[RowInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[list[Row]]:
        async def many(items: list[RowInput]) -> list[Exception | list[Row]]:
            async with _Held(_lock_for(self.db_path)):
                return await self._arun_many(items)

        return await self._abatch_with_config(many, inputs, config, return_exceptions=return_exceptions)

    # --- runs ---------------------------------------------------------------------------------

    async def _aone(self, input: RowInput) -> list[Row]:
        async with _Held(_lock_for(self.db_path)):
            return await self._arun_one(input)

    def _sync(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine to completion under the file's lock, from sync code (a running loop: in a thread)."""
        with _lock_for(self.db_path):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(make())
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # invoke() from async code: do not nest loops
                return pool.submit(lambda: asyncio.run(make())).result()

    async def _arun_one(self, input: RowInput) -> list[Row]:
        rows = _rows(input)
        if not rows:
            return []
        result, out, failed = await self._run(rows)
        self._raise_on_failures(result, failed)
        return self._present(out)

    async def _arun_many(self, inputs: list[RowInput]) -> list[Exception | list[Row]]:
        """One run for every input; split the output rows by their input row. Fallback: one run per input."""
        groups = [_rows(x) for x in inputs]
        rows = [r for g in groups for r in g]
        if not rows:
            return [[] for _ in groups]
        owner = [i for i, g in enumerate(groups) for _ in g]  # input row → which input it came from
        result, out, failed = await self._run(rows)
        try:
            split: list[list[Row]] = [[] for _ in groups]
            for row in out:
                split[owner[self._root(row, len(rows))]].append(row)
        except _Unattributable:
            results: list[Exception | list[Row]] = []
            for group in groups:
                try:
                    results.append(await self._arun_one(group))
                except RetortError as exc:
                    results.append(exc)
            return results
        if _failures(result) <= self.max_failures:
            return [self._present(part) for part in split]
        error = self._failure_error(result, failed)
        roots = [f.order[0] if f.order and f.order[0] < len(owner) else None for f in failed]
        bad = {owner[i] for i in roots if i is not None}
        if None in roots or not bad:  # a failure no input row owns (a stage error): every input shares it
            return [error for _ in groups]
        return [error if i in bad else self._present(split[i]) for i in range(len(groups))]

    def _root(self, row: Row, n: int) -> int:
        order = _order(row.get("_id"))
        if order is None or order[0] >= n:
            raise _Unattributable
        return order[0]

    async def _run(self, rows: list[Row]) -> tuple[api.Result, list[Row], list[_Failure]]:
        """A normal cached run over `rows` (in memory, up to the output stage): (result, output rows in
        input order, failures)."""
        result = await api.arun(self.path, input=rows, models=self.model_targets, limit=len(rows),
                                set=self.overrides, until=self.output_stage, workspace=self.workspace.root,
                                db=self.db_path, max_failures=self.max_failures, retries=self.max_retries)
        assert result.run_id is not None
        try:
            data = result.table(self.output_stage).to_pylist()
        except NotFoundError:
            if not result.totals.get("failures") and not any(s.error for s in result.stages):
                raise RetortError(f"run {result.run_id} of {self.path.name} produced no table "
                                  f"{self.output_stage!r}") from None
            data = []  # the stage that failed is reported by the caller
        failed = [_Failure(_order(f["row_id"]), f["error"], f["status"]) for f in result.failures()]
        # Input order, then sample order; rows without a lineage id keep their table order, last.
        keyed = sorted(enumerate(data), key=lambda item: (_order(item[1].get("_id")) is None,
                                                           _order(item[1].get("_id")) or (), item[0]))
        return result, [row for _, row in keyed], failed

    def _present(self, rows: list[Row]) -> list[Row]:
        return rows if self.lineage else [{k: v for k, v in row.items() if k not in LINEAGE} for row in rows]

    def _raise_on_failures(self, result: api.Result, failed: list[_Failure]) -> None:
        if _failures(result) > self.max_failures:
            raise self._failure_error(result, failed)

    def _failure_error(self, result: api.Result, failed: list[_Failure]) -> RetortError:
        where = f"run {result.run_id} of {self.path.name}"
        stage_errors = [s for s in result.stages if s.error]
        if stage_errors:
            return RetortError(f"{where}: stage {stage_errors[0].name} failed: {stage_errors[0].error}")
        first = failed[0] if failed else _Failure(None, "unknown failure", None)
        return BackendError(f"{_failures(result)} failed call(s) in {where}, more than max_failures="
                            f"{self.max_failures}; first: {first.error} (see `retort show failures`)",
                            status=first.status)


def _override(text: str) -> tuple[str, Any]:
    keys, value = parse_override(text)
    return ".".join(keys), value


def _rows(input: RowInput) -> list[Row]:
    if isinstance(input, dict):
        rows = [input]
    elif isinstance(input, list) and all(isinstance(r, dict) for r in input):
        rows = input
    else:
        raise UserError(f"a pipeline takes a row (a dict) or a list of rows, not {type(input).__name__}")
    # Lineage columns of an earlier pipeline's output would collide with this run's own.
    return [{k: v for k, v in r.items() if k not in LINEAGE} for r in rows]


def _failures(result: api.Result) -> int:
    """Failed calls and crashed stages, as `retort run` counts them against --max-failures."""
    return int(result.totals.get("failures", 0)) + sum(1 for s in result.stages if s.error)


class _Held:
    """Hold a threading.Lock from async code: poll it, so the event loop keeps running while waiting.

    A thread blocked in `acquire` would hold an executor thread that the run holding the lock
    may need (LangChain runs sync chat models in the default executor), and an asyncio.Lock
    binds to one event loop and does not exclude threads.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        delay = 0.005
        while not self.lock.acquire(blocking=False):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
