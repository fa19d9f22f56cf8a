"""Prompt stages: render every row's messages, look the calls up in the cache by chunk, send the
misses to the model's workers, parse what comes back (re-asking when allowed), and assemble one
output row per input row and sample. One call per distinct prompt, in flight or just answered.

The producer renders and looks up chunks of CHUNK_ROWS rows; per model, a pool of
`max_concurrency` workers takes the misses from a bounded queue (under `--on ray`, one pump sends
them to the model's Ray actors in batches: retort.cluster); `deliver` parses each sample and
`emit` appends the finished row to the stage's table (group-committed by the store)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyarrow as pa

from retort import cluster, costs
from retort.backends.base import Backend, Completion, Request
from retort.cache import call_key, create, request_base
from retort.context import LINEAGE, NOT_CACHED, Context
from retort.errors import BackendError, DatasetError, ParseError, RetortError, TemplateError
from retort.limits import Limiter
from retort.parsers import Parser
from retort.results import StageStats
from retort.retries import call_with_retries
from retort.spec import PromptStage
from retort.templates import Template

CHUNK_ROWS = 4096
_sha256 = hashlib.sha256


class PromptExecutor:
    def parts(self, ctx: Context, stage: PromptStage, stats: StageStats) -> tuple[str | None, ...]:
        """The template with everything it includes, and the parser with the code it runs (their
        digests go to the run's record, which export manifests name)."""
        template, parser = ctx.compiled(stage)
        stats.template = template.digest()
        stats.parser = hashlib.sha256(parser.identity.encode()).hexdigest()
        return stats.template, parser.identity

    async def run(self, ctx: Context, stage: PromptStage, stats: StageStats) -> None:
        template, parser = ctx.compiled(stage)
        source = ctx.source_table(stage, stage.from_)
        columns = ctx.columns(stage.from_)
        try:
            template.check_columns(columns)
        except TemplateError as exc:
            if stage.from_ == "input":
                raise DatasetError(f"{ctx.input_has} no column {str(exc).split(chr(39))[1]!r}, which "
                                   f"{template.name} (line {exc.line}) needs; map one with "
                                   f"--map NAME=COLUMN or input.columns") from None
            raise
        if isinstance(stage.model, str):
            ctx.models.backend(stage.model)  # an unknown model fails here, before any row
        elif stage.model.column not in columns:
            raise ctx.stage_error(stage, "model", f"column {stage.model.column!r} is not in {stage.from_}")
        ctx.cache.release()
        data = ctx.read_rows(stage, source, columns)
        stats.rows_in = data.num_rows
        total = data.num_rows * stage.samples
        ctx.progress.stage_started(stats, total)
        out_table = ctx.table(stage.name)
        ctx.cache.drop_table(out_table)
        exec_ = PromptExecution(ctx, stage, stats, template, parser, out_table, columns)
        rates = exec_.rates = account(ctx, stage, stats)
        await exec_.run(data)
        if ctx.dry:
            stats.cost_usd = costs.usd(stats.est_prompt_tokens, stats.est_completion_tokens, rates)
        await ctx.cache.flush_async()  # the next stage reads this table: every row of it, not the last flush's
        if not ctx.cache.table_exists(ctx.schema, stage.name):  # no row came out: keep the shape
            new = ", ".join(f'NULL::VARCHAR AS "{c}"' for c in (*LINEAGE, *parser.columns) if c not in columns
                            or c in LINEAGE)
            keep = ", ".join(f'"{c}"' for c in columns if c not in LINEAGE and c not in parser.columns)
            ctx.cache.execute(f"{create(out_table)} AS SELECT {keep + ', ' if keep else ''}{new} "
                               f"FROM {source} LIMIT 0")
        stored = ctx.cache.count(out_table)
        if stored != stats.rows_out or stats.rows_out + stats.failures != total:  # never a silently short table
            raise RetortError(f"stage {stage.name}: {stored} rows stored and {stats.failures} failures recorded, "
                              f"but {total} rows were expected ({stats.rows_out} made); this is a bug in retort, "
                              "the run is not used as the latest")


def account(ctx: Context, stage: PromptStage, stats: StageStats) -> tuple[float, float] | None:
    """The stage's model and price, and for a plan how many tokens a missing call will answer
    with: this stage's average in `calls` for the same model, else `max_tokens` (an upper
    bound), else 256. Returns the model's price (USD per million tokens), None if unknown."""
    static = isinstance(stage.model, str)
    stats.model = str(stage.model) if static else f"per row ({stage.model.column})"  # type: ignore[union-attr]
    if static:
        rates = costs.price(ctx.models.config(str(stage.model)))
    else:  # a model per row: known only when every model the spec names has the same price
        prices = {costs.price(ctx.models.config(m)) for m in {"default", *ctx.spec.models}}
        rates = prices.pop() if len(prices) == 1 else None
    if not ctx.dry:
        stats.cost_usd = 0.0 if rates is not None else None
        return rates
    avg, n = None, 0
    if static:
        identity = ctx.models.backend(str(stage.model)).identity
        avg, n = ctx.cache.completion_history(identity, stage.name)
    max_tokens = stage.params.model_dump(exclude_none=True).get("max_tokens")
    if n:
        ctx.completion[stage.name], stats.completion_basis = float(avg or 0), f"history ({n} calls)"
    elif max_tokens:
        ctx.completion[stage.name], stats.completion_basis = float(max_tokens), "max_tokens"
    else:
        ctx.completion[stage.name], stats.completion_basis = 256.0, "guess (256)"
    return rates


async def complete(backend: Backend, limiter: Limiter, request: Request, max_retries: int,
                   on_wait: Callable[[float, str], None] | None = None) -> Completion:
    """One request, as every prompt-stage call is made (here, or in a Ray worker: retort.cluster): through
    the model's limiter, retried; a token budget is charged an estimate, settled with the real usage."""
    if not limiter.budgets_tokens:
        return await call_with_retries(backend.complete, request, limiter, max_retries, on_wait=on_wait)
    prompt = sum(len(m["content"]) for m in request.messages) / 4
    estimate = (prompt + float(request.params.get("max_tokens") or 256)) * request.n
    return await call_with_retries(backend.complete, request, limiter, max_retries, estimate, _completion_tokens,
                                   on_wait)


def _completion_tokens(completion: Completion) -> float:
    return completion.prompt_tokens + completion.completion_tokens


class _Job:
    """One input row of a prompt stage: its samples fill in from the cache or from calls."""

    __slots__ = ("base", "keys", "messages", "model", "open", "results", "row", "row_id")

    def __init__(self, row: dict[str, Any], row_id: str, messages: list[dict[str, str]], base: bytes,
                 model: str, samples: int) -> None:
        self.row, self.row_id, self.messages, self.base, self.model = row, row_id, messages, base, model
        # First attempts (call_key(base, i), inlined: this runs for every row); a re-ask hashes its own.
        self.keys = [_sha256(base + b"#%d" % i).hexdigest() for i in range(samples)]
        # per sample: (call key, raw text, error or None, parsed columns)
        self.results: list[tuple[str, str, str | None, dict[str, Any]] | None] = [None] * samples
        self.open = samples


class PromptExecution:
    """One prompt stage in flight: the chunk producer, the workers, and the row assembly."""

    def __init__(self, ctx: Context, stage: PromptStage, stats: StageStats, template: Template,
                 parser: Parser, out_table: str, columns: list[str],
                 sink: list[dict[str, Any]] | None = None) -> None:
        self.ctx, self.stage, self.stats, self.template, self.parser = ctx, stage, stats, template, parser
        self.out_table, self.sink = out_table, sink
        self.carry = [c for c in columns if c not in LINEAGE and c not in parser.columns]
        self.params = stage.params.model_dump(exclude_none=True)
        self.samples = stage.samples
        self.queues: dict[str, asyncio.Queue[tuple[_Job, list[int], int] | None]] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.inflight: dict[str, list[tuple[_Job, int, int]]] = {}  # key → waiters (job, sample, attempt)
        self.run_id = ctx.run_id or 0
        self.reasks: set[asyncio.Task[None]] = set()
        # One call per distinct prompt: a key answered (or failed) since this chunk's look-up, which
        # neither the look-up nor `inflight` knows any more; cleared right before each look-up.
        self.settled: dict[str, str | BackendError] = {}
        # This chunk's cached re-asks (attempts 1..reask), looked up with its first attempts in one query.
        self.prefetched: dict[str, tuple[str, int, int]] = {}
        self.rates: tuple[float, float] | None = None  # the model's price, when the stage accounts cost

    def queue(self, model: str) -> asyncio.Queue[tuple[_Job, list[int], int] | None]:
        if model not in self.queues:
            backend = self.ctx.models.backend(model)
            size = max(1, int(backend.max_concurrency or 1))
            q: asyncio.Queue[tuple[_Job, list[int], int] | None] = asyncio.Queue(maxsize=2 * size)
            self.queues[model] = q
            if self.ctx.ray is not None:  # --on ray: one pump sends the queue to the model's Ray workers
                self.workers.append(asyncio.create_task(self.ray_pump(model, backend, q)))
            else:
                self.workers += [asyncio.create_task(self.worker(model, backend, q)) for _ in range(size)]
        return self.queues[model]

    async def run(self, data: pa.Table) -> None:
        stage, params, schema = self.stage, self.params, self.parser.schema
        static_model = stage.model if isinstance(stage.model, str) else None
        identities: dict[str, tuple[str, list[str] | None]] = {}
        render, pipeline_params, samples = self.template.render, self.ctx.spec.params, range(self.samples)
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
                         for a in range(1, stage.reask + 1)] if stage.reask and not self.ctx.dry else []
                self.settled.clear()
                # A dry run's placeholder tables live on this connection's session: look up in place.
                found = self.ctx.cache.lookup(keys + reask) if self.ctx.dry else \
                    await self.ctx.cache.lookup_async(keys + reask)
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
                self.ctx.progress.advance(self.stats)
                await asyncio.sleep(0)
                self.ctx.cache.maybe_flush()
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
        self.ctx.cache.maybe_flush()

    async def submit(self, job: _Job, samples: list[int], attempt: int) -> None:
        if self.ctx.dry:
            self.stats.est_prompt_tokens += len(samples) * sum(len(m["content"]) for m in job.messages) // 4
            self.stats.est_completion_tokens += int(len(samples) * self.ctx.completion.get(self.stage.name, 0))
            for i in samples:  # a placeholder keeps downstream row counts right in a plan
                key = call_key(job.base, i, attempt)
                self.inflight.pop(key, None)
                job.results[i] = (key, "", NOT_CACHED, {})
                self.stats.completed += 1
                job.open -= 1
            if job.open == 0:
                self.emit(job)
            return
        if self.ctx.ray is not None and job.model not in self.queues:  # its workers up first: a bad config stops here
            await cluster.pool_for(self.ctx, job.model)
        await self.queue(job.model).put((job, samples, attempt))

    async def worker(self, model: str, backend: Backend, q: asyncio.Queue[Any]) -> None:
        limiter, choices, schema = self.ctx.models.limiter(model), self.model_identity(model)[1], self.parser.schema
        while True:
            job, samples, attempt = await q.get()
            keys = [job.keys[i] if attempt == 0 else call_key(job.base, i, attempt) for i in samples]
            try:
                request = Request(job.messages, self.request_params(samples[0], attempt), len(samples), schema,
                                  model, choices)
                begun = time.monotonic()
                completion = await self.call(backend, limiter, request)
                self.settle(job, samples, attempt, keys, completion, time.monotonic() - begun, backend)
            except Exception as exc:  # any failure of a call is the row's failure, never a dead worker
                error = exc if isinstance(exc, BackendError) else BackendError(
                    f"{type(exc).__name__}: {exc}", model=backend.identity)
                self.fail(keys, error)
            finally:
                q.task_done()

    async def ray_pump(self, model: str, backend: Backend, q: asyncio.Queue[Any]) -> None:
        """The workers' part under --on ray: the queue leaves in batches for the model's Ray actors
        (retort.cluster), and each result settles here exactly as a local worker's call does."""
        pool = await cluster.pool_for(self.ctx, model)
        choices, schema = self.model_identity(model)[1], self.parser.schema

        async def requests() -> AsyncIterator[list[tuple[Any, Request]]]:
            async for items in cluster.batches_of(q, pool.batch):
                yield [((job, samples, attempt), Request(job.messages, self.request_params(samples[0], attempt),
                                                         len(samples), schema, model, choices))
                       for job, samples, attempt in items]

        async for done in pool.stream(requests()):
            for (job, samples, attempt), (outcome, seconds) in done:
                keys = [job.keys[i] if attempt == 0 else call_key(job.base, i, attempt) for i in samples]
                try:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    self.settle(job, samples, attempt, keys, outcome, seconds, backend)
                except Exception as exc:
                    error = exc if isinstance(exc, BackendError) else BackendError(
                        f"{type(exc).__name__}: {exc}", model=backend.identity)
                    self.fail(keys, error)
                finally:
                    q.task_done()

    def settle(self, job: _Job, samples: list[int], attempt: int, keys: list[str], completion: Completion,
               seconds: float, backend: Backend) -> None:
        """A call's completions: counted, added to the store, and delivered to every row waiting on them."""
        if len(completion.texts) != len(samples):
            raise BackendError(f"{len(completion.texts)} completions for {len(samples)} samples",
                               model=backend.identity)
        latency = seconds * 1000 / len(samples)
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
            self.ctx.cache.add_call(key, backend.identity, job.base, i, attempt, text, reason, share_p,
                                    share_c, latency, self.run_id, self.stage.name)
            self.settled[key] = text
            waiters = self.inflight.pop(key, [(job, i, attempt)])
            self.stats.cache_hits += len(waiters) - 1  # rows with the same prompt share the call
            for waiter, si, att in waiters:
                self.deliver(waiter, si, att, key, text, None)
        self.ctx.progress.advance(self.stats)

    def fail(self, keys: list[str], exc: BackendError) -> None:
        """Record the samples behind `keys` as failed (in `failures`); their rows close without them."""
        for key in keys:
            self.settled[key] = exc
            for waiter, i, _ in self.inflight.pop(key, []):
                self.failed(waiter, i, key, exc)

    def failed(self, job: _Job, sample: int, key: str, exc: BackendError) -> None:
        self.stats.failures += 1
        self.ctx.cache.add_failure(self.run_id, self.stage.name, job.row_id, key, str(exc), exc.status)
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
        backend = self.ctx.models.backend(model)
        return backend.identity, self.parser.choices if getattr(backend, "constrains_choices", False) else None

    def request_params(self, first_sample: int, attempt: int) -> dict[str, Any]:
        """With a seed, samples 4-7 asked later must not repeat samples 0-3, and a re-ask must not
        repeat the answer that failed to parse: offset the seed by the first sample and the attempt."""
        seed = self.params.get("seed")
        if seed is None or (first_sample == 0 and attempt == 0):
            return self.params
        return {**self.params, "seed": seed + first_sample + 1000 * attempt}

    async def call(self, backend: Backend, limiter: Limiter, request: Request) -> Completion:
        return await complete(backend, limiter, request, self.ctx.max_retries,
                              functools.partial(self.ctx.progress.waiting, self.stats))

    def deliver(self, job: _Job, sample: int, attempt: int, key: str, text: str, error: str | None) -> None:
        """A sample's text arrived (cache or call): parse it, re-ask if allowed, close the row when complete.

        Synchronous on purpose: it runs once per sample on the replay path. A re-ask
        is handed to a task, so a worker never blocks on its own full queue.
        """
        parsed: dict[str, Any] = {}
        try:
            parsed = self.parser(text)
        except ParseError as exc:
            if attempt < self.stage.reask and not self.ctx.dry:
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
        source, row_id = job.row, job.row_id
        base = {c: source[c] for c in self.carry}
        for i, result in enumerate(job.results):
            assert result is not None
            key, text, error, parsed = result
            if error is None:  # the usual case, first
                rows.append({**base, "_id": f"{row_id}.{i}", "_parent": row_id, "_sample": i, "_call": key,
                             "_raw": text, "_error": None, **parsed})
                continue
            if error.startswith("call failed"):
                continue  # recorded in `failures`; a rerun calls it again
            row = {**base, "_id": f"{row_id}.{i}", "_parent": row_id, "_sample": i, "_call": key,
                   "_raw": text, "_error": error, **parsed}
            if error == NOT_CACHED:  # a plan's placeholder passes downstream as an answered row would
                row["_error"] = None
            else:
                self.stats.parse_errors += not self.ctx.dry
            for c in self.parser.columns:
                row.setdefault(c, None)
            rows.append(row)
        self.stats.rows_out += len(rows)
        if self.sink is not None:
            self.sink.extend(rows)
        else:
            self.ctx.cache.add_rows(self.out_table, rows)
