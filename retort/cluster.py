"""Prompt-stage model calls on a Ray cluster: workers on Ray, one writer.

    pip install "retort[ray]"
    retort run PIPELINE --on ray [--ray-address HOST:PORT]

Only the calls the cache does not have leave the driver (the `retort run` process). The driver
keeps everything else exactly as in a local run: rendering, call keys, cache look-ups, parsing,
re-asks, lineage and the DuckDB group commit. So the store is written by one process, and a
run started on Ray and finished locally (or the reverse) makes no call twice.

The Ray side is a pool of actors per model (`ModelPool`). Each actor (`_Worker`) builds the
model's retort backend from the model's config (an OpenAI-compatible endpoint, the embedded
llama model, in-process vLLM, a scripted function) and makes the calls of the batches it is
sent with retort's own retries, rate limits and concurrency (`call_with_retries`, `Limiter`),
returning per request either the Completion or the final BackendError. Batches go to the
actor with the fewest requests outstanding, and their results stream back to the driver as
each batch finishes (`ModelPool.stream`, an async iterator: the driver's event loop awaits
Ray's object refs and never blocks on them).

Faults. Actors are created with `max_restarts` and `max_task_retries=-1`: when a worker
process dies mid-batch, Ray restarts the actor (which rebuilds its backend) and re-runs the
batches it held, so no row is lost; a request of such a batch may reach the endpoint twice,
but the driver writes each call once. A driver killed mid-run takes its actors with it (they
are owned by the driver's job); the rerun resumes from the store like a local run.

Why actors and not a `ray.data` pipeline: a Dataset is built from a finite input, but the
driver's misses arrive chunk by chunk and re-asks feed back into them; one Dataset per chunk
pays ray.data's planning and start-up per chunk. Measured (bench/bench_ray.py): 4,000 calls
took 12-24 s as one Dataset through map_batches, against 3-4 s for the whole `--on ray` run.

Secrets. A model config carries `api_key_env`, the NAME of the variable, never a key; the
actors read the same variable on their node. No key is put in Ray's runtime_env or object
store, so set the variable in the environment of `ray start` on every node (a local cluster
started by `retort run --on ray` inherits the driver's environment).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from retort.backends.base import Completion, Request
from retort.errors import BackendError, UserError

RAY_MISSING = "--on ray needs Ray, which is not installed: pip install 'retort[ray]'"
BATCH = 32  # requests per batch sent to an actor: ~1 ms of Ray overhead each, small against a model call
MAX_RESTARTS = 4  # a worker killed (or OOM) this many times fails the run's remaining calls of that model

T = TypeVar("T")
Outcome = tuple[Completion | BackendError, float]  # the result of one request, and its seconds in the worker
# Between driver and workers, requests and completions travel as plain tuples: pickling the slotted
# dataclasses costs ~16 and ~21 us each, the tuples ~3 (bench/bench_ray.py counts the driver's CPU per call).
Wire = tuple[Any, ...]


def _to_wire(request: Request) -> Wire:
    return request.messages, request.params, request.n, request.schema, request.model, request.choices


def _from_wire(outcome: tuple[Any, float]) -> Outcome:
    result, seconds = outcome
    if isinstance(result, BackendError):  # the worker returns nothing else but a completion's fields
        return result, seconds
    texts, prompt_tokens, completion_tokens, reasons = result
    return Completion(texts, prompt_tokens, completion_tokens, reasons), seconds


def require_ray() -> Any:
    """The `ray` module, imported only when a run asks for it; without it, one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` of a running cluster (None: RAY_ADDRESS, else a new local
    one), and `actors` per model (None: one per GPU share for vLLM, one per node otherwise)."""

    address: str | None = None
    actors: int | None = None
    batch: int = BATCH


class _Worker:
    """The actor: one model's backend on a Ray worker, making the calls of the batches it is sent."""

    def __init__(self, name: str, config: dict[str, Any], workspace: str | None, max_retries: int,
                 share: int) -> None:
        from retort import backends
        from retort.limits import Limiter
        from retort.workspace import Workspace

        self.error: Exception | None = None
        try:
            self.backend = backends.create(name, config, Workspace(workspace) if workspace else None)
        except Exception as exc:  # said by `ready`: an actor whose constructor raises is retried by Ray, noisily
            self.error = exc
            return
        # Rate budgets are the model's: each of `share` actors takes its part of them.
        rpm, tpm = config.get("rpm"), config.get("tpm")
        self.limiter = Limiter(int(self.backend.max_concurrency or 1), rpm and rpm / share, tpm and tpm / share,
                               config.get("max_retry_after"))
        self.max_retries = max_retries

    async def ready(self) -> int | Exception:
        """Load what the backend loads before its first call (a vLLM engine, the embedded model) here,
        on the worker, not on the driver. The worker's pid (for the tests that kill it), or why the
        backend cannot be built or reached, returned rather than raised: Ray would retry a raise."""
        if self.error is not None:
            return self.error
        try:
            await self.backend.check()
        except Exception as exc:
            return exc
        return os.getpid()

    async def complete(self, requests: list[Wire]) -> list[tuple[Any, float]]:
        return list(await asyncio.gather(*(self._one(Request(*r)) for r in requests)))

    async def _one(self, request: Request) -> tuple[Any, float]:
        from retort.executors.prompt import complete

        begun = time.monotonic()
        try:
            c = await complete(self.backend, self.limiter, request, self.max_retries)
            return (c.texts, c.prompt_tokens, c.completion_tokens, c.finish_reasons), time.monotonic() - begun
        except BackendError as exc:  # the call's final failure, after retries: the driver records it
            return exc, time.monotonic() - begun
        except Exception as exc:  # any failure of a call is the row's failure, never a dead worker
            return BackendError(f"{type(exc).__name__}: {exc}", model=self.backend.identity), 0.0


class ModelPool:
    """One model's actors, and the batches in flight on them."""

    def __init__(self, ray: Any, actors: list[Any], identity: str, pids: list[int], batch: int,
                 depth: int) -> None:
        self.ray, self.actors, self.identity, self.pids, self.batch = ray, actors, identity, pids, batch
        self.depth = depth  # requests in flight (sent, not yet returned) the pool allows
        self.outstanding = [0] * len(actors)

    async def complete(self, requests: list[Request]) -> list[Outcome]:
        """One batch on the least busy actor. A worker lost past MAX_RESTARTS (or a cluster gone) fails
        the batch's requests, recorded in `failures` like any failed call: a rerun calls them again."""
        n = min(range(len(self.actors)), key=self.outstanding.__getitem__)
        self.outstanding[n] += len(requests)
        try:
            return [_from_wire(o) for o in await self.actors[n].complete.remote([_to_wire(r) for r in requests])]
        except self.ray.exceptions.RayError as exc:
            error = BackendError(f"ray worker lost: {str(exc).splitlines()[0]}", model=self.identity,
                                 retryable=True)
            return [(error, 0.0)] * len(requests)
        finally:
            self.outstanding[n] -= len(requests)

    async def stream(self, batches: AsyncIterable[list[tuple[T, Request]]]) -> AsyncIterator[list[tuple[T, Outcome]]]:
        """Results of `batches` as each finishes, not in order. At most `depth` requests are in flight:
        the next batch is taken from `batches` only when there is room, so a slow cluster slows the
        producer instead of filling the driver's memory."""
        done: asyncio.Queue[list[tuple[T, Outcome]] | BaseException | None] = asyncio.Queue()
        room = asyncio.Semaphore(self.depth)

        async def one(items: list[tuple[T, Request]]) -> None:
            try:
                outcomes = await self.complete([request for _, request in items])
                done.put_nowait([(tag, outcome) for (tag, _), outcome in zip(items, outcomes, strict=True)])
            except BaseException as exc:  # a bug here must end the stream, not hang it
                done.put_nowait(exc)
            finally:
                for _ in items:
                    room.release()

        async def feed() -> None:
            running: set[asyncio.Task[None]] = set()
            try:
                async for items in batches:
                    for start in range(0, len(items), self.batch):
                        part = items[start:start + self.batch]
                        for _ in part:
                            await room.acquire()
                        task = asyncio.create_task(one(part))
                        running.add(task)
                        task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*list(running))
                done.put_nowait(None)
            except BaseException as exc:
                for task in running:
                    task.cancel()
                done.put_nowait(exc)
                raise

        feeder = asyncio.create_task(feed())
        try:
            while True:
                item = await done.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


class RayCluster:
    """The driver's connection to a Ray cluster, and the model pools it made there."""

    def __init__(self, options: RayOptions | None = None) -> None:
        """Ray must be importable (checked here, in pre-flight); the cluster is joined on the first call
        that misses the cache, so a cached rerun never connects."""
        self.options = options or RayOptions()
        self.ray = require_ray()
        self.pools: dict[str, ModelPool] = {}
        self._owns = False

    def connect(self) -> None:
        if self.ray.is_initialized():
            return
        reachable(self.options.address)
        _messages_to_stderr()
        # The workers' output stays in Ray's logs: the driver's stdout carries `retort run --json`.
        try:
            self.ray.init(address=self.options.address, log_to_driver=False, logging_level=logging.WARNING,
                          include_dashboard=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.options.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            raise UserError(f"--on ray: cannot connect to {where}: {str(exc).splitlines()[0]}") from None
        self._owns = True

    def actor_count(self, config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """How many actors a model gets, and what each reserves. vLLM: one per `tensor_parallel_size` GPUs
        of the cluster; other backends are I/O-bound (or load one small model): one per node."""
        resources = self.ray.cluster_resources()
        if config.get("backend") == "vllm":
            gpus = float((config.get("engine_args") or {}).get("tensor_parallel_size") or 1)
            reserve = {"num_gpus": gpus, "num_cpus": 1.0} if resources.get("GPU") else {"num_cpus": 1.0}
            fits = int(resources.get("GPU", 0) // gpus) or 1
        else:
            reserve = {"num_cpus": 0.5 if config.get("backend") == "local" else 0.1}
            fits = max(1, len([n for n in self.ray.nodes() if n.get("Alive")]))
        return self.options.actors or fits, reserve

    async def pool(self, name: str, config: dict[str, Any], identity: str, concurrency: int,
                   workspace: Path | None, max_retries: int) -> ModelPool:
        """Model `name`'s pool, made on first use: its actors built and ready (a config the worker cannot
        build, or an endpoint it cannot reach, fails here with the worker's own message)."""
        if name in self.pools:
            return self.pools[name]
        self.connect()
        count, reserve = self.actor_count(config)
        remote = self.ray.remote(_Worker).options(
            max_restarts=MAX_RESTARTS, max_task_retries=-1, max_concurrency=1000, **reserve)
        root = str(workspace) if workspace else None
        actors = [remote.remote(name, config, root, max_retries, count) for _ in range(count)]
        answers = list(await asyncio.gather(*(a.ready.remote() for a in actors)))
        cause = next((a for a in answers if isinstance(a, Exception)), None)
        if cause is not None:
            for actor in actors:
                self.ray.kill(actor, no_restart=True)
            if isinstance(cause, (UserError, BackendError)):
                raise cause
            raise BackendError(f"ray worker could not start: {type(cause).__name__}: {cause}", model=identity)
        pids = [int(a) for a in answers]
        self.pools[name] = pool = ModelPool(self.ray, actors, identity, pids, self.options.batch,
                                            depth=2 * count * concurrency)
        return pool

    def close(self) -> None:
        """Let the actors go (their processes end); a cluster this process started is shut down."""
        for pool in self.pools.values():
            for actor in pool.actors:
                self.ray.kill(actor, no_restart=True)
        self.pools.clear()
        if self._owns:
            self.ray.shutdown()
            self._owns = False


def _messages_to_stderr() -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) Task ... failed ... will be retried",
    when a worker dies) on stdout, which carries `retort run --json`: send them to stderr. Ray 2.60
    calls `print_to_stdstream` by its module-global name from its listener thread, so this replaces it."""
    try:
        from ray._private import worker
    except ImportError:  # another layout of Ray's internals: its messages stay where Ray puts them
        return
    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_retort", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._retort = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def reachable(address: str | None) -> None:
    """Fail at once, in one line, when an explicit HOST:PORT does not answer: ray.init would retry for minutes."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"--on ray: no Ray cluster answers at {address} ({exc})") from None


async def batches_of(queue: asyncio.Queue[T | None], size: int) -> AsyncIterator[list[T]]:
    """What `queue` holds, as batches of at most `size`: waits for one item, then takes what is there
    without waiting, so a trickle goes out at once and a burst goes out in full batches. Ends at None."""
    while True:
        first = await queue.get()
        if first is None:
            return
        items = [first]
        for _ in itertools.repeat(None, size - 1):
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is None:
                yield items
                return
            items.append(item)
        yield items


async def pool_for(ctx: Any, name: str) -> ModelPool:
    """Model `name`'s pool on the run's cluster (`ctx.ray`), built from the config the run resolved: the
    served model name pre-flight found is carried, no key ever is (only `api_key_env`, its name)."""
    cluster: RayCluster = ctx.ray
    if name in cluster.pools:
        return cluster.pools[name]
    backend = ctx.models.backend(name)
    config = ctx.models.config(name)
    if getattr(backend, "model", None) and config.get("backend") == "openai":
        config["model"] = backend.model
    return await cluster.pool(name, config, backend.identity, int(backend.max_concurrency or 1), ctx.ws.root,
                              ctx.max_retries)
