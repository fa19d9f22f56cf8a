"""The runner: executes a pipeline's stages in order against the cache.

Every backend is wrapped here the same way: cache look-up, per-model
concurrency (a pool of `max_concurrency` workers), retries with tenacity,
accounting. Three modes share this one code path:

    run       calls what is not cached and writes the stage tables of run N
    plan      (dry) looks up the cache, counts the calls still needed, calls nothing
    validate  (dry, in-memory cache, a few rows) renders every template, binds every
              SQL stage, resolves every model, prompt and evaluator

Prompt stages stream their input in chunks: render, hash, one batched cache
look-up per chunk, then the misses go to the model's workers through a bounded
queue. Output rows and calls are group-committed by the cache. A model stage whose
fingerprint (see `_fingerprint`) matches an earlier failure-free build is not run at
all: its table becomes a view onto that build's rows.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import orjson
import pyarrow as pa
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from retort import __version__, backends, costs
from retort.backends.base import Backend, Completion, Request
from retort.cache import Cache, call_key, create, quote, request_base
from retort.datasets import read_table, table_from_rows
from retort.errors import (
    BackendError,
    CacheError,
    DatasetError,
    NotFoundError,
    ParseError,
    RetortError,
    SpecError,
    TemplateError,
)
from retort.limits import Limiter
from retort.parsers import Parser, build_parser
from retort.spec import EmbedStage, ModelSpec, Pipeline, PromptStage, PythonStage, Source, SqlStage, with_params
from retort.sql import NotReadOnly, check_select, first_line, literal
from retort.sql import render as render_sql
from retort.templates import Template, environment
from retort.workspace import Workspace

T = TypeVar("T")
A = TypeVar("A")
CHUNK_ROWS = 4096
EMBED_BATCH = 64  # texts per embeddings request
NOT_CACHED = "not cached (dry run)"  # a plan's placeholder output, so downstream row counts stay right
LINEAGE = ("_id", "_parent", "_sample", "_call", "_raw", "_error")


@dataclass
class StageStats:
    name: str
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    calls_needed: int = 0  # samples this stage needs (cached or not)
    cache_hits: int = 0
    calls_made: int = 0  # samples completed by a backend in this run
    failures: int = 0
    parse_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    est_prompt_tokens: int = 0  # plan: tokens the missing calls will send
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, float] | None = None  # what a Python stage returned as a dict (also in `metrics`)
    reused_from: int | None = None  # the run that built this stage's rows, reused as they are (same fingerprint)
    model: str | None = None  # model stages: the pipeline's name for the model
    est_completion_tokens: int = 0  # plan: completion tokens the missing calls will produce
    completion_basis: str | None = None  # plan: where that estimate comes from (history, max_tokens, a default)
    cost_usd: float | None = None  # run: USD of the calls made; plan: estimated USD of the calls to make
    template: str | None = None  # prompt stages: SHA-256 of the template and all it includes (export manifests)
    parser: str | None = None  # prompt stages: SHA-256 of the parser's identity (export manifests)

    completed: int = 0  # samples whose row slot is settled (hit, call, shared in-flight call, or failure)

    @property
    def done(self) -> int:
        return self.completed


@dataclass
class RunResult:
    run_id: int | None
    pipeline: str
    db_path: str
    stages: list[StageStats] = field(default_factory=list)
    seconds: float = 0.0
    status: str = "ok"
    up_to_date: bool = False  # nothing changed since run `run_id`: no new run was made (see Runner._up_to_date)
    # table → [fingerprint, content digest], for the input and every model stage that can be reused
    fingerprints: dict[str, list[str]] = field(default_factory=dict)
    input: dict[str, Any] | None = None  # the input file read: path, sha256 of its bytes, limit (export manifests)

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.stages) + sum(1 for s in self.stages if s.error)

    @property
    def cost_usd(self) -> float | None:
        """USD of the calls made (a plan: of the calls to make); None when a stage that spends has no price."""
        spending = [s for s in self.stages if s.model and (s.calls_made or s.calls_needed - s.cache_hits)]
        if any(s.cost_usd is None for s in spending):
            return None
        return sum(s.cost_usd or 0.0 for s in spending)

    def totals(self) -> dict[str, int]:
        keys = ("calls_needed", "cache_hits", "calls_made", "failures", "parse_errors", "prompt_tokens",
                "completion_tokens")
        return {k: sum(getattr(s, k) for s in self.stages) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "pipeline": self.pipeline, "db_path": self.db_path,
                "seconds": round(self.seconds, 3), "status": self.status, "up_to_date": self.up_to_date,
                **self.totals(), "cost_usd": self.cost_usd, "stages": [asdict(s) for s in self.stages],
                "fingerprints": self.fingerprints,
                "input": self.input}


class Progress:
    """What the runner reports as it goes; the CLI draws it with rich."""

    def stage_started(self, stats: StageStats, total: int | None) -> None: ...
    def advance(self, stats: StageStats) -> None: ...
    def stage_finished(self, stats: StageStats) -> None: ...
    def waiting(self, stats: StageStats, seconds: float, reason: str) -> None:
        """A call of this stage waits `seconds` (at least LONG_WAIT) before its retry, because of `reason`."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.retryable


def _backoff(state: Any) -> float:
    """Exponential backoff with full jitter, but never sooner than the server's Retry-After."""
    exc = state.outcome.exception() if state.outcome else None
    after = getattr(exc, "retry_after", None) or 0.0
    return max(after, random.uniform(0, min(30.0, 0.5 * 2 ** state.attempt_number)))


async def call_with_retries(fn: Callable[[A], Awaitable[T]], arg: A, limiter: Limiter, max_retries: int,
                            estimate: float = 0.0, tokens: Callable[[T], float] | None = None,
                            on_wait: Callable[[float, str], None] | None = None) -> T:
    """One model call, `fn(arg)`, as every backend gets it: through the model's limiter, retried with tenacity.

    The first try runs inline (the hot path: no closure, no tenacity); a retryable failure
    (429, 5xx, timeout, connection) is retried with exponential backoff and jitter, never
    sooner than Retry-After. A Retry-After above the model's `max_retry_after` fails the call
    at once with the server's words (a day's wait is not a retry). Every try passes the
    limiter: a 429 halves the model's concurrency and token budgets settle on real usage
    (`tokens(result)`). A wait of LONG_WAIT or more is told to `on_wait(seconds, reason)`.
    """
    try:
        return await _attempt(fn, arg, limiter, estimate, tokens)
    except BackendError as exc:
        if not _capped(exc, limiter.max_retry_after).retryable or max_retries <= 0:
            raise
        first_wait = max(exc.retry_after or 0.0, random.uniform(0, 0.5))
        if on_wait is not None and first_wait >= LONG_WAIT:
            on_wait(first_wait, str(exc))
    await asyncio.sleep(first_wait)
    async for retry in AsyncRetrying(stop=stop_after_attempt(max_retries), wait=_backoff,
                                     retry=retry_if_exception(_retryable), reraise=True,
                                     before_sleep=lambda state: _announce(on_wait, state)):
        with retry:
            try:
                return await _attempt(fn, arg, limiter, estimate, tokens)
            except BackendError as exc:
                raise _capped(exc, limiter.max_retry_after) from None
    raise AssertionError("unreachable")


