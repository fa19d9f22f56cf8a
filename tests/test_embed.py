"""Embed stages: vectors cached like calls, nearest neighbours as a DuckDB expression."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from retort import backends
from retort.backends.base import Backend
from retort.backends.scripted import ScriptedBackend
from retort.cache import Cache
from retort.runner import Runner, RunResult
from retort.spec import load_pipeline
from retort.workspace import Workspace

ROWS = [
    {"question": "how many apples does tom have left"},
    {"question": "tom has apples left how many"},
    {"question": "a train leaves the station at noon"},
    {"question": "when does the train leave the station"},
]

PIPELINE = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, replies: [unused]}
stages:
  - {name: vec, embed: question}
  - name: neighbours
    sql: |
      SELECT a._id AS _id, a.question, b.question AS nearest,
             list_cosine_similarity(a.embedding, b.embedding) AS similarity
      FROM vec a JOIN vec b ON a._id <> b._id
      QUALIFY row_number() OVER (PARTITION BY a._id ORDER BY similarity DESC, b._id) = 1
"""


def run(ws_root: Path, factory: Any) -> RunResult:
    ws = Workspace(ws_root)
    spec, source = load_pipeline(ws_root / "pipelines" / "p.yaml")
    cache = Cache(ws.db_path)
    try:
        return asyncio.run(Runner(ws, spec, source, cache, backend_factory=factory).execute())
    finally:
        cache.close()


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (workspace / "pipelines" / "p.yaml").write_text(PIPELINE)
    return workspace


def neighbours(ws: Path) -> dict[str, str]:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return dict(con.execute("SELECT question, nearest FROM main.neighbours").fetchall())
    finally:
        con.close()


def test_nearest_neighbours_by_cosine_similarity_and_cached_vectors(ws: Path) -> None:
    backend = ScriptedBackend(replies=[])
    result = run(ws, lambda name, cfg: backend)
    assert result.stages[0].calls_made == 4 and len(backend.embedded) == 4
    assert neighbours(ws) == {
        ROWS[0]["question"]: ROWS[1]["question"], ROWS[1]["question"]: ROWS[0]["question"],
        ROWS[2]["question"]: ROWS[3]["question"], ROWS[3]["question"]: ROWS[2]["question"]}
    again = ScriptedBackend(replies=[])
    result = run(ws, lambda name, cfg: again)
    assert again.embedded == [] and result.stages[0].cache_hits == 4
    assert result.stages[0].reused_from == 1  # nothing changed: the vectors table is run 1's
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM embeddings").fetchall() == [(4, 4)]
    con.close()

    edited = [*ROWS[:3], {"question": "when does the last train leave"}]
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in edited))
    third = ScriptedBackend(replies=[])
    result = run(ws, lambda name, cfg: third)
    assert result.stages[0].reused_from is None and third.embedded == [edited[3]["question"]]
    assert set(neighbours(ws)) == {r["question"] for r in edited}  # the SQL stage ran on the new vectors


@pytest.mark.http
@pytest.mark.parametrize("transport", ["fast", "sdk"])
def test_embeddings_over_http(ws: Path, transport: str) -> None:
    from bench.stub_server import start_stub

    async def scenario() -> tuple[RunResult, list[Backend]]:
        server, url = await start_stub()
        (ws / "pipelines" / "p.yaml").write_text(PIPELINE.replace(
            "default: {backend: scripted, replies: [unused]}",
            f"default: {{backend: openai, model: stub, base_url: '{url}', transport: {transport}}}"))
        made: list[Backend] = []

        def factory(name: str, cfg: dict[str, Any]) -> Backend:
            made.append(backends.create(name, cfg))
            return made[-1]

        ws_ = Workspace(ws)
        spec, source = load_pipeline(ws / "pipelines" / "p.yaml")
        cache = Cache(ws_.db_path)
        try:
            return await Runner(ws_, spec, source, cache, backend_factory=factory).execute(), made
        finally:
            cache.close()
            await server.cleanup()

    result, _ = asyncio.run(scenario())
    assert result.failures == 0 and result.stages[0].rows_out == 4
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    dims = con.execute("SELECT DISTINCT len(embedding) FROM main.vec").fetchall()
    assert dims == [(16,)]
    assert con.execute("SELECT count(*) FROM main.neighbours").fetchall()[0][0] == 4


@pytest.mark.local_model
def test_embedded_model_embeds(ws: Path) -> None:
    pytest.importorskip("llama_cpp")
    (ws / "pipelines" / "p.yaml").write_text(PIPELINE.replace(
        "default: {backend: scripted, replies: [unused]}", "default: {backend: local}"))
    result = run(ws, backends.create)
    assert result.failures == 0 and result.stages[0].rows_out == 4
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    dims = con.execute("SELECT DISTINCT len(embedding) FROM main.vec").fetchall()
    assert len(dims) == 1 and dims[0][0] >= 64
    sims = con.execute("SELECT min(similarity), max(similarity) FROM main.neighbours").fetchall()[0]
    assert -1.0 <= sims[0] <= sims[1] <= 1.0001
