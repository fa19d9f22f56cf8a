"""`retort export`: every format's shape, the manifest, missing columns, --run, and
loading the files with Hugging Face `datasets` when it is installed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import db_rows, run_cli

from retort import __version__
from retort.cache import Cache
from retort.errors import UserError
from retort.export import ExportResult, export
from retort.parsers import build_parser

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
             'Classify: ' || text AS prompt, answer || chr(10) AS completion,
             answer || chr(10) AS chosen,
             CASE WHEN rationale IS NULL THEN NULL ELSE '  wrong' || chr(10) END AS rejected
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
    assert (manifest["run_id"], manifest["run_status"]) == (1, "ok")
    assert manifest["spec_hash"] == spec_hash
    [model] = models  # a scripted function's identity names it and a digest of its code
    assert manifest["models"] == models and model.startswith("scripted:default:exp_replies:reply@")
    assert (manifest["format"], manifest["file"], manifest["rows"], manifest["kept"]) == ("jsonl", "table.jsonl", 3, 3)
    assert (manifest["dropped"], manifest["dropped_because"], manifest["gold_label"]) == (0, {}, None)
    assert manifest["retort_version"] == __version__
    assert manifest["created_at"].endswith("+00:00")
    assert len(manifest["sha256"]) == 64
    text = (out["path"].parent / "table.jsonl.manifest.json").read_text()
    assert SECRET not in text and "argv" not in text
    assert manifest["options"]["set"] == {"params.note": "<redacted>"}  # it looks like a key: never written


def test_manifest_counts_the_calls_a_prompt_stage_lost(db: Path) -> None:
    rows = [*ROWS, {"text": "a broken film", "label": "negative", "rationale": None, "domain_rationale": None}]
    (db / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("run", "exp", "--model", "*=scripted:exp_replies:reply", "--max-failures", "1", "-q", "--json",
                   cwd=db)
    assert proc.returncode == 0, proc.stderr
    manifest = _export(db, "answer", "--format", "jsonl")["manifest"]
    answer = next(s for s in manifest["stages"] if s["name"] == "answer")
    assert (manifest["run_id"], manifest["kept"]) == (2, 3)
    assert (answer["rows_in"], answer["rows_out"], answer["failures"], answer["parse_errors"]) == (4, 3, 1, 0)


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
        # every example trains predict on its gold label (the method's layout); a missing rationale
        # writes no explain record, never an invented one
        {"input": "predict: a dull film", "output": "negative", "task": "predict"},
        {"input": "explain_domain: a dull film", "output": "Film: dull.", "task": "explain_domain"},
        {"input": "predict: a fine film", "output": "positive", "task": "predict"},
        {"input": "explain: a fine film", "output": "It is fine.", "task": "explain"},
    ]
    manifest = out["manifest"]
    assert (manifest["rows"], manifest["kept"], manifest["dropped"]) == (7, 3, 0)
    assert manifest["gold_label"] == "label"
    assert manifest["supervision"] == {"predict": "label (gold)", "explain": "rationale",
                                       "explain_domain": "domain_rationale"}


def test_chat_prefers_prompt_and_completion(db: Path) -> None:
    out = _export(db, "table", "--format", "chat")
    rows = _jsonl(out["path"])
    assert rows[0] == {"messages": [{"role": "user", "content": "Classify: a funny film"},
                                    {"role": "assistant", "content": "A: a funny film"}]}  # stripped of "\n"
    assert out["manifest"]["supervision"] == {"user": "prompt", "assistant": "completion"}
    assert out["manifest"]["gold_label"] is None


def test_chat_gold_says_so_and_needs_the_rationale_it_writes(db: Path) -> None:
    proc = run_cli("export", "plain", "--format", "chat", cwd=db)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --format chat needs the columns (prompt, completion) or (text, prediction); "
                                   "plain has: _id, text, label, rationale; --format chat-gold writes text -> "
                                   "the gold label")
    out = _export(db, "plain", "--format", "chat-gold")
    assert out["path"] == db / "exports" / "plain.chat-gold.jsonl"
    rows = _jsonl(out["path"])
    assert [r["messages"][1]["content"] for r in rows] == ["It is funny.\n\nLabel: positive",
                                                           "It is fine.\n\nLabel: positive"]
    assert rows[0]["messages"][0] == {"role": "user", "content": "a funny film"}
    manifest = out["manifest"]
    assert (manifest["gold_label"], manifest["dropped"], manifest["dropped_because"]) == ("label", 1, {"rationale": 1})
    assert manifest["supervision"] == {"user": "text", "assistant": "rationale + label (gold)"}


def test_dpo_formats_strip_whitespace(db: Path) -> None:
    out = _export(db, "table", "--format", "dpo")
    assert _jsonl(out["path"]) == [
        {"prompt": "Classify: a funny film", "chosen": "A: a funny film", "rejected": "wrong"},
        {"prompt": "Classify: a fine film", "chosen": "A: a fine film", "rejected": "wrong"},
    ]
    assert (out["manifest"]["kept"], out["manifest"]["dropped"]) == (2, 1)  # a null rejected: no pair
    assert out["manifest"]["dropped_because"] == {"rejected": 1}
    rows = _jsonl(_export(db, "table", "--format", "dpo-chat")["path"])
    assert rows[0] == {"prompt": [{"role": "user", "content": "Classify: a funny film"}],
                       "chosen": [{"role": "assistant", "content": "A: a funny film"}],
                       "rejected": [{"role": "assistant", "content": "wrong"}]}
    raw = _jsonl(_export(db, "table", "--format", "jsonl")["path"])  # the table itself keeps its whitespace
    assert (raw[0]["chosen"], raw[0]["rejected"]) == ("A: a funny film\n", "  wrong\n")


def test_missing_columns_name_the_format_and_both_lists(db: Path) -> None:
    proc = run_cli("export", "plain", "--format", "dpo", cwd=db)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --format dpo needs the columns prompt, chosen, rejected; "
                                   "plain has: _id, text, label, rationale")
    proc = run_cli("export", "runs", "--format", "chat", cwd=db)
    assert proc.returncode == 2
    assert "--format chat needs the columns (prompt, completion) or (text, prediction); runs has: run_id," \
        in proc.stderr
    assert not (db / "exports").exists()


def test_records_tables_export_without_a_run(db: Path) -> None:
    manifest = _export(db, "metrics", "--format", "jsonl")["manifest"]
    assert (manifest["pipeline"], manifest["run_id"], manifest["models"]) == (None, None, [])


def test_export_function_returns_a_result(db: Path, tmp_path: Path) -> None:
    cache = Cache(db / ".retort" / "retort.duckdb", read_only=True)
    try:
        result = export(cache, 'main."table"', "table", "multitask", tmp_path / "mt.jsonl")
        assert isinstance(result, ExportResult)
        assert (result.rows, result.kept, result.dropped, result.format) == (7, 3, 0, "multitask")
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


# ------------------------------------------------------------------ exports never invent

CLASSIFY = """
input: {path: data/reviews.jsonl}
params: {labels: [positive, negative]}
stages:
  - name: classify
    template: "Label this review: {{ text }}"
    params: {temperature: 0.3, max_tokens: 12, seed: 7}
    parse: {choice: "{{ params.labels }}"}
    output: prediction