LONG_WAIT = 3.0  # seconds: a retry's wait at least this long shows in the progress


def _capped(exc: BackendError, cap: float) -> BackendError:
    """`exc`, made final when the server asks for a wait above `cap` (its message and status kept)."""
    if exc.retryable and exc.retry_after is not None and exc.retry_after > cap:
        exc.retryable = False
        exc.args = (f"{exc} (Retry-After {exc.retry_after:,.0f}s is above max_retry_after {cap:g}s: "
                    "not retried)",)
    return exc


def _announce(on_wait: Callable[[float, str], None] | None, state: Any) -> None:
    """tenacity's before_sleep: tell `on_wait` of a long wait before the next try."""
    if on_wait is not None and state.next_action is not None and state.next_action.sleep >= LONG_WAIT:
        on_wait(state.next_action.sleep, str(state.outcome.exception()))


async def _attempt(fn: Callable[[A], Awaitable[T]], arg: A, limiter: Limiter, estimate: float,
                   tokens: Callable[[T], float] | None) -> T:
    if not limiter.try_acquire(estimate):
        await limiter.acquire(estimate)
    try:
        result = await fn(arg)
    except BackendError as exc:
        limiter.release(ok=False, throttled=exc.status == 429, estimated=estimate, used=estimate)
        raise
    except BaseException:
        limiter.release(ok=False, estimated=estimate, used=estimate)
        raise
    limiter.release(ok=True, estimated=estimate, used=tokens(result) if tokens else None)
    return result


def _completion_tokens(completion: Completion) -> float:
    return completion.prompt_tokens + completion.completion_tokens


class _Job:
    """One input row of a prompt stage: its samples fill in from the cache or from calls."""

    __slots__ = ("base", "keys", "messages", "model", "open", "results", "row", "row_id")

    def __init__(self, row: dict[str, Any], row_id: str, messages: list[dict[str, str]], base: bytes,
                 model: str, samples: int) -> None:
        self.row, self.row_id, self.messages, self.base, self.model = row, row_id, messages, base, model
        self.keys = [call_key(base, i) for i in range(samples)]  # first attempts; a re-ask hashes its own
        # per sample: (call key, raw text, error or None, parsed columns)
        self.results: list[tuple[str, str, str | None, dict[str, Any]] | None] = [None] * samples
        self.open = samples


