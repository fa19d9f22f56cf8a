"""Reuse of whole stage tables, as make does it: what a model stage's table is a function of
(its fingerprint), the earlier build with the same fingerprint (linked as a view, no copy, no
call), the record that lets later runs reuse this run's builds, and the up-to-date check."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from retort import __version__
from retort.context import Context
from retort.results import RunResult, StageStats
from retort.spec import EmbedStage, PromptStage


class Reuse:
    def __init__(self, ctx: Context, enabled: bool) -> None:
        self.ctx, self.enabled = ctx, enabled
        self.digests: dict[str, str] = {}  # table → content digest, computed when a fingerprint needs it
        self.builds: dict[tuple[str, str], tuple[int, int, str]] = {}  # (stage, fingerprint) → an earlier build
        self.prints: dict[str, list[str]] = {}  # RunResult.fingerprints: table → [fingerprint, digest]

    def load(self, names: list[str]) -> None:
        """The earlier builds of these tables that are still kept, to link instead of building."""
        if self.enabled:
            self.builds = self.ctx.cache.builds(names)

    def fingerprint(self, stage: PromptStage | EmbedStage, *parts: str | None) -> str | None:
        """What a model stage's table is a function of, hashed: retort's own code, the stage's settings,
        the pipeline's params, the model's identity, the content of its `from` table, and `parts`
        (the template with everything it includes, the parser with the code it runs).

        An earlier run's table with the same fingerprint is the table this run would build (the
        same requests, answered from the cache, parsed the same way), so this run links to it.
        None when that cannot be known: a per-row model, a template that picks what it includes
        at render time, a `where:` with a subquery, a dry run, or `--no-reuse`.
        """
        if not self.enabled or not isinstance(stage.model, str) or any(p is None for p in parts):
            return None
        if stage.where and "select" in stage.where.lower():
            return None  # a subquery can read any table, and which ones is not worth guessing
        backend = self.ctx.models.backend(stage.model)
        digest = hashlib.sha256(engine_digest().encode())
        for part in (stage.kind, stage.model_dump_json(by_alias=True),
                     orjson.dumps(self.ctx.spec.params, option=orjson.OPT_SORT_KEYS, default=str).decode(),
                     backend.identity, str(getattr(backend, "constrains_choices", False)),
                     self.digest(stage.from_), *parts):
            digest.update(b"\0" + str(part).encode())
        return digest.hexdigest()

    def digest(self, name: str) -> str:
        if name not in self.digests:
            self.ctx.cache.flush()
            self.digests[name] = self.ctx.cache.digest(self.ctx.table(name))
        return self.digests[name]

    def reused(self, stage: PromptStage | EmbedStage, stats: StageStats, fingerprint: str) -> bool:
        """Reuse the table of the latest run with this fingerprint, if its rows are kept: a view onto
        them in this run's schema (no copy), and the counts it was built with."""
        before = self.link(stage.name, fingerprint)
        if before is None:
            return False
        self.stand_in(stats, before, before["run"])
        return True

    def stand_in(self, stats: StageStats, counts: dict[str, Any], run: int) -> None:
        """`stats` become those of run `run`'s build of the stage, whose rows this run uses as they are."""
        stats.reused_from = run
        for name in ("rows_in", "rows_out", "calls_needed", "parse_errors", "prompt_tokens", "completion_tokens"):
            setattr(stats, name, counts.get(name, 0))
        stats.cache_hits = stats.completed = stats.calls_needed  # every call it stands for is in the cache
        self.ctx.progress.stage_started(stats, stats.calls_needed)
        self.ctx.progress.advance(stats)

    def link(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        found = self.builds.get((name, fingerprint))
        if found is None:
            return None
        run_id, origin, counts = found
        before = orjson.loads(counts)
        self.ctx.cache.link(self.ctx.table(name), origin, name)
        if before.get("digest"):
            self.digests[name] = before["digest"]
            self.prints[name] = [fingerprint, before["digest"]]
        if before.get("columns"):
            self.ctx.known[name] = before["columns"]
        return {**before, "run": run_id}

    def remember(self, stage: PromptStage | EmbedStage, stats: StageStats, fingerprint: str | None) -> None:
        """A table built without a failed call can stand in for this fingerprint later."""
        if fingerprint and not stats.failures:
            self.memo(stage.name, fingerprint, {**asdict(stats), "columns": self.ctx.columns(stage.name)})

    def memo(self, name: str, fingerprint: str, counts: dict[str, Any]) -> None:
        """Record this run's table `name` as the build of `fingerprint`, for later runs to reuse."""
        if self.ctx.run_id is not None:
            digest = self.digest(name)
            self.ctx.cache.remember(fingerprint, self.ctx.run_id, name, self.ctx.run_id, {**counts, "digest": digest})
            self.prints[name] = [fingerprint, digest]

    def up_to_date(self, result: RunResult, namespace: str, spec_path: str, input_print: str | None,
                   fingerprint_of: Callable[[Any], str | None]) -> bool:
        """Whether there is nothing to do: the latest run of this namespace (the pipeline's name)
        finished complete, and its input and every stage have the fingerprints they would have now.
        Then `result` becomes that run's, with no write and no call. Only pipelines of model stages
        can be up to date: SQL and Python stages always run."""
        spec, cache = self.ctx.spec, self.ctx.cache
        model_stages = [s for s in spec.stages if isinstance(s, (PromptStage, EmbedStage))]
        latest = cache.latest_run(namespace)
        if latest is None or len(model_stages) < len(spec.stages):
            return False
        run_id, pipeline, path, status, record = latest
        if (status, pipeline, path) != ("ok", result.pipeline, spec_path) or not record:
            return False
        before = orjson.loads(record)
        prints, stages = before.get("fingerprints") or {}, before.get("stages") or []
        names = [s.name for s in model_stages]
        if [s.get("name") for s in stages] != names or any(s.get("failures") or s.get("error") for s in stages) \
                or not cache.tables_exist(f"run_{run_id}", ["input", *names]):
            return False

        def same(name: str, fingerprint: str | None) -> bool:
            known = prints.get(name)
            if fingerprint is None or not known or fingerprint != known[0]:
                return False
            self.digests[name] = known[1]  # what the next stage's fingerprint reads
            return True

        # In order: a stage's fingerprint needs the digest of its `from` table.
        if not (same("input", input_print) and all(
                s.from_ in self.digests and same(s.name, fingerprint_of(s)) for s in model_stages)):
            self.digests.clear()  # a normal run computes its own
            return False
        result.run_id, result.up_to_date = run_id, True
        self.prints.update(prints)
        for saved in stages:
            stats = StageStats(saved["name"], saved["kind"])
            self.stand_in(stats, saved, saved.get("reused_from") or run_id)
            result.stages.append(stats)
            self.ctx.progress.stage_finished(stats)
        return True


@functools.cache
def engine_digest() -> str:
    """retort's own code, in every stage fingerprint: an upgrade that changes how rows are built
    (a parser, the template engine, the row layout, an executor) must not reuse tables built the old way."""
    digest = hashlib.sha256(__version__.encode())
    here = Path(__file__).parent
    for file in sorted([*here.glob("*.py"), *here.glob("executors/*.py")]):
        digest.update(file.read_bytes())
    return digest.hexdigest()
