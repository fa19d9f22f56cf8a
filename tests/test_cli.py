"""The CLI as a user runs it: real processes, the real DuckDB file, clear errors without tracebacks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ROOT, run_cli

ROWS = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(8)]

PIPELINE = """\
input:
  path: data/rows.jsonl
models:
  default: {backend: scripted, function: "retort.backends.scripted:echo"}
stages:
  - name: concepts
    prompt: demo/concepts
    samples: 2
  - name: keep
    sql: SELECT * FROM concepts WHERE _sample = 0
  - name: score
    python: accuracy
    from: keep
    with: {prediction: label, reference: label}
"""


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (workspace / "prompts" / "demo").mkdir()
    (workspace / "prompts" / "demo" / "concepts.j2").write_text("Key concepts of:\n{{ text }}\n")
    (workspace / "pipelines" / "demo.yaml").write_text(PIPELINE)
    return workspace


def db(ws: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)


def test_run_then_rerun_hits_the_cache(ws: Path) -> None:
    first = run_cli("run", "demo", "--json", "-q", cwd=ws)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["calls_made"] == 16 and result["cache_hits"] == 0
    assert [s["rows_out"] for s in result["stages"]] == [16, 8, 1]
    second = json.loads(run_cli("run", "demo", "--json", "-q", cwd=ws).stdout)
    assert second["calls_made"] == 0 and second["cache_hits"] == 16
    con = db(ws)
    assert con.execute("SELECT count(*) FROM calls").fetchall()[0][0] == 16
    assert con.execute("SELECT accuracy FROM main.score").fetchall()[0][0] == 1.0
    assert con.execute("SELECT run_id, status FROM runs ORDER BY 1").fetchall() == [(1, "ok"), (2, "ok")]


def test_python_cli_py_and_summary_say_where_results_are(ws: Path) -> None:
    out = run_cli("run", "demo", cwd=ws)
    assert out.returncode == 0, out.stderr
    assert ".retort/retort.duckdb" in out.stdout
    assert "calls made 16" in out.stdout
    assert "concepts" in out.stderr  # the progress lines go to stderr


def test_input_limit_set_and_map(ws: Path) -> None:
    other = ws / "other.csv"
    other.write_text("sentence,gold\nfirst thing,negative\nsecond thing,positive\nthird,negative\n")
    out = run_cli("run", "demo", "--input", str(other), "--map", "text=sentence", "--map", "label=gold",
                  "--limit", "2", "--set", "stages.concepts.samples=1", "--json", "-q", cwd=ws)
    assert out.returncode == 0, out.stderr
    con = db(ws)
    assert sorted(con.execute("SELECT concepts FROM main.concepts").fetchall()) == [
        ("Key concepts of:\nfirst thing",), ("Key concepts of:\nsecond thing",)]


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_input_formats(ws: Path, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ws / f"rows.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
    else:
        path.write_text(json.dumps(ROWS[:3]))
    out = run_cli("run", "demo", "--input", str(path), "--json", "-q", cwd=ws)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stages"][0]["rows_in"] == 3


def test_validate_plan_show_export_list_cache_schema(ws: Path) -> None:
    assert "3 stages valid" in run_cli("validate", "demo", cwd=ws).stdout
    plan = run_cli("plan", "demo", "--json", cwd=ws)
    assert json.loads(plan.stdout)["stages"][0]["calls_needed"] == 16
    assert not (ws / ".retort" / "retort.duckdb").exists() or db(ws).execute(
        "SELECT count(*) FROM runs").fetchall()[0][0] == 0
    run_cli("run", "demo", "-q", cwd=ws)
    show = run_cli("show", "concepts", "-n", "3", cwd=ws)
    assert show.returncode == 0 and "(16 rows)" in show.stdout and "review 0" in show.stdout
    assert run_cli("show", "concepts", "--run", "1", cwd=ws).returncode == 0
    exported = run_cli("export", "keep", "--format", "jsonl", "--out", str(ws / "keep.jsonl"), cwd=ws)
    assert exported.returncode == 0, exported.stderr
    lines = (ws / "keep.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["text"].startswith("review")
    listing = run_cli("list", cwd=ws)
    assert "demo" in listing.stdout and "sse_cot" in listing.stdout  # the workspace and the built-in library
    stats = run_cli("cache", "stats", cwd=ws)
    assert "scripted:default" in stats.stdout and "16" in stats.stdout
    schema = json.loads(run_cli("schema", cwd=ws).stdout)
    assert schema["title"] == "retort pipeline"


def test_init_creates_a_workspace_that_validates(tmp_path: Path) -> None:
    out = run_cli("init", "proj", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        assert (tmp_path / "proj" / folder).is_dir()
    check = run_cli("validate", "example", cwd=tmp_path / "proj", env={"RETORT_ALLOWED_BACKENDS": "local,scripted"})
    assert check.returncode == 0, check.stderr
    again = run_cli("init", "proj", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def _error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def edit(ws: Path, old: str, new: str) -> None:
    path = ws / "pipelines" / "demo.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_bad_yaml(ws: Path) -> None:
    edit(ws, "    samples: 2\n", "    samples: [2\n")
    msg = _error(run_cli("run", "demo", cwd=ws))
    assert "demo.yaml:9: malformed YAML: expected ',' or ']'" in msg
    assert "flow sequence at line 8" in msg


def test_unknown_field(ws: Path) -> None:
    edit(ws, "    samples: 2\n", "    sampels: 2\n")
    assert "demo.yaml:8 stages[0] (concepts).sampels: unknown field" in _error(run_cli("run", "demo", cwd=ws))


def test_template_variable_the_input_lacks(ws: Path) -> None:
    (ws / "prompts" / "demo" / "concepts.j2").write_text("Key concepts of:\n{{ text }} {{ topic }}\n")
    msg = _error(run_cli("run", "demo", cwd=ws))
    assert "has no column 'topic'" in msg and "prompts/demo/concepts (line 2)" in msg


def test_unknown_model_and_prompt(ws: Path) -> None:
    edit(ws, "    samples: 2\n", "    samples: 2\n    model: teacher\n")
    assert "no model named 'teacher'" in _error(run_cli("run", "demo", cwd=ws))
    edit(ws, "    model: teacher\n", "")
    edit(ws, "prompt: demo/concepts", "prompt: demo/nope")
    msg = _error(run_cli("validate", "demo", cwd=ws))
    assert "demo.yaml:7 stages[0] (concepts).prompt: no template 'demo/nope'" in msg


def test_bad_sql(ws: Path) -> None:
    edit(ws, "SELECT * FROM concepts WHERE", "SELEC * FROM concepts WHERE")
    msg = _error(run_cli("validate", "demo", cwd=ws))
    assert "demo.yaml:10 stages[1] (keep).sql:" in msg and "syntax error" in msg.lower()
    edit(ws, "SELEC * FROM concepts WHERE", "SELECT * FROM nowhere WHERE")
    assert "nowhere" in _error(run_cli("validate", "demo", cwd=ws))


def test_sql_stage_cannot_read_files(ws: Path) -> None:
    edit(ws, "SELECT * FROM concepts WHERE _sample = 0", "SELECT * FROM read_csv('/etc/passwd')")
    msg = _error(run_cli("run", "demo", cwd=ws))
    assert "stages[1] (keep).sql" in msg and "/etc/passwd" in msg and "disabled" in msg


def test_missing_dataset_and_missing_column(ws: Path) -> None:
    assert "does-not-exist.jsonl does not exist" in _error(
        run_cli("run", "demo", "--input", "does-not-exist.jsonl", cwd=ws))
    (ws / "other.jsonl").write_text(json.dumps({"sentence": "x", "label": "positive"}))
    msg = _error(run_cli("run", "demo", "--input", "other.jsonl", cwd=ws))
    assert "other.jsonl has no column 'text'" in msg and "--map" in msg
    msg = _error(run_cli("run", "demo", "--input", "other.jsonl", "--map", "text=sentense", cwd=ws))
    assert "input.columns" in msg and "sentense" in msg


def test_failures_decide_the_exit_code_and_nothing_done_is_lost(ws: Path) -> None:
    (ws / "evaluators" / "flaky.py").write_text(
        "from retort.errors import BackendError\n"
        "def reply(request):\n"
        "    if 'review 3' in request.messages[-1]['content']:\n"
        "        raise BackendError('bad request', status=400)\n"
        "    return 'ok'\n")
    out = run_cli("run", "demo", "--model", "default=scripted:flaky:reply", "-q", cwd=ws)
    assert out.returncode == 1 and "2 failure(s)" in out.stderr
    assert db(ws).execute("SELECT count(*) FROM calls").fetchall()[0][0] == 14
    assert run_cli("run", "demo", "--model", "default=scripted:flaky:reply", "--max-failures", "2", "-q",
                   cwd=ws).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.http
def test_refused_endpoint_fails_fast_naming_the_url(ws: Path) -> None:
    port = _free_port()
    begun = time.monotonic()
    out = run_cli("run", "demo", "--model", f"default=http://127.0.0.1:{port}/v1#some-model", cwd=ws)
    msg = _error(out)
    assert f"http://127.0.0.1:{port}/v1" in msg and "cannot reach" in msg
    assert time.monotonic() - begun < 30
    con = db(ws)
    assert con.execute("SELECT count(*) FROM calls").fetchall()[0][0] == 0


SLOW = PIPELINE.replace('function: "retort.backends.scripted:echo"',
                        'function: "retort.backends.scripted:echo", delay: 0.05, max_concurrency: 4')


def test_sigkill_mid_run_then_rerun_resumes(ws: Path) -> None:
    rows = [{"text": f"review {i}", "label": "positive"} for i in range(150)]
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (ws / "pipelines" / "demo.yaml").write_text(SLOW)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", "demo", "-q"], cwd=ws, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    flushed = 0
    while time.monotonic() < deadline and flushed < 40:  # wait until a few group commits landed
        time.sleep(0.3)
        flushed = _count_calls_while_running(ws)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    con = db(ws)
    kept = con.execute("SELECT count(*) FROM calls").fetchall()[0][0]
    con.close()
    assert 40 <= kept < 300  # killed mid-way, with whole flushes on disk
    rerun = run_cli("run", "demo", "--json", "-q", cwd=ws)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["calls_made"] == 300 - kept  # no flushed call repeated
    assert result["cache_hits"] == kept
    con = db(ws)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM calls").fetchall()[0] == (300, 300)
    assert con.execute("SELECT count(*), count(DISTINCT _id) FROM main.concepts").fetchall()[0] == (300, 300)
    assert con.execute("SELECT count(*) FROM main.keep").fetchall()[0][0] == 150


def _count_calls_while_running(ws: Path) -> int:
    """The runner holds the write lock; read a snapshot through a copy of the file."""
    import shutil
    import tempfile

    src = ws / ".retort" / "retort.duckdb"
    if not src.exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "snap.duckdb"
        shutil.copy(src, copy)
        wal = src.with_suffix(".duckdb.wal")
        if wal.exists():
            shutil.copy(wal, copy.with_suffix(".duckdb.wal"))
        try:
            con = duckdb.connect(str(copy))
            try:
                return int(con.execute("SELECT count(*) FROM calls").fetchall()[0][0])
            finally:
                con.close()
        except duckdb.Error:
            return 0


def test_second_process_gets_a_clear_message(ws: Path) -> None:
    rows = [{"text": f"review {i}", "label": "positive"} for i in range(200)]
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # slow enough (about a minute) that the first run surely holds the file while the others start
    (ws / "pipelines" / "demo.yaml").write_text(SLOW.replace("delay: 0.05", "delay: 0.5"))
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", "demo", "-q"], cwd=ws, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (ws / ".retort" / "retort.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        msg = _error(run_cli("run", "demo", "-q", cwd=ws))
        assert "is in use by another process" in msg and "retort.duckdb" in msg
        assert "in use" in _error(run_cli("show", "concepts", cwd=ws))
    finally:
        first.kill()
        first.wait(timeout=30)
    runs = run_cli("show", "runs", "--columns", "run_id,status", "--all-columns", cwd=ws)  # the file is intact
    assert runs.returncode == 0, runs.stderr
    assert "crashed" in runs.stdout and "running" not in runs.stdout  # the killed run, as a reader sees it
    from retort.cache import Cache

    Cache(ws / ".retort" / "retort.duckdb").close()  # the next writer records it in the file
    con = db(ws)
    assert con.execute("SELECT status FROM runs").fetchall() == [("crashed",)]
    con.close()
