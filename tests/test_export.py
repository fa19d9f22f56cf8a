"""`retort export`: every format's shape, the manifest, missing columns, --run, and
loading the files with Hugging Face `datasets` when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from retort import __version__
from retort.cache import Cache
from retort.errors import UserError
from retort.export import ExportResult, export

ROWS = [
    {"text": "a funny film", "label": "positive", "rationale": "It is funny.", "domain_rationale": "Film: funny."},
    {"text": "a dull film", "label": "negative", "rationale": None, "domain_rationale": "Film: dull."},
    {"text": "a fine film", "label": "positive", "rationale": "It is fine.", "domain_rationale": None},
]

PIPELINE = """
input: {path: data/rows.jsonl}
stages:
  - name: answer
    template: "Q: {{ text }}"
  - name: table
    sql: |
      SELECT _id, _parent, _call, _raw, text, label, rationale, domain_rationale,
             'Classify: ' || text AS prompt, answer AS completion,
             answer AS chosen, CASE WHEN rationale IS NULL THEN NULL ELSE 'wrong' END AS rejected
      FROM answer ORDER BY _id
  - name: plain
    sql: SELECT _id, text, label, rationale FROM input ORDER BY _id
"""

REPLIES = '''
from retort.errors import BackendError


def reply(request):
    text = request.messages[-1]["content"].removeprefix("Q: ")
    if text == "a broken film":
        raise BackendError("the model is down", retryable=False)
    return "A: " + text
'''

SECRET = "sk-test-do-not-write-me-0123456789"


@pytest.fixture
def db(workspace: Path) -> Path:
    (workspace / "pipelines" / "exp.yaml").write_text(PIPELINE)
    (workspace / "evaluators" / "exp_replies.py").write_text(REPLIES)
    (workspace / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    proc = run_cli("run", "exp", "--model", "*=scripted:exp_replies:reply", "--set", f"params.note={SECRET}",
                   "-q", "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return workspace


def _export(ws: Path, *args: str) -> dict[str, Any]:
    proc = run_cli("export", *args, cwd=ws)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    path = Path(line.split(" to ", 1)[1].split(" (manifest: ")[0])
    manifest = json.loads((ws / line.rsplit("(manifest: ", 1)[1].rstrip(")")).read_text())
    return {"path": ws / path, "manifest": manifest, "stdout": line}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_is_the_table_without_call_keys(db: Path) -> None:
    out = _export(db, "table", "--format", "jsonl")
    assert out["path"] == db / "exports" / "table.jsonl"
    assert out["stdout"].startswith("wrote 3 rows to exports/table.jsonl")
    rows = _jsonl(out["path"])
    assert [r["text"] for r in rows] == [r["text"] for r in ROWS]
    assert rows[0]["_id"] == "0.0" and rows[0]["_parent"] == "0"
    assert rows[1]["rationale"] is None
    assert "_call" not in rows[0] and "_raw" not in rows[0]


def test_manifest_records_the_run(db: Path) -> None:
    out = _export(db, "table", "--format", "jsonl")
    manifest = out["manifest"]
    con = duckdb.connect(str(db / ".retort" / "retort.duckdb"), read_only=True)
    try:
        [(spec_hash,)] = con.sql("SELECT spec_hash FROM runs WHERE run_id = 1").fetchall()
        models = [r[0] for r in con.sql("SELECT DISTINCT model FROM calls").fetchall()]
    finally:
        con.close()
    assert manifest["pipeline"] == "exp"
    assert manifest["run_id"] == 1
    assert manifest["spec_hash"] == spec_hash
    [model] = models  # a scripted function's identity names it and a digest of its code
    assert manifest["models"] == models and model.startswith("scripted:default:exp_replies:reply@")
    assert (manifest["format"], manifest["file"], manifest["rows"], manifest["kept"]) == ("jsonl", "table.jsonl", 3, 3)
    assert manifest["dropped"] is None  # a SQL stage does not count its input rows
    assert manifest["retort_version"] == __version__
    assert manifest["created_at"].endswith("+00:00")
    assert len(manifest["sha256"]) == 64
    text = (out["path"].parent / "table.jsonl.manifest.json").read_text()
    assert SECRET not in text and "argv" not in text


def test_dropped_counts_the_rows_a_prompt_stage_lost(db: Path) -> None:
    rows = [*ROWS, {"text": "a broken film", "label": "negative", "rationale": None, "domain_rationale": None}]
    (db / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("run", "exp", "--model", "*=scripted:exp_replies:reply", "--max-failures", "1", "-q", "--json",
                   cwd=db)
    assert proc.returncode == 0, proc.stderr
    manifest = _export(db, "answer", "--format", "jsonl")["manifest"]
    assert (manifest["run_id"], manifest["kept"], manifest["dropped"]) == (2, 3, 1)


def test_run_option_exports_an_earlier_run(db: Path) -> None:
    proc = run_cli("run", "exp", "--model", "*=scripted:exp_replies:reply", "--limit", "1", "-q", "--json", cwd=db)
    assert proc.returncode == 0, proc.stderr
    latest = _export(db, "table", "--format", "jsonl", "--out", "latest.jsonl")
    assert (latest["manifest"]["run_id"], latest["manifest"]["rows"]) == (2, 1)
    earlier = _export(db, "table", "--format", "jsonl", "--run", "1", "--out", "first.jsonl")
    assert (earlier["manifest"]["run_id"], earlier["manifest"]["rows"]) == (1, 3)
    assert earlier["path"] == db / "first.jsonl"


def test_parquet_keeps_types(db: Path) -> None:
    out = _export(db, "table", "--format", "parquet")
    assert out["path"] == db / "exports" / "table.parquet"
    table = pq.read_table(out["path"])
    assert table.num_rows == 3
    assert "_call" not in table.column_names and "_id" in table.column_names
    assert table.column("label").to_pylist() == ["positive", "negative", "positive"]


def test_multitask_writes_predict_and_explain_records(db: Path) -> None:
    out = _export(db, "table", "--format", "multitask")
    assert out["path"] == db / "exports" / "table.multitask.jsonl"
    assert _jsonl(out["path"]) == [
        {"input": "predict: a funny film", "output": "positive", "task": "predict"},
        {"input": "explain: a funny film", "output": "It is funny.", "task": "explain"},
        {"input": "explain_domain: a funny film", "output": "Film: funny.", "task": "explain_domain"},
        {"input": "predict: a dull film", "output": "negative", "task": "predict"},
        {"input": "explain_domain: a dull film", "output": "Film: dull.", "task": "explain_domain"},
        {"input": "predict: a fine film", "output": "positive", "task": "predict"},
        {"input": "explain: a fine film", "output": "It is fine.", "task": "explain"},
    ]
    assert (out["manifest"]["rows"], out["manifest"]["kept"], out["manifest"]["skipped"]) == (7, 3, 0)


def test_chat_prefers_prompt_and_completion(db: Path) -> None:
    rows = _jsonl(_export(db, "table", "--format", "chat")["path"])
    assert rows[0] == {"messages": [{"role": "user", "content": "Classify: a funny film"},
                                    {"role": "assistant", "content": "A: a funny film"}]}


def test_chat_from_text_rationale_and_label(db: Path) -> None:
    rows = _jsonl(_export(db, "plain", "--format", "chat")["path"])
    assert [r["messages"][1]["content"] for r in rows] == [
        "It is funny.\n\nLabel: positive", "negative", "It is fine.\n\nLabel: positive"]
    assert rows[0]["messages"][0] == {"role": "user", "content": "a funny film"}


def test_dpo_formats(db: Path) -> None:
    out = _export(db, "table", "--format", "dpo")
    assert _jsonl(out["path"]) == [
        {"prompt": "Classify: a funny film", "chosen": "A: a funny film", "rejected": "wrong"},
        {"prompt": "Classify: a fine film", "chosen": "A: a fine film", "rejected": "wrong"},
    ]
    assert (out["manifest"]["kept"], out["manifest"]["skipped"]) == (2, 1)  # a null rejected: no pair
    rows = _jsonl(_export(db, "table", "--format", "dpo-chat")["path"])
    assert rows[0] == {"prompt": [{"role": "user", "content": "Classify: a funny film"}],
                       "chosen": [{"role": "assistant", "content": "A: a funny film"}],
                       "rejected": [{"role": "assistant", "content": "wrong"}]}


def test_missing_columns_name_the_format_and_both_lists(db: Path) -> None:
    proc = run_cli("export", "plain", "--format", "dpo", cwd=db)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --format dpo needs the columns prompt, chosen, rejected; "
                                   "plain has: _id, text, label, rationale")
    proc = run_cli("export", "runs", "--format", "chat", cwd=db)
    assert proc.returncode == 2
    assert "--format chat needs the columns (prompt, completion) or (text, label); runs has: run_id," in proc.stderr
    assert not (db / "exports").exists()


def test_records_tables_export_without_a_run(db: Path) -> None:
    manifest = _export(db, "metrics", "--format", "jsonl")["manifest"]
    assert (manifest["pipeline"], manifest["run_id"], manifest["models"]) == (None, None, [])


def test_export_function_returns_a_result(db: Path, tmp_path: Path) -> None:
    cache = Cache(db / ".retort" / "retort.duckdb", read_only=True)
    try:
        result = export(cache, 'main."table"', "table", "multitask", tmp_path / "mt.jsonl")
        assert isinstance(result, ExportResult)
        assert (result.rows, result.kept, result.skipped, result.format) == (7, 3, 0, "multitask")
        assert result.manifest == tmp_path / "mt.jsonl.manifest.json"
        raw = export(cache, 'main."table"', "table", "jsonl", tmp_path / "raw.jsonl", include_raw=True)
        assert "_raw" in _jsonl(raw.path)[0]
        with pytest.raises(UserError, match="unknown export format 'csv'"):
            export(cache, 'main."table"', "table", "csv", tmp_path / "x.csv")
    finally:
        cache.con.close()


def test_files_load_with_hugging_face_datasets(db: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    cache_dir = str(tmp_path / "hf")
    expected = {"jsonl": (3, "text"), "multitask": (7, "task"), "chat": (3, "messages"), "dpo": (2, "chosen"),
                "dpo-chat": (2, "rejected")}
    for fmt, (rows, column) in expected.items():
        path = _export(db, "table", "--format", fmt)["path"]
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        assert loaded.num_rows == rows and column in loaded.column_names
    path = _export(db, "table", "--format", "parquet")["path"]
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
    assert loaded.num_rows == 3
    chat = datasets.load_dataset("json", data_files=str(db / "exports" / "table.dpo-chat.jsonl"), split="train",
                                 cache_dir=cache_dir)
    assert chat[0]["prompt"] == [{"role": "user", "content": "Classify: a funny film"}]
