"""The Python API as a notebook user would use it: in-memory rows, a running event loop, tables
read back as Arrow, pandas, polars and a Hugging Face Dataset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import retort
from retort.backends.base import Request
from retort.errors import NotFoundError, UserError

ROWS = [{"text": f"review {i} was {'great' if i % 2 else 'awful'}", "label": "positive" if i % 2 else "negative"}
        for i in range(10)]
CALLS: list[str] = []


def classify(request: Request) -> str:
    """A scripted model for sse_cot: every stage answers; the classify stage names the right label."""
    prompt = request.messages[-1]["content"]
    CALLS.append(prompt)
    return "positive" if "great" in prompt else "negative" if "awful" in prompt else "a note"


MODELS = {"default": "scripted:tests.test_api:classify"}


def calls(ws: Path) -> int:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM calls").fetchall()[0][0])
    finally:
        con.close()


def test_the_readme_example_runs(tmp_path: Path) -> None:
    result = retort.run("sse_cot", input=ROWS, models=MODELS, limit=6, set={"stages.classify.samples": 3},
                        workspace=tmp_path)
    assert result.status == "ok" and result.run_id == 1
    classify_rows = result.table("classify").to_pandas()
    assert isinstance(classify_rows, pd.DataFrame) and len(classify_rows) == 6 * 3
    assert (classify_rows["prediction"] == classify_rows["label"]).all()  # the rows went where they should
    assert result.metrics["scores"]["accuracy"] == 1.0
    assert calls(tmp_path) == 6 * 3 + 6 * 3  # three one-sample stages, then 3 samples of classify
    again = retort.run("sse_cot", input=ROWS, models=MODELS, limit=6, set={"stages.classify.samples": 3},
                       workspace=tmp_path)
    assert again.totals["calls_made"] == 0 and calls(tmp_path) == 36


def test_every_kind_of_in_memory_input(tmp_path: Path) -> None:
    inputs = [ROWS, pd.DataFrame(ROWS), pl.DataFrame(ROWS), pa.Table.from_pylist(ROWS)]
    runs = [retort.run("sse_cot", input=rows, models=MODELS, until="concepts", workspace=tmp_path) for rows in inputs]
    assert [r.status for r in runs] == ["ok"] * 4
    assert runs[0].totals["calls_made"] == 8  # the pipeline's own limit: 8 rows
    assert [r.totals["calls_made"] for r in runs[1:]] == [0, 0, 0]  # the same rows: the same prompts, cached
    tables = [r.table("concepts").to_arrow().sort_by("_id") for r in runs]
    assert all(t.column("text").to_pylist() == tables[0].column("text").to_pylist() for t in tables)


def test_until_stops_after_that_stage_and_tables_convert(tmp_path: Path) -> None:
    result = retort.run("sse_cot", input=ROWS, models=MODELS, until="rewrite", workspace=tmp_path)
    assert [s.name for s in result.stages] == ["concepts", "knowledge", "rewrite"]
    with pytest.raises(NotFoundError, match="has no table 'classify'"):
        result.table("classify")
    table = result.table("rewrite")
    assert len(table) == 8 and table.to_polars().height == 8
    dataset = table.to_dataset()
    assert dataset.num_rows == 8 and set(dataset.column_names) >= {"text", "label", "_raw", "_id"}
    assert all(row["_raw"] == row["label"] for row in table.to_pylist())  # each row carries its own input


def test_inside_a_running_event_loop(tmp_path: Path) -> None:
    async def notebook_cell() -> tuple[retort.Result, retort.Result]:
        blocking = retort.run("sse_cot", input=ROWS[:2], models=MODELS, until="concepts", workspace=tmp_path)
        awaited = await retort.arun("sse_cot", input=ROWS[2:4], models=MODELS, until="concepts", workspace=tmp_path)
        return blocking, awaited

    blocking, awaited = asyncio.run(notebook_cell())
    assert (blocking.status, awaited.status) == ("ok", "ok")
    assert len(blocking.table("concepts")) == 2 and len(awaited.table("concepts")) == 2
    assert calls(tmp_path) == 4


def test_plan_calls_nothing(tmp_path: Path) -> None:
    before = len(CALLS)
    planned = retort.plan("sse_cot", input=ROWS, models=MODELS, limit=4, workspace=tmp_path)
    assert planned.run_id is None and len(CALLS) == before
    assert [s.calls_needed for s in planned.stages[:4]] == [4, 4, 4, 4]


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input must be a path"):
        retort.run("sse_cot", input=42, models=MODELS, workspace=tmp_path)
    with pytest.raises(UserError, match="positive number"):
        retort.run("sse_cot", input=ROWS, models=MODELS, limit=0, workspace=tmp_path)
    with pytest.raises(NotFoundError, match="no stage 'nope'"):
        retort.run("sse_cot", input=ROWS, models=MODELS, until="nope", workspace=tmp_path)