class Runner:
    def __init__(self, workspace: Workspace, pipeline: Pipeline, source: Source, cache: Cache, *,
                 mode: str = "run", input_path: str | None = None, columns: dict[str, str] | None = None,
                 limit: int | None = None, model_targets: dict[str, dict[str, Any]] | None = None,
                 progress: Progress | None = None, max_retries: int = 5,
                 backend_factory: Callable[[str, dict[str, Any]], Backend] | None = None,
                 argv: str = "", reuse: bool = True, namespace: str | None = None,
                 max_failures: int = 0, input_data: pa.Table | None = None, sample: int | None = None,
                 seed: int = 0) -> None:
        """`namespace` names where the run's tables become the latest (default: the pipeline's
        name); a run with more than `max_failures` failed calls ends `failed` and does not."""
        assert mode in ("run", "plan", "validate")
        self.ws, self.spec, self.src, self.cache = workspace, pipeline, source, cache
        self.mode, self.dry = mode, mode != "run"
        self.input_path, self.limit = input_path, limit
        self.input_data = input_data  # rows given in memory (the Python API) instead of a file
        self.sample, self.seed = sample, seed  # a seeded random subset of the input rows
        self.columns = {**pipeline.input.columns, **(columns or {})}
        self.model_targets = model_targets or {}
        self.progress = progress or Progress()
        self.max_retries = max_retries
        self.backend_factory = backend_factory or (lambda name, config: backends.create(name, config, workspace))
        self.argv = argv
        self.reuse = reuse and mode == "run"
        self.namespace = namespace or pipeline.name or "pipeline"
        self.max_failures = max_failures
        self._began = time.monotonic()
        self._digests: dict[str, str] = {}  # table → content digest, computed when a fingerprint needs it
        self._builds: dict[tuple[str, str], tuple[int, int, str]] = {}  # (stage, fingerprint) → an earlier build
        self._known: dict[str, list[str]] = {}  # columns of the tables this run reused
        self._prints: dict[str, list[str]] = {}  # RunResult.fingerprints
        self._backends: dict[str, Backend] = {}
        self._limiters: dict[str, Limiter] = {}
        self._env: Any = None  # the workspace's Jinja environment, made on first use
        self._completion: dict[str, float] = {}  # plan: expected completion tokens per call, by stage
        self.run_id: int | None = None
        self.schema = "temp"
        self.spec_dir = Path(source.file).resolve().parent.parent
        # The spec's file as one string however it was named (`p`, `pipelines/p.yaml`, an absolute path),
        # so the up-to-date check knows it is the same pipeline.
        self.spec_path = str(Path(source.file).resolve()) if Path(source.file).exists() else source.file

    # ------------------------------------------------------------ models

    def model_config(self, name: str) -> dict[str, Any]:
        target = self.model_targets.get(name) or self.model_targets.get("*")
        try:
            spec = self.spec.model_for(name)
        except KeyError:
            if target is None:
                raise NotFoundError(f"{self.src.file}: no model named {name!r} "
                                    f"(models: {', '.join(self.spec.models) or 'default'})") from None
            spec = ModelSpec()
        config = spec.model_dump(exclude_none=True)
        if target:
            if target.get("backend") != config.get("backend"):  # another backend: only the served name carries
                keep = ("model",) if target.get("backend") in ("openai", "vllm") else ()
                config = {k: v for k, v in config.items() if k in keep}
            elif "base_url" in target:  # another endpoint: the spec's key is not sent to it
                config.pop("api_key_env", None)
            config.update(target)
        config.setdefault("backend", "local")
        config["name"] = name
        return config

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            config = self.model_config(name)
            self._backends[name] = backend = self.backend_factory(name, config)
            self._limiters[name] = Limiter(int(backend.max_concurrency or 1), config.get("rpm"), config.get("tpm"),
                                           config.get("max_retry_after"))
        return self._backends[name]

    def limiter(self, name: str) -> Limiter:
        self.backend(name)
        return self._limiters[name]

    def models_used(self) -> set[str]:
        names = set()
        for stage in self.spec.stages:
            if isinstance(stage, (PromptStage, EmbedStage)) and isinstance(stage.model, str):
                names.add(stage.model)
        return names

    async def preflight(self) -> None:
        """Fail fast, before any work, on an endpoint that refuses connections."""
        for name in sorted(self.models_used()):
            if self.dry and self.model_config(name).get("backend") in ("local", "vllm"):
                continue  # checking would load the weights; a plan or validate never calls them
            backend = self.backend(name)
            served = await backend.check()
            if hasattr(backend, "use_model"):  # an endpoint named without a model: the one it serves
                backend.use_model(served)
            model = getattr(backend, "model", None)
            if served and model and model not in served:  # /v1/models answered: the name must be there
                urls = ", ".join(getattr(backend, "base_urls", []))
                raise NotFoundError(f"model {name!r}: {urls} does not serve {model!r} "
                                    f"(it serves: {', '.join(served[:10])})")

    # ------------------------------------------------------------ run

    async def execute(self) -> RunResult:
        """The run lifecycle: nothing to do (up to date); or pre-flight and input, then a run record,
        the stages in order, and the record closed with its status. Only a complete run (`ok`)
        becomes the latest; a run that fails before it starts leaves no record at all."""
        started = time.monotonic()
        result = RunResult(None, self.spec.name or "pipeline", str(self.cache.path), fingerprints=self._prints)
        try:
            if self.reuse and self._up_to_date(result):
                result.seconds = time.monotonic() - started
                return result
            self._began = started
            await self.preflight()  # before any record: an unreachable model or a missing key changes nothing
            if self.reuse:
                self._builds = self.cache.builds(["input", *(s.name for s in self.spec.stages)])
            source = self._read_input()
            path, limit, _ = self._input
            result.input = {"path": str(path.resolve()) if self.input_data is None else str(path),
                            "sha256": self.input_sha256, "limit": limit}
            if self.mode == "run":
                self._start(result)
            await self._stages(result, source)
        finally:
            result.seconds = time.monotonic() - started
            await self._close_backends()
        return result

    def _start(self, result: RunResult) -> None:
        text = Path(self.src.file).read_bytes() if Path(self.src.file).is_file() else b""
        spec_hash = hashlib.sha256(text + self.spec.model_dump_json().encode()).hexdigest()[:16]
        # Held open while stages are only reused (views): a wholly reused rerun commits once.
        self.run_id = self.cache.start_run(result.pipeline, self.spec_path, spec_hash, self.argv,
                                           namespace=self.namespace, hold=self.reuse)
        result.run_id = self.run_id
        self.schema = f"run_{self.run_id}"

    async def _stages(self, result: RunResult, source: pa.Table | None) -> None:
        # Bare table names in SQL stages and where: filters mean this run's tables, then the records.
        self.cache.con.execute(f"SET search_path = '{self.schema},main'")
        try:
            self._write_input(source)
            ticker = asyncio.create_task(self._tick())
            try:
                for stage in self.spec.stages:
                    stats = StageStats(stage.name, getattr(stage, "kind", "?"))
                    result.stages.append(stats)
                    begun = time.monotonic()
                    try:
                        await self._run_stage(stage, stats)
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
            self.cache.con.execute("SET search_path = 'main'")
            if self.run_id is not None:
                result.seconds = time.monotonic() - self._began
                self.cache.finish_run(self.run_id, result.status, result.to_dict(),
                                      ["input", *(s.name for s in self.spec.stages)], self.namespace)
            else:
                self.cache.flush()

    async def _close_backends(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()

    def _up_to_date(self, result: RunResult) -> bool:
        """Whether there is nothing to do, as make says: the latest run of this namespace (the
        pipeline's name) finished complete, and its input and every stage have the
        fingerprints they would have now. Then `result` becomes that run's, with no write and no
        call. Only pipelines of model stages can be up to date: SQL and Python stages always run.
        """
        model_stages = [s for s in self.spec.stages if isinstance(s, (PromptStage, EmbedStage))]
        latest = self.cache.latest_run(self.namespace)
        if latest is None or len(model_stages) < len(self.spec.stages):
            return False
        run_id, pipeline, spec_path, status, record = latest
        if (status, pipeline, spec_path) != ("ok", result.pipeline, self.spec_path) or not record:
            return False
        before = orjson.loads(record)
        prints, stages = before.get("fingerprints") or {}, before.get("stages") or []
        names = [s.name for s in model_stages]
        if [s.get("name") for s in stages] != names or any(s.get("failures") or s.get("error") for s in stages) \
                or not self.cache.tables_exist(f"run_{run_id}", ["input", *names]):
            return False

        def same(name: str, fingerprint: str | None) -> bool:
            known = prints.get(name)
            if fingerprint is None or not known or fingerprint != known[0]:
                return False
            self._digests[name] = known[1]  # what the next stage's fingerprint reads
            return True

        # In order: a stage's fingerprint needs the digest of its `from` table.
        if not (same("input", self._input[2]) and all(
                s.from_ in self._digests and same(s.name, self._stage_fingerprint(s)) for s in model_stages)):
            self._digests.clear()  # a normal run computes its own
            return False
        result.run_id, result.up_to_date = run_id, True
        self._prints.update(prints)
        for saved in stages:
            stats = StageStats(saved["name"], saved["kind"])
            self._stand_in(stats, saved, saved.get("reused_from") or run_id)
            result.stages.append(stats)
            self.progress.stage_finished(stats)
        return True

    async def _tick(self) -> None:
        while True:  # the group commit's clock: at least one flush a second
            await asyncio.sleep(0.25)
            self.cache.maybe_flush()

    def table(self, name: str) -> str:
        return f'{self.schema}."{name}"'

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
        if not self.reuse:
            return path, limit, None
        return path, limit, hashlib.sha256(orjson.dumps(
            [_engine_digest(), "input", content, kind, self.columns, limit, self.sample, self.seed])).hexdigest()

    def _read_input(self) -> pa.Table | None:
        """The input rows, mapped, read before the run starts (a bad file or mapping makes no run);
        None when an earlier build of the same input can be linked instead."""
        path, limit, fingerprint = self._input
        self.input_file = path
        if fingerprint and ("input", fingerprint) in self._builds:
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
        query = f"SELECT {', '.join(select)} FROM _source"
        con = self.cache.con
        con.register("_source", data)
        try:
            check_select(query)
            return con.sql(query).to_arrow_table()
        except (duckdb.Error, NotReadOnly) as exc:
            raise SpecError(f"column mapping does not apply to {path} "
                            f"(columns: {', '.join(data.column_names[:-1])}): {first_line(exc)}",
                            file=self.src.file, line=self.src.line(("input", "columns")),
                            field="input.columns") from None
        finally:
            con.unregister("_source")

    def _write_input(self, data: pa.Table | None) -> None:
        fingerprint = self._input[2]
        if data is None:
            assert fingerprint
            self._link("input", fingerprint)
            return
        self.cache.write_table(self.table("input"), data)
        if fingerprint:
            self._memo("input", fingerprint, {"rows_out": data.num_rows, "columns": data.column_names})

    async def _run_stage(self, stage: Any, stats: StageStats) -> None:
        if isinstance(stage, PromptStage):
            await self._prompt_stage(stage, stats)
        elif isinstance(stage, SqlStage):
            self.cache.release()  # user SQL that fails must not take the held transaction with it
            self._sql_stage(stage, stats)
        elif isinstance(stage, PythonStage):
            self.cache.release()
            await self._python_stage(stage, stats)
        else:
            await self._embed_stage(stage, stats)

    def _loc(self, stage: Any, *fields: str) -> tuple[Any, ...]:
        return ("stages", self.spec.stages.index(stage), *fields)

    def _stage_error(self, stage: Any, field_name: str, message: str) -> SpecError:
        loc = self._loc(stage, field_name)
        return SpecError(message, file=self.src.file, line=self.src.line(loc),
                         field=f"stages[{loc[1]}] ({stage.name}).{field_name}")

    def _columns(self, name: str) -> list[str]:
        if name in self._known:
            return list(self._known[name])
        rows = self.cache.con.execute(f"DESCRIBE {self.table(name)}").fetchall()
        return [r[0] for r in rows]

    def _source_table(self, stage: Any, name: str) -> str:
        earlier = ["input", *(s.name for s in self.spec.stages[: self.spec.stages.index(stage)])]
        if name not in earlier:
            raise self._stage_error(stage, "from", f"no table {name!r} before this stage "
                                                   f"(tables: {', '.join(earlier)})")
        if name not in self._known and not self.cache.table_exists(self.schema, name):
            raise RetortError(f"stage {stage.name}: its input table {name!r} was not produced "
                              "(an earlier stage failed)")
        return self.table(name)

    def _read_rows(self, stage: PromptStage | EmbedStage, source: str, columns: list[str]) -> pa.Table:
        """The rows a model stage works on: its `from` table without the rows an upstream parse failed
        (a plan keeps its placeholders), filtered by its `where:` (a template over params)."""
        filters = []
        if "_error" in columns:
            filters.append("_error IS NULL")  # a plan's placeholders pass too: their _error is NULL (see emit)
        if stage.where:
            try:
                filters.append(f"({render_sql(stage.where, self.spec.params)})")
            except TemplateError as exc:
                raise self._stage_error(stage, "where", str(exc)) from None
        query = f"SELECT * FROM {source}" + (f" WHERE {' AND '.join(filters)}" if filters else "")
        try:
            check_select(query)  # a `where:` is pasted into the query: it must not make it two
            return self.cache.con.sql(query).to_arrow_table()
        except (duckdb.Error, NotReadOnly) as exc:
            raise self._stage_error(stage, "where", first_line(exc)) from None

    # ------------------------------------------------------------ prompt stages

    def _template(self, stage: PromptStage) -> Template:
        if stage.template is not None:
            return Template(stage.template, f"{self.src.file} (stage {stage.name})")
        assert stage.prompt is not None  # the spec model requires one of the two
        path = self.ws.prompt(stage.prompt)
        if path is None:
            raise self._stage_error(stage, "prompt", f"no template {stage.prompt!r} in prompts/ of "
                                                     f"{self.ws.root} or the built-in library")
        if self._env is None:
            self._env = environment([root / "prompts" for root in self.ws.roots])
        return Template.from_file(path, f"prompts/{stage.prompt}", self._env)

    def _parser(self, stage: PromptStage) -> Parser:
        try:
            return build_parser(with_params(stage.parse, self.spec.params), stage.output or stage.name,
                                workspace=self.ws)
        except (SpecError, NotFoundError) as exc:
            raise self._stage_error(stage, "parse", getattr(exc, "detail", str(exc))) from None

    async def _prompt_stage(self, stage: PromptStage, stats: StageStats) -> None:
        template, parser = self._template(stage), self._parser(stage)
        source = self._source_table(stage, stage.from_)
        columns = self._columns(stage.from_)
        try:
            template.check_columns(columns)
        except TemplateError as exc:
            if stage.from_ == "input":
                what = "the input rows have" if self.input_data is not None else f"{self.input_file} has"
                raise DatasetError(f"{what} no column {str(exc).split(chr(39))[1]!r}, which "
                                   f"{template.name} (line {exc.line}) needs; map one with "
                                   f"--map NAME=COLUMN or input.columns") from None
            raise
        if isinstance(stage.model, str):
            self.backend(stage.model)  # an unknown model fails here, before any row
        elif stage.model.column not in columns:
            raise self._stage_error(stage, "model", f"column {stage.model.column!r} is not in {stage.from_}")
        stats.template = template.digest()
        stats.parser = hashlib.sha256(parser.identity.encode()).hexdigest()
        fingerprint = self._fingerprint(stage, stats.template, parser.identity)
        if fingerprint and self._reused(stage, stats, fingerprint):
            return
        self.cache.release()
        data = self._read_rows(stage, source, columns)
        stats.rows_in = data.num_rows
        total = data.num_rows * stage.samples
        self.progress.stage_started(stats, total)
        out_table = self.table(stage.name)
        self.cache.drop_table(out_table)
        exec_ = _PromptExecution(self, stage, stats, template, parser, out_table, columns)
        rates = exec_.rates = self._account(stage, stats)
        await exec_.run(data)
        if self.dry:
            stats.cost_usd = costs.usd(stats.est_prompt_tokens, stats.est_completion_tokens, rates)
        await self.cache.flush_async()  # the next stage reads this table: every row of it, not the last flush's
        if not self.cache.table_exists(self.schema, stage.name):  # no row came out: keep the shape
            new = ", ".join(f'NULL::VARCHAR AS "{c}"' for c in (*LINEAGE, *parser.columns) if c not in columns
                            or c in LINEAGE)
            keep = ", ".join(f'"{c}"' for c in columns if c not in LINEAGE and c not in parser.columns)
            self.cache.execute(f"{create(out_table)} AS SELECT {keep + ', ' if keep else ''}{new} "
                               f"FROM {source} LIMIT 0")
        stored = self.cache.count(out_table)
        if stored != stats.rows_out or stats.rows_out + stats.failures != total:  # never a silently short table
            raise RetortError(f"stage {stage.name}: {stored} rows stored and {stats.failures} failures recorded, "
                              f"but {total} rows were expected ({stats.rows_out} made); this is a bug in retort, "
                              "the run is not used as the latest")
        self._remember(stage, stats, fingerprint)

    def _account(self, stage: PromptStage, stats: StageStats) -> tuple[float, float] | None:
        """The stage's model and price, and for a plan how many tokens a missing call will answer
        with: this stage's average in `calls` for the same model, else `max_tokens` (an upper
        bound), else 256. Returns the model's price (USD per million tokens), None if unknown."""
        static = isinstance(stage.model, str)
        stats.model = str(stage.model) if static else f"per row ({stage.model.column})"  # type: ignore[union-attr]
        if static:
            rates = costs.price(self.model_config(str(stage.model)))
        else:  # a model per row: known only when every model the spec names has the same price
            prices = {costs.price(self.model_config(m)) for m in {"default", *self.spec.models}}
            rates = prices.pop() if len(prices) == 1 else None
        if not self.dry:
            stats.cost_usd = 0.0 if rates is not None else None
            return rates
        avg, n = None, 0
        if static:
            identity = self.backend(str(stage.model)).identity
            avg, n = self.cache.con.execute("SELECT avg(completion_tokens), count(*) FROM calls WHERE model = ? "
                                            "AND stage = ?", [identity, stage.name]).fetchall()[0]
        max_tokens = stage.params.model_dump(exclude_none=True).get("max_tokens")
        if n:
            self._completion[stage.name], stats.completion_basis = float(avg or 0), f"history ({n} calls)"
        elif max_tokens:
            self._completion[stage.name], stats.completion_basis = float(max_tokens), "max_tokens"
        else:
            self._completion[stage.name], stats.completion_basis = 256.0, "guess (256)"
        return rates

    # ------------------------------------------------------------ reuse of whole stage tables

    def _fingerprint(self, stage: PromptStage | EmbedStage, *parts: str | None) -> str | None:
        """What a model stage's table is a function of, hashed: retort's own code, the stage's settings,
        the pipeline's params, the model's identity, the content of its `from` table, and `parts`
        (the template with everything it includes, the parser with the code it runs).

        An earlier run's table with the same fingerprint is the table this run would build (the
        same requests, answered from the cache, parsed the same way), so this run links to it.
        None when that cannot be known: a per-row model, a template that picks what it includes
        at render time, a `where:` with a subquery, a dry run, or `--no-reuse`.
        """
        if not self.reuse or not isinstance(stage.model, str) or any(p is None for p in parts):
            return None
        if stage.where and "select" in stage.where.lower():
            return None  # a subquery can read any table, and which ones is not worth guessing
        backend = self.backend(stage.model)
        digest = hashlib.sha256(_engine_digest().encode())
        for part in (stage.kind, stage.model_dump_json(by_alias=True),
                     orjson.dumps(self.spec.params, option=orjson.OPT_SORT_KEYS, default=str).decode(),
                     backend.identity, str(getattr(backend, "constrains_choices", False)),
                     self._digest(stage.from_), *parts):
            digest.update(b"\0" + str(part).encode())
        return digest.hexdigest()

    def _stage_fingerprint(self, stage: PromptStage | EmbedStage) -> str | None:
        if isinstance(stage, PromptStage):
            return self._fingerprint(stage, self._template(stage).digest(), self._parser(stage).identity)
        return self._fingerprint(stage)

    def _digest(self, name: str) -> str:
        if name not in self._digests:
            self.cache.flush()
            self._digests[name] = self.cache.digest(self.table(name))
        return self._digests[name]

    def _reused(self, stage: PromptStage | EmbedStage, stats: StageStats, fingerprint: str) -> bool:
        """Reuse the table of the latest run with this fingerprint, if its rows are kept: a view onto
        them in this run's schema (no copy), and the counts it was built with."""
        before = self._link(stage.name, fingerprint)
        if before is None:
            return False
        self._stand_in(stats, before, before["run"])
        return True

    def _stand_in(self, stats: StageStats, counts: dict[str, Any], run: int) -> None:
        """`stats` become those of run `run`'s build of the stage, whose rows this run uses as they are."""
        stats.reused_from = run
        for name in ("rows_in", "rows_out", "calls_needed", "parse_errors", "prompt_tokens", "completion_tokens"):
            setattr(stats, name, counts.get(name, 0))
        stats.cache_hits = stats.completed = stats.calls_needed  # every call it stands for is in the cache
        self.progress.stage_started(stats, stats.calls_needed)
        self.progress.advance(stats)

    def _link(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        found = self._builds.get((name, fingerprint))
        if found is None:
            return None
        run_id, origin, counts = found
        before = orjson.loads(counts)
        self.cache.execute(f'CREATE VIEW {self.table(name)} AS SELECT * FROM run_{origin}."{name}"')
        if before.get("digest"):
            self._digests[name] = before["digest"]
            self._prints[name] = [fingerprint, before["digest"]]
        if before.get("columns"):
            self._known[name] = before["columns"]
        return {**before, "run": run_id}

    def _remember(self, stage: PromptStage | EmbedStage, stats: StageStats, fingerprint: str | None) -> None:
        """A table built without a failed call can stand in for this fingerprint later."""
        if fingerprint and not stats.failures:
            self._memo(stage.name, fingerprint, {**asdict(stats), "columns": self._columns(stage.name)})

    def _memo(self, name: str, fingerprint: str, counts: dict[str, Any]) -> None:
        """Record this run's table `name` as the build of `fingerprint`, for later runs to reuse."""
        if self.run_id is not None:
            digest = self._digest(name)
            self.cache.remember(fingerprint, self.run_id, name, self.run_id, {**counts, "digest": digest})
            self._prints[name] = [fingerprint, digest]

    # ------------------------------------------------------------ embed stages

    async def _embed_stage(self, stage: EmbedStage, stats: StageStats) -> None:
        """One vector per row of `from`, cached by (model identity, text) like calls.

        Similarity is then plain DuckDB in a later SQL stage, e.g.
        `list_cosine_similarity(a.embedding, b.embedding)`.
        """
        source = self._source_table(stage, stage.from_)
        columns = self._columns(stage.from_)
        if stage.embed not in columns:
            raise self._stage_error(stage, "embed", f"column {stage.embed!r} is not in {stage.from_} "
                                                    f"(columns: {', '.join(c for c in columns if c[0] != '_')})")
        backend = self.backend(stage.model)
        if not hasattr(backend, "embed"):
            raise self._stage_error(stage, "model", f"model {stage.model!r} ({backend.identity}) has no embeddings")
        fingerprint = self._fingerprint(stage)
        if fingerprint and self._reused(stage, stats, fingerprint):
            return
        self.cache.release()
        data = self._read_rows(stage, source, columns)
        stats.rows_in = stats.calls_needed = data.num_rows
        self.progress.stage_started(stats, data.num_rows)
        out_table = self.table(stage.name)
        self.cache.drop_table(out_table)
        carry = [c for c in columns if c not in LINEAGE and c != stage.output]
        limiter = self.limiter(stage.model)
        prefix = backend.identity.encode() + b"\x00"
        for batch in data.to_batches(CHUNK_ROWS):
            rows = batch.to_pylist()
            texts = ["" if r[stage.embed] is None else str(r[stage.embed]) for r in rows]
            keys = [hashlib.sha256(prefix + t.encode()).hexdigest() for t in texts]
            found = self.cache.lookup_embeddings(list(dict.fromkeys(keys)))
            missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
            stats.cache_hits += sum(1 for k in keys if k in found)
            if missing and not self.dry:
                groups = [list(missing.items())[i:i + EMBED_BATCH] for i in range(0, len(missing), EMBED_BATCH)]
                results = await asyncio.gather(*(self._embed_group(backend, limiter, g, stats) for g in groups),
                                               return_exceptions=True)
                for group, result in zip(groups, results, strict=True):
                    if isinstance(result, BaseException):
                        if not isinstance(result, BackendError):
                            raise result
                        for key, _ in group:
                            stats.failures += 1
                            self.cache.add_failure(self.run_id or 0, stage.name, None, key, str(result),
                                                   result.status)
                        continue
                    found.update(result)
            elif missing:
                stats.est_prompt_tokens += sum(len(t) for t in missing.values()) // 4
            out = []
            for row, key in zip(rows, keys, strict=True):
                vector = found.get(key)
                if vector is None and not self.dry:
                    continue  # its call failed: recorded in `failures`
                record = {c: row[c] for c in carry}
                record.update(_id=row["_id"], _parent=row["_id"], _error=None)  # a plan's placeholder: no vector
                record[stage.output] = vector
                out.append(record)
            stats.completed += len(rows)
            stats.rows_out += len(out)
            self.cache.add_rows(out_table, out, {stage.output: pa.list_(pa.float32())})
            self.progress.advance(stats)
            self.cache.maybe_flush()
        self.cache.flush()
        if not self.cache.table_exists(self.schema, stage.name):
            keep = ", ".join(f'"{c}"' for c in carry)
            self.cache.execute(f"{create(out_table)} AS SELECT {keep + ', ' if keep else ''}NULL::VARCHAR AS _id, "
                                   f"NULL::VARCHAR AS _parent, NULL::VARCHAR AS _error, "
                                   f'NULL::FLOAT[] AS "{stage.output}" FROM {source} LIMIT 0')
        self._remember(stage, stats, fingerprint)

    async def _embed_group(self, backend: Any, limiter: Limiter, group: list[tuple[str, str]],
                           stats: StageStats) -> dict[str, list[float]]:
        texts = [t for _, t in group]
        vectors, tokens = await call_with_retries(backend.embed, texts, limiter, self.max_retries,
                                                  tokens=lambda r: float(r[1]),
                                                  on_wait=functools.partial(self.progress.waiting, stats))
        stats.calls_made += len(group)
        stats.prompt_tokens += tokens
        share = tokens // max(1, len(group))
        for (key, text), vector in zip(group, vectors, strict=True):
            self.cache.add_embedding(key, backend.identity, text, vector, share, self.run_id or 0)
        return {key: vector for (key, _), vector in zip(group, vectors, strict=True)}

    # ------------------------------------------------------------ SQL and Python stages

    def _sql_stage(self, stage: SqlStage, stats: StageStats) -> None:
        con = self.cache.con
        self.cache.flush()
        self.progress.stage_started(stats, None)
        try:
            sql = render_sql(stage.sql, self.spec.params)
        except TemplateError as exc:
            raise self._stage_error(stage, "sql", str(exc)) from None
        try:
            check_select(sql)  # before DuckDB sees it: one SELECT, nothing that writes
            described = [r[0] for r in con.execute(f"DESCRIBE {sql}").fetchall()]
            body = sql if "_id" in described else \
                f"SELECT {literal(stage.name + ':')} || (row_number() OVER () - 1) AS _id, * FROM ({sql})"
            self.cache.execute(f"{create(self.table(stage.name))} AS {body}")
        except (duckdb.Error, NotReadOnly) as exc:
            raise self._stage_error(stage, "sql", first_line(exc)) from None
        stats.rows_out = self.cache.count(self.table(stage.name))

    async def _python_stage(self, stage: PythonStage, stats: StageStats) -> None:
        fn = self.ws.evaluator(stage.python)
        index = self.spec.stages.index(stage)
        source = stage.from_ or (self.spec.stages[index - 1].name if index else "input")
        self.cache.flush()
        self.progress.stage_started(stats, None)
        rows = self.cache.con.sql(f"SELECT * FROM {self._source_table(stage, source)}").to_arrow_table()
        stats.rows_in = rows.num_rows
        kwargs = dict(stage.with_)
        if "ctx" in inspect.signature(fn).parameters:
            kwargs["ctx"] = StageContext(self, stage, stats)
        try:
            out = fn(rows.to_pylist(), **kwargs)
            if inspect.isawaitable(out):
                out = await out
        except RetortError:
            raise
        except Exception as exc:  # a crashing evaluator is a failure row, not an abort
            raise RetortError(f"evaluator {stage.python} failed: {type(exc).__name__}: {exc}") from None
        if isinstance(out, dict):
            self._record_metrics(stage, stats, out)
            out = [out]
        table = out if isinstance(out, pa.Table) else table_from_rows(list(out or []), lenient=True)
        if table.num_columns == 0:
            table = pa.table({"_id": pa.array([], pa.string())})
        self.cache.write_table(self.table(stage.name), table)
        stats.rows_out = table.num_rows

    def _record_metrics(self, stage: PythonStage, stats: StageStats, values: dict[str, Any]) -> None:
        stats.metrics = {k: v for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.run_id is None:
            return
        data = orjson.dumps(values, default=str).decode()
        self.cache.record_metrics([[self.run_id, self.spec.name, stage.name, name, float(value), data]
                                   for name, value in stats.metrics.items()])


class StageContext:
    """What a Python stage gets as `ctx` when its function takes one: prompts through the runner.

    `await ctx.prompt(...)` renders a template over rows and calls a model with the
    same cache, concurrency, retries and accounting as a prompt stage, so loops
    that depend on earlier answers (LbT M3's refinement rounds) stay cached and
    resumable. `ctx.write_table(suffix, rows)` keeps intermediate tables as
    `<stage>__<suffix>`.
    """

    def __init__(self, runner: Runner, stage: PythonStage, stats: StageStats) -> None:
        self._runner, self._stage, self.stats = runner, stage, stats
        self.params = runner.spec.params
        self.run_id = runner.run_id

    async def prompt(self, prompt: str, rows: list[dict[str, Any]], *, model: str = "default", samples: int = 1,
                     params: dict[str, Any] | None = None, parse: str | dict[str, Any] = "text",
                     output: str = "output", reask: int = 0) -> list[dict[str, Any]]:
        """One output row per input row and sample, in input order; `_error` set where parsing failed."""
        r = self._runner
        stage = PromptStage.model_validate({"name": self._stage.name, "prompt": prompt, "model": model,
                                            "samples": samples, "params": params or {}, "parse": parse,
                                            "output": output, "reask": reask})
        template = r._template(stage)
        parser = build_parser(with_params(parse, r.spec.params), output, workspace=r.ws)
        keyed = [{**row, "_id": str(row.get("_id", i))} for i, row in enumerate(rows)]
        columns = sorted({c for row in keyed for c in row})
        template.check_columns(columns)
        sink: list[dict[str, Any]] = []
        exec_ = _PromptExecution(r, stage, self.stats, template, parser, "", columns, sink=sink)
        await exec_.run(table_from_rows(keyed))
        order = {row["_id"]: i for i, row in enumerate(keyed)}
        sink.sort(key=lambda row: (order[row["_parent"]], row["_sample"]))
        return sink

    def write_table(self, suffix: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._runner.cache.write_table(self._runner.table(f"{self._stage.name}__{suffix}"),
                                           table_from_rows(rows))


class _PromptExecution:
    """One prompt stage in flight: the chunk producer, the workers, and the row assembly."""

    def __init__(self, runner: Runner, stage: PromptStage, stats: StageStats, template: Template,
                 parser: Parser, out_table: str, columns: list[str],
                 sink: list[dict[str, Any]] | None = None) -> None:
        self.r, self.stage, self.stats, self.template, self.parser = runner, stage, stats, template, parser
        self.out_table, self.sink = out_table, sink
        self.carry = [c for c in columns if c not in LINEAGE and c not in parser.columns]
        self.params = stage.params.model_dump(exclude_none=True)
        self.samples = stage.samples
        self.queues: dict[str, asyncio.Queue[tuple[_Job, list[int], int] | None]] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.inflight: dict[str, list[tuple[_Job, int, int]]] = {}  # key → waiters (job, sample, attempt)
        self.run_id = runner.run_id or 0
        self.reasks: set[asyncio.Task[None]] = set()
        # One call per distinct prompt: a key answered (or failed) since this chunk's look-up, which
        # neither the look-up nor `inflight` knows any more; cleared right before each look-up.
        self.settled: dict[str, str | BackendError] = {}
        # This chunk's cached re-asks (attempts 1..reask), looked up with its first attempts in one query.
        self.prefetched: dict[str, tuple[str, int, int]] = {}
        self.rates: tuple[float, float] | None = None  # the model's price, when the stage accounts cost

    def queue(self, model: str) -> asyncio.Queue[tuple[_Job, list[int], int] | None]:
        if model not in self.queues:
            backend = self.r.backend(model)
            size = max(1, int(backend.max_concurrency or 1))
            q: asyncio.Queue[tuple[_Job, list[int], int] | None] = asyncio.Queue(maxsize=2 * size)
            self.queues[model] = q
            self.workers += [asyncio.create_task(self.worker(model, backend, q)) for _ in range(size)]
        return self.queues[model]

    async def run(self, data: pa.Table) -> None:
        stage, params, schema = self.stage, self.params, self.parser.schema
        static_model = stage.model if isinstance(stage.model, str) else None
        identities: dict[str, tuple[str, list[str] | None]] = {}
        render, pipeline_params, samples = self.template.render, self.r.spec.params, range(self.samples)
        stats = self.stats
        try:
            for batch in data.to_batches(CHUNK_ROWS):
                jobs: list[_Job] = []
                keys: list[str] = []
                for n, row in enumerate(batch.to_pylist()):
                    if n % 256 == 255:
                        await asyncio.sleep(0)  # let workers send what they have while a chunk renders
                    model = static_model or str(row[stage.model.column])  # type: ignore[union-attr]
                    known = identities.get(model)
                    if known is None:
                        known = identities[model] = self.model_identity(model)
                    messages = render(row, pipeline_params)
                    base = request_base(known[0], messages, params, schema, known[1])
                    job = _Job(row, row["_id"], messages, base, model, self.samples)
                    jobs.append(job)
                    keys += job.keys
                reask = [call_key(job.base, i, a) for job in jobs for i in samples
                         for a in range(1, stage.reask + 1)] if stage.reask and not self.r.dry else []
                self.settled.clear()
                # A dry run's placeholder tables live on this connection's session: look up in place.
                found = self.r.cache.lookup(keys + reask) if self.r.dry else \
                    await self.r.cache.lookup_async(keys + reask)
                self.prefetched = {k: found[k] for k in reask if k in found}
                for j, job in enumerate(jobs):
                    missing = []
                    for i in samples:
                        key = keys[j * self.samples + i]
                        hit = found.get(key)
                        if hit is not None:
                            stats.cache_hits += 1
                            stats.prompt_tokens += hit[1]
                            stats.completion_tokens += hit[2]
                            self.deliver(job, i, 0, key, hit[0], None)
                        elif key in self.settled:
                            self.shared(job, i, 0, key)
                        elif key in self.inflight:
                            self.inflight[key].append((job, i, 0))
                        else:
                            self.inflight[key] = [(job, i, 0)]
                            missing.append(i)
                    if missing:
                        await self.submit(job, missing, 0)
                self.stats.calls_needed += len(keys)
                self.r.progress.advance(self.stats)
                await asyncio.sleep(0)
                self.r.cache.maybe_flush()
            while True:
                for q in list(self.queues.values()):
                    await q.join()
                if not self.reasks:
                    break
                await asyncio.gather(*list(self.reasks))
        finally:
            for w in self.workers:
                w.cancel()
            ended = await asyncio.gather(*self.workers, return_exceptions=True)
        crashed = [e for e in ended if isinstance(e, Exception)]
        if crashed:  # a bug in retort itself: say so rather than lose rows
            raise crashed[0]
        self.r.cache.maybe_flush()

    async def submit(self, job: _Job, samples: list[int], attempt: int) -> None:
        if self.r.dry:
            self.stats.est_prompt_tokens += len(samples) * sum(len(m["content"]) for m in job.messages) // 4
            self.stats.est_completion_tokens += int(len(samples) * self.r._completion.get(self.stage.name, 0))
            for i in samples:  # a placeholder keeps downstream row counts right in a plan
                key = call_key(job.base, i, attempt)
                self.inflight.pop(key, None)
                job.results[i] = (key, "", NOT_CACHED, {})
                self.stats.completed += 1
                job.open -= 1
            if job.open == 0:
                self.emit(job)
            return
        await self.queue(job.model).put((job, samples, attempt))

    async def worker(self, model: str, backend: Backend, q: asyncio.Queue[Any]) -> None:
        limiter, choices, schema = self.r.limiter(model), self.model_identity(model)[1], self.parser.schema
        while True:
            job, samples, attempt = await q.get()
            keys = [job.keys[i] if attempt == 0 else call_key(job.base, i, attempt) for i in samples]
            try:
                request = Request(job.messages, self.request_params(samples[0], attempt), len(samples), schema,
                                  model, choices)
                begun = time.monotonic()
                completion = await self.call(backend, limiter, request)
                if len(completion.texts) != len(samples):
                    raise BackendError(f"{len(completion.texts)} completions for {len(samples)} samples",
                                       model=backend.identity)
                latency = (time.monotonic() - begun) * 1000 / len(samples)
                self.stats.prompt_tokens += completion.prompt_tokens
                self.stats.completion_tokens += completion.completion_tokens
                if self.stats.cost_usd is not None and self.rates is not None:
                    self.stats.cost_usd += (completion.prompt_tokens * self.rates[0]
                                            + completion.completion_tokens * self.rates[1]) / 1e6
                share_p = completion.prompt_tokens // len(samples)
                share_c = completion.completion_tokens // len(samples)
                reasons = completion.finish_reasons or [None] * len(samples)  # type: ignore[list-item]
                for key, i, text, reason in zip(keys, samples, completion.texts, reasons, strict=True):
                    self.stats.calls_made += 1
                    self.r.cache.add_call(key, backend.identity, job.base, i, attempt, text, reason, share_p,
                                          share_c, latency, self.run_id, self.stage.name)
                    self.settled[key] = text
                    waiters = self.inflight.pop(key, [(job, i, attempt)])
                    self.stats.cache_hits += len(waiters) - 1  # rows with the same prompt share the call
                    for waiter, si, att in waiters:
                        self.deliver(waiter, si, att, key, text, None)
                self.r.progress.advance(self.stats)
            except Exception as exc:  # any failure of a call is the row's failure, never a dead worker
                error = exc if isinstance(exc, BackendError) else BackendError(
                    f"{type(exc).__name__}: {exc}", model=backend.identity)
                self.fail(keys, error)
            finally:
                q.task_done()

    def fail(self, keys: list[str], exc: BackendError) -> None:
        """Record the samples behind `keys` as failed (in `failures`); their rows close without them."""
        for key in keys:
            self.settled[key] = exc
            for waiter, i, _ in self.inflight.pop(key, []):
                self.failed(waiter, i, key, exc)

    def failed(self, job: _Job, sample: int, key: str, exc: BackendError) -> None:
        self.stats.failures += 1
        self.r.cache.add_failure(self.run_id, self.stage.name, job.row_id, key, str(exc), exc.status)
        job.results[sample] = (key, "", f"call failed: {exc}", {})
        self.stats.completed += 1
        job.open -= 1
        if job.open == 0:
            self.emit(job)

    def shared(self, job: _Job, sample: int, attempt: int, key: str) -> None:
        """A sample whose prompt another row of this chunk already sent: its answer, or its failure."""
        outcome = self.settled[key]
        if isinstance(outcome, BackendError):
            self.failed(job, sample, key, outcome)
        else:
            self.stats.cache_hits += 1
            self.deliver(job, sample, attempt, key, outcome, None)

    def model_identity(self, model: str) -> tuple[str, list[str] | None]:
        """The backend's identity, and the choices it decodes under. Only a backend that constrains
        decoding to a choice stage's options (vLLM) gets them, and only then do they enter the cache
        key: elsewhere, editing a parser must not cost a call."""
        backend = self.r.backend(model)
        return backend.identity, self.parser.choices if getattr(backend, "constrains_choices", False) else None

    def request_params(self, first_sample: int, attempt: int) -> dict[str, Any]:
        """With a seed, samples 4-7 asked later must not repeat samples 0-3, and a re-ask must not
        repeat the answer that failed to parse: offset the seed by the first sample and the attempt."""
        seed = self.params.get("seed")
        if seed is None or (first_sample == 0 and attempt == 0):
            return self.params
        return {**self.params, "seed": seed + first_sample + 1000 * attempt}

    async def call(self, backend: Backend, limiter: Limiter, request: Request) -> Completion:
        on_wait = functools.partial(self.r.progress.waiting, self.stats)
        if not limiter.budgets_tokens:
            return await call_with_retries(backend.complete, request, limiter, self.r.max_retries, on_wait=on_wait)
        prompt = sum(len(m["content"]) for m in request.messages) / 4
        estimate = (prompt + float(request.params.get("max_tokens") or 256)) * request.n
        return await call_with_retries(backend.complete, request, limiter, self.r.max_retries, estimate,
                                       _completion_tokens, on_wait)

    def deliver(self, job: _Job, sample: int, attempt: int, key: str, text: str, error: str | None) -> None:
        """A sample's text arrived (cache or call): parse it, re-ask if allowed, close the row when complete.

        Synchronous on purpose: it runs once per sample on the replay path. A re-ask
        is handed to a task, so a worker never blocks on its own full queue.
        """
        parsed: dict[str, Any] = {}
        try:
            parsed = self.parser(text)
        except ParseError as exc:
            if attempt < self.stage.reask and not self.r.dry:
                nxt = call_key(job.base, sample, attempt + 1)
                self.stats.calls_needed += 1
                # Looked up with the chunk (see run); a re-ask of a call made in this run cannot be
                # cached before it, unless a row with the same prompt made it: settled or in flight.
                hit = self.prefetched.get(nxt)
                if hit is not None:
                    self.stats.cache_hits += 1
                    self.deliver(job, sample, attempt + 1, nxt, hit[0], None)
                elif nxt in self.settled:
                    self.shared(job, sample, attempt + 1, nxt)
                elif nxt in self.inflight:
                    self.inflight[nxt].append((job, sample, attempt + 1))
                else:
                    self.inflight[nxt] = [(job, sample, attempt + 1)]
                    task = asyncio.create_task(self.submit(job, [sample], attempt + 1))
                    self.reasks.add(task)
                    task.add_done_callback(self.reasks.discard)
                return
            error = str(exc) or "does not parse"
        job.results[sample] = (key, text, error, parsed)
        self.stats.completed += 1
        job.open -= 1
        if job.open == 0:
            self.emit(job)

    def emit(self, job: _Job) -> None:
        rows = []
        base = {c: job.row[c] for c in self.carry}
        for i, result in enumerate(job.results):
            assert result is not None
            key, text, error, parsed = result
            if error and error.startswith("call failed"):
                continue  # recorded in `failures`; a rerun calls it again
            row = {**base, "_id": f"{job.row_id}.{i}", "_parent": job.row_id, "_sample": i, "_call": key,
                   "_raw": text, "_error": error, **parsed}
            if error:
                if error == NOT_CACHED:  # a plan's placeholder passes downstream as an answered row would
                    row["_error"] = None
                else:
                    self.stats.parse_errors += not self.r.dry
                for c in self.parser.columns:
                    row.setdefault(c, None)
            rows.append(row)
        self.stats.rows_out += len(rows)
        if self.sink is not None:
            self.sink.extend(rows)
        else:
            self.r.cache.add_rows(self.out_table, rows)


@functools.cache
def _engine_digest() -> str:
    """retort's own code, in every stage fingerprint: an upgrade that changes how rows are built
    (a parser, the template engine, the row layout) must not reuse tables built the old way."""
    digest = hashlib.sha256(__version__.encode())
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()
