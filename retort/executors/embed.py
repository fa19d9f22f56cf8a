"""Embed stages: one vector per row of `from`, cached by (model identity, text) like calls."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from typing import Any

import pyarrow as pa

from retort.cache import create
from retort.context import LINEAGE, Context
from retort.errors import BackendError
from retort.limits import Limiter
from retort.results import StageStats
from retort.retries import call_with_retries
from retort.spec import EmbedStage

CHUNK_ROWS = 4096
EMBED_BATCH = 64  # texts per embeddings request


class EmbedExecutor:
    def parts(self, ctx: Context, stage: EmbedStage, stats: StageStats) -> tuple[str | None, ...]:
        return ()  # its settings, its model and its `from` table are all it depends on

    async def run(self, ctx: Context, stage: EmbedStage, stats: StageStats) -> None:
        """One vector per row of `from`, cached by (model identity, text) like calls.

        Similarity is then plain DuckDB in a later SQL stage, e.g.
        `list_cosine_similarity(a.embedding, b.embedding)`.
        """
        source = ctx.source_table(stage, stage.from_)
        columns = ctx.columns(stage.from_)
        if stage.embed not in columns:
            raise ctx.stage_error(stage, "embed", f"column {stage.embed!r} is not in {stage.from_} "
                                                    f"(columns: {', '.join(c for c in columns if c[0] != '_')})")
        backend = ctx.models.backend(stage.model)
        if not hasattr(backend, "embed"):
            raise ctx.stage_error(stage, "model", f"model {stage.model!r} ({backend.identity}) has no embeddings")
        ctx.cache.release()
        data = ctx.read_rows(stage, source, columns)
        stats.rows_in = stats.calls_needed = data.num_rows
        ctx.progress.stage_started(stats, data.num_rows)
        out_table = ctx.table(stage.name)
        ctx.cache.drop_table(out_table)
        carry = [c for c in columns if c not in LINEAGE and c != stage.output]
        limiter = ctx.models.limiter(stage.model)
        prefix = backend.identity.encode() + b"\x00"
        for batch in data.to_batches(CHUNK_ROWS):
            rows = batch.to_pylist()
            texts = ["" if r[stage.embed] is None else str(r[stage.embed]) for r in rows]
            keys = [hashlib.sha256(prefix + t.encode()).hexdigest() for t in texts]
            found = ctx.cache.lookup_embeddings(list(dict.fromkeys(keys)))
            missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
            stats.cache_hits += sum(1 for k in keys if k in found)
            if missing and not ctx.dry:
                groups = [list(missing.items())[i:i + EMBED_BATCH] for i in range(0, len(missing), EMBED_BATCH)]
                results = await asyncio.gather(*(_embed_group(ctx, backend, limiter, g, stats) for g in groups),
                                               return_exceptions=True)
                for group, result in zip(groups, results, strict=True):
                    if isinstance(result, BaseException):
                        if not isinstance(result, BackendError):
                            raise result
                        for key, _ in group:
                            stats.failures += 1
                            ctx.cache.add_failure(ctx.run_id or 0, stage.name, None, key, str(result),
                                                   result.status)
                        continue
                    found.update(result)
            elif missing:
                stats.est_prompt_tokens += sum(len(t) for t in missing.values()) // 4
            out = []
            for row, key in zip(rows, keys, strict=True):
                vector = found.get(key)
                if vector is None and not ctx.dry:
                    continue  # its call failed: recorded in `failures`
                record = {c: row[c] for c in carry}
                record.update(_id=row["_id"], _parent=row["_id"], _error=None)  # a plan's placeholder: no vector
                record[stage.output] = vector
                out.append(record)
            stats.completed += len(rows)
            stats.rows_out += len(out)
            ctx.cache.add_rows(out_table, out, {stage.output: pa.list_(pa.float32())})
            ctx.progress.advance(stats)
            ctx.cache.maybe_flush()
        ctx.cache.flush()
        if not ctx.cache.table_exists(ctx.schema, stage.name):
            keep = ", ".join(f'"{c}"' for c in carry)
            ctx.cache.execute(f"{create(out_table)} AS SELECT {keep + ', ' if keep else ''}NULL::VARCHAR AS _id, "
                                   f"NULL::VARCHAR AS _parent, NULL::VARCHAR AS _error, "
                                   f'NULL::FLOAT[] AS "{stage.output}" FROM {source} LIMIT 0')


async def _embed_group(ctx: Context, backend: Any, limiter: Limiter, group: list[tuple[str, str]],
                       stats: StageStats) -> dict[str, list[float]]:
    texts = [t for _, t in group]
    vectors, tokens = await call_with_retries(backend.embed, texts, limiter, ctx.max_retries,
                                              tokens=lambda r: float(r[1]),
                                              on_wait=functools.partial(ctx.progress.waiting, stats))
    stats.calls_made += len(group)
    stats.prompt_tokens += tokens
    share = tokens // max(1, len(group))
    for (key, text), vector in zip(group, vectors, strict=True):
        ctx.cache.add_embedding(key, backend.identity, text, vector, share, ctx.run_id or 0)
    return {key: vector for (key, _), vector in zip(group, vectors, strict=True)}