"""

REVIEWS = [{"text": "a funny film", "label": "positive"}, {"text": "a dull film", "label": "negative"},
           {"text": "a fine film", "label": "positive"}, {"text": "a sad film", "label": "negative"}]

CLASSIFIER = '''
ANSWERS = {"a funny film": "negative", "a dull film": "I cannot tell.", "a fine film": "  positive\\n"}


def some(request):
    """Wrong on one review, no label on two: only two of four rows parse."""
    return ANSWERS.get(request.messages[-1]["content"].removeprefix("Label this review: "), "hmm")


def none(request):
    return "I would rather not say."
'''


def _classify(ws: Path, function: str, *args: str) -> None:
    (ws / "pipelines" / "cls.yaml").write_text(CLASSIFY)
    (ws / "evaluators" / "cls_replies.py").write_text(CLASSIFIER)
    (ws / "data" / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    proc = run_cli("run", "cls", "--model", f"default=scripted:cls_replies:{function}", *args, "-q", "--json",
                   cwd=ws)
    assert proc.returncode == 0, proc.stderr


def test_an_all_failed_classify_table_exports_no_chat_rows(workspace: Path) -> None:
    _classify(workspace, "none")
    assert db_rows(workspace, "SELECT count(*), count(_error), count(prediction) FROM main.classify") == [(4, 4, 0)]
    proc = run_cli("export", "classify", "--format", "chat-gold", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 0 rows to exports/classify.chat-gold.jsonl")  # before: 4 text -> gold rows
    assert "dropped 4 of 4 rows: 4 with _error set (the output did not parse)" in proc.stderr
    assert "warning: exports/classify.chat-gold.jsonl is empty" in proc.stderr
    assert (workspace / "exports" / "classify.chat-gold.jsonl").read_text() == ""
    manifest = json.loads((workspace / "exports" / "classify.chat-gold.jsonl.manifest.json").read_text())
    assert (manifest["rows"], manifest["kept"], manifest["dropped"]) == (0, 0, 4)
    assert manifest["dropped_because"] == {"_error": 4}
    proc = run_cli("export", "classify", "--format", "chat", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 0 rows to exports/classify.chat.jsonl")
    assert "dropped 4 of 4 rows" in proc.stderr


def test_chat_teaches_the_models_prediction_and_chat_gold_the_gold_label(workspace: Path) -> None:
    _classify(workspace, "some")
    chat = _export(workspace, "classify", "--format", "chat")
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in _jsonl(chat["path"])] == [
        ("a funny film", "negative"), ("a fine film", "positive")]  # the model's answers, wrong one included
    assert (chat["manifest"]["kept"], chat["manifest"]["dropped_because"]) == (2, {"_error": 2})
    assert chat["manifest"]["supervision"] == {"user": "text", "assistant": "prediction"}
    gold = _export(workspace, "classify", "--format", "chat-gold")
    assert [r["messages"][1]["content"] for r in _jsonl(gold["path"])] == ["positive", "positive"]
    assert gold["manifest"]["gold_label"] == "label"


def test_where_narrows_and_refuses_anything_but_one_filter(db: Path) -> None:
    out = _export(db, "table", "--format", "jsonl", "--where", "label = 'positive'", "--out", "pos.jsonl")
    assert [r["text"] for r in _jsonl(out["path"])] == ["a funny film", "a fine film"]
    assert (out["manifest"]["where"], out["manifest"]["table_rows"], out["manifest"]["rows"]) == (
        "label = 'positive'", 3, 2)
    calls = db_rows(db, "SELECT count(*), min(text) FROM calls")
    attempts = {"1=1; DELETE FROM calls": "without ';'",
                "1=1) UNION ALL SELECT * FROM main.table WHERE (1=1": "with nothing after it",
                "1=1) ORDER BY (1": "with nothing after it",
                "no_such_column = 1": 'Referenced column "no_such_column" not found'}
    for where, message in attempts.items():
        for command in ("export", "show"):
            proc = run_cli(command, "table", "--where", where, cwd=db)
            assert proc.returncode == 2, (command, where, proc.stdout)
            assert proc.stderr.startswith(f"error: --where {where!r}: ") and message in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
    assert db_rows(db, "SELECT count(*), min(text) FROM calls") == calls
    assert not (db / "exports").exists()
    shown = run_cli("show", "table", "--where", "label = 'negative'", cwd=db)
    assert shown.returncode == 0 and "(1 rows)" in shown.stdout and "a dull film" in shown.stdout


def test_manifest_records_input_options_digests_and_sampling(workspace: Path) -> None:
    _classify(workspace, "some", "--limit", "3", "--map", "text=lower(text)", "--set", "params.note=hello",
              "--set", "models.default.backend=openai", "--set", "models.default.api_key_env=MY_KEY")
    manifest = _export(workspace, "classify", "--format", "jsonl")["manifest"]
    data = workspace / "data" / "reviews.jsonl"
    assert manifest["input"] == {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                 "limit": 3}
    assert manifest["options"] == {"input": None, "limit": 3, "map": {"text": "lower(text)"},
                                   "set": {"params.note": "hello", "models.default.backend": "openai",
                                           "models.default.api_key_env": "<redacted>"},
                                   "model": {"default": "scripted:cls_replies:some"}, "sample": None, "seed": 0}
    [stage] = manifest["stages"]
    assert stage["template"] == hashlib.sha256(b"Label this review: {{ text }}").hexdigest()
    labels = build_parser({"choice": ["positive", "negative"]}, "prediction")  # the rule with params filled in
    assert stage["parser"] == hashlib.sha256(labels.identity.encode()).hexdigest()
    assert (stage["rows_in"], stage["rows_out"], stage["parse_errors"]) == (3, 3, 1)
    [model] = manifest["models"]  # the scripted function's code is part of its identity
    assert model.startswith("scripted:default:cls_replies:some@")
    assert manifest["sampling"] == [{"model": model, "tables": ["classify"],
                                     "params": {"temperature": 0.3, "max_tokens": 12, "seed": 7}}]


def test_workspace_option_exports_into_the_workspace(db: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = run_cli("-C", str(db), "export", "table", "--format", "dpo", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert (db / "exports" / "table.dpo.jsonl").is_file()
    assert not (elsewhere / "exports").exists()
    assert str(db / "exports" / "table.dpo.jsonl") in proc.stdout


def test_option_values_that_look_like_credentials_are_redacted() -> None:
    from retort.export import _redact

    assert _redact("params.note", "hello") == "hello"
    assert _redact("models.x.api_key", "plain-looking") == "<redacted>"  # by the setting's name
    assert _redact("params.note", "hf_abcdefghijklmnop") == "<redacted>"  # by the value's shape
    assert _redact("teacher", "http://me:s3cret@host:8000/v1#m") == "http://me:<redacted>@host:8000/v1#m"
    assert _redact("teacher", "https://host/v1?api_key=abc&x=1") == "https://host/v1?api_key=<redacted>&x=1"
