"""The store's promises, tried the way a hostile world would: writes that fail, SQL that tries to
write, runs that are interrupted or fail before they start, datasets that must not vanish.
Every test counts calls and rows before and after; "no exception" is never the pass."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from retort.cache import Cache
from retort.runner import Runner
from retort.spec import load_pipeline
from retort.workspace import Workspace
from tests.conftest import ROOT, run_cli

FUNCS = '''\
import re, time

def mixed(request):
    """A JSON reply whose field `a` is a number in odd rows and text in even rows."""
    n = int(re.search(r"item (\\d+)", request.messages[-1]["content"]).group(1))
    return '{"a": %s}' % (n if n % 2 else '"text %d"' % n)

def slow(request):
    time.sleep(0.02)
    return "answer: " + request.messages[-1]["content"]

def picky(request):
    """Fails for item 3, whatever is asked of it."""
    if "item 3" in request.messages[-1]["content"]:
        raise RuntimeError("no")
    return "fine"
'''


def make(ws: Path, pipeline: str, rows: int = 40, name: str = "p", text: str = "item {i}") -> None:
    for folder in ("pipelines", "data", "evaluators"):
        (ws / folder).mkdir(exist_ok=True)
    (ws / "evaluators" / "funcs.py").write_text(FUNCS)
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": text.format(i=i), "label": "x"})
                                                      for i in range(rows)))
    (ws / "pipelines" / f"{name}.yaml").write_text(pipeline)


def sql(ws: Path, query: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


MIXED = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "funcs:mixed"}
stages:
  - name: ask
    template: "Give JSON for {{ text }}"
    parse: {json: {schema: {type: object, properties: {a: {}}, required: [a]}}}
"""


def test_a_field_whose_type_varies_keeps_every_call_and_row(tmp_path: Path) -> None:
    make(tmp_path, MIXED)
    out = run_cli("run", "p", "--json", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["calls_made"] == 40
    assert sql(tmp_path, "SELECT count(*) FROM calls") == [(40,)]
    rows = dict(sql(tmp_path, "SELECT text, a FROM p.ask"))
    assert len(rows) == 40 and rows["item 3"] == "3" and rows["item 4"] == "text 4"  # stored as text
    again = run_cli("run", "p", "--json", "-q", cwd=tmp_path)
    assert json.loads(again.stdout)["calls_made"] == 0  # nothing is paid twice


def _runner(ws: Path, cache: Cache, **kw: Any) -> Runner:
    pipeline, source = load_pipeline(ws / "pipelines" / "p.yaml")
    return Runner(Workspace(ws), pipeline, source, cache, **kw)


def test_a_flush_that_fails_once_loses_no_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, MIXED.replace("funcs:mixed", "funcs:slow").replace(
        "parse: {json: {schema: {type: object, properties: {a: {}}, required: [a]}}}", ""), rows=120)
    real = Cache._write_rows
    failed: list[int] = []

    def flaky(self: Cache, con: Any, batch: Any) -> None:
        if not failed:  # the first group commit's stage rows fail; its calls must still be committed
            failed.append(sum(len(r) for r in batch.rows.values()))
            raise duckdb.IOException("injected: disk hiccup")
        real(self, con, batch)

    monkeypatch.setattr(Cache, "_write_rows", flaky)
    cache = Cache(tmp_path / ".retort" / "retort.duckdb")
    try:
        result = asyncio.run(_runner(tmp_path, cache).execute())
    finally:
        cache.close()
    assert failed and failed[0] > 0
    assert result.status == "ok" and result.totals()["calls_made"] == 120
    assert sql(tmp_path, "SELECT count(*), count(DISTINCT key) FROM calls") == [(120, 120)]
    assert sql(tmp_path, "SELECT count(*), count(DISTINCT _id) FROM p.ask") == [(120, 120)]


def test_a_store_that_keeps_failing_fails_the_run_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, MIXED.replace("funcs:mixed", "funcs:slow"), rows=20)

    def broken(self: Cache, con: Any, batch: Any) -> None:
        raise duckdb.IOException("injected: disk full")

    monkeypatch.setattr(Cache, "_write_rows", broken)
    cache = Cache(tmp_path / ".retort" / "retort.duckdb")
    from retort.errors import CacheError

    with pytest.raises(CacheError, match="disk full"):
        try:
            asyncio.run(_runner(tmp_path, cache).execute())
        finally:
            monkeypatch.undo()
            cache.close()
    assert sql(tmp_path, "SELECT count(*) FROM calls") == [(20,)]  # the ledger was committed on its own
    assert sql(tmp_path, "SELECT status FROM runs") == [("error",)]
    assert sql(tmp_path, "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = 'p'") == [(0,)]  # not latest


WRITES = [
    "SELECT * FROM ask; DELETE FROM calls; SELECT * FROM ask",
    "SELECT * FROM ask; UPDATE main.calls SET text = 'X'",
    "SELECT * FROM ask; DROP TABLE main.runs",
    "DELETE FROM calls",
    "INSERT INTO calls SELECT * FROM calls",
    "CREATE TABLE x AS SELECT 1",
    "ATTACH ':memory:' AS other",
    "SET enable_external_access = true",
]


@pytest.mark.parametrize("statement", WRITES)
def test_sql_stages_cannot_write(tmp_path: Path, statement: str) -> None:
    base = MIXED.replace("funcs:mixed", "funcs:slow") + "  - name: keep\n    sql: \"SELECT * FROM ask\"\n"
    make(tmp_path, base, rows=5)
    assert run_cli("run", "p", "-q", cwd=tmp_path).returncode == 0
    before = sql(tmp_path, "SELECT key, text FROM calls ORDER BY key"), sql(tmp_path, "SELECT run_id, status FROM runs")
    (tmp_path / "pipelines" / "p.yaml").write_text(base.replace('sql: "SELECT * FROM ask"', f'sql: "{statement}"'))
    out = run_cli("run", "p", "-q", cwd=tmp_path)
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
    assert "p.yaml:" in out.stderr and "(keep).sql" in out.stderr
    assert sql(tmp_path, "SELECT key, text FROM calls ORDER BY key") == before[0]
    assert sql(tmp_path, "SELECT run_id, status FROM runs WHERE run_id = 1") == before[1]
    assert sql(tmp_path, "SELECT count(*) FROM p.keep") == [(5,)]  # the complete tables stay the latest


def test_a_where_filter_cannot_write(tmp_path: Path) -> None:
    pipeline = MIXED.replace("funcs:mixed", "funcs:slow").replace(
        "parse: {json: {schema: {type: object, properties: {a: {}}, required: [a]}}}",
        "where: \"text <> 'x'); DELETE FROM calls; SELECT 1 WHERE (1 = 1\"")
    make(tmp_path, pipeline, rows=5)
    out = run_cli("run", "p", "-q", cwd=tmp_path)
    assert out.returncode == 2 and "(ask).where" in out.stderr and "one SELECT" in out.stderr
    assert sql(tmp_path, "SELECT count(*) FROM calls") == [(0,)]


def test_sql_templates_quote_every_value(tmp_path: Path) -> None:
    pipeline = MIXED.replace("funcs:mixed", "funcs:slow").replace(
        "parse: {json: {schema: {type: object, properties: {a: {}}, required: [a]}}}", "") + \
        "  - name: keep\n    sql: \"SELECT {{ params.tag }} AS tag, count(*) AS n FROM ask\"\nparams: {tag: plain}\n"
    make(tmp_path, pipeline, rows=3)
    out = run_cli("run", "p", "-q", "--set", "params.tag=it's'; DELETE FROM calls; --", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sql(tmp_path, "SELECT tag, n FROM p.keep") == [("it's'; DELETE FROM calls; --", 3)]
    assert sql(tmp_path, "SELECT count(*) FROM calls") == [(3,)]


SLOWRUN = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "funcs:slow", max_concurrency: 4}
stages:
  - name: first
    template: "{{ text }}"
  - name: second
    from: first
    template: "again {{ _raw }}"
"""


def _interrupt(ws: Path, sig: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", "p", "-q"], cwd=ws,
                            env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (ws / ".retort" / "retort.duckdb.wal").exists():
        time.sleep(0.1)
    time.sleep(2.5)  # some group commits of the rerun have landed
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_rerun_keeps_the_complete_tables(tmp_path: Path, sig: int, code: int, word: str) -> None:
    make(tmp_path, SLOWRUN, rows=600)
    assert run_cli("run", "p", "-q", "--limit", "40", cwd=tmp_path).returncode == 0  # complete: 40 + 40 rows
    calls = sql(tmp_path, "SELECT count(*) FROM calls")[0][0]
    stopped = _interrupt(tmp_path, sig)  # all 600 rows: killed part-way
    assert stopped.returncode == code, stopped.stderr
    assert stopped.stderr.startswith(word) and "run 2 is kept as interrupted" in stopped.stderr
    assert sql(tmp_path, "SELECT run_id, status FROM runs ORDER BY 1") == [(1, "ok"), (2, "interrupted")]
    flushed = sql(tmp_path, "SELECT count(*) FROM calls")[0][0]
    assert calls < flushed < calls + 1200  # the rerun's calls so far were flushed on the way out
    assert sql(tmp_path, "SELECT (SELECT count(*) FROM p.first), (SELECT count(*) FROM p.second)") == [(40, 40)]
    shown = run_cli("show", "second", cwd=tmp_path)
    assert shown.returncode == 0 and "(40 rows)" in shown.stdout
    exported = run_cli("export", "first", "--out", str(tmp_path / "first.jsonl"), cwd=tmp_path)
    assert exported.returncode == 0 and len((tmp_path / "first.jsonl").read_text().splitlines()) == 40
    partial = run_cli("show", "first", "--run", "2", cwd=tmp_path)
    assert partial.returncode == 0 and "run 2 is interrupted" in partial.stderr
    resumed = run_cli("run", "p", "-q", "--json", cwd=tmp_path)
    assert resumed.returncode == 0
    assert json.loads(resumed.stdout)["calls_made"] == 1200 - flushed  # exactly what was not flushed
    assert sql(tmp_path, "SELECT count(*) FROM p.second") == [(600,)]
    assert sql(tmp_path, "SELECT count(*), count(DISTINCT key) FROM calls") == [(1200, 1200)]


def test_a_failed_preflight_changes_nothing(tmp_path: Path) -> None:
    make(tmp_path, SLOWRUN, rows=5)
    assert run_cli("run", "p", "-q", cwd=tmp_path).returncode == 0
    before = sql(tmp_path, "SELECT * FROM runs"), sql(tmp_path, "SELECT count(*) FROM calls")
    for args in (["--model", "default=http://127.0.0.1:9/v1#m"], ["--map", "text=no_such_column"],
                 ["--model", "default=openai:gpt-4o-mini"]):
        out = run_cli("run", "p", "-q", *args, cwd=tmp_path, env={"OPENAI_API_KEY": ""})
        assert out.returncode != 0 and out.stderr.startswith("error: "), out.stderr
        assert (sql(tmp_path, "SELECT * FROM runs"), sql(tmp_path, "SELECT count(*) FROM calls")) == before
        shown = run_cli("show", "first", cwd=tmp_path)
        assert shown.returncode == 0 and "(5 rows)" in shown.stdout


TWO = """\
name: {name}
input: {{path: data/rows.jsonl}}
models:
  default: {{backend: scripted, function: "funcs:slow"}}
stages:
  - name: teach
    template: "{name} {{{{ text }}}}"
  - name: tally
    sql: SELECT count(*) AS n FROM teach
"""


def test_two_pipelines_with_a_common_stage_name_keep_both_datasets(tmp_path: Path) -> None:
    make(tmp_path, TWO.format(name="alpha"), rows=3, name="alpha")
    (tmp_path / "pipelines" / "beta.yaml").write_text(TWO.format(name="beta"))
    for _ in range(13):  # 26 runs: more than retention's last 20
        for name in ("alpha", "beta"):
            assert run_cli("run", name, "-q", cwd=tmp_path).returncode == 0
    for name in ("alpha", "beta"):
        rows = sql(tmp_path, f"SELECT _raw FROM {name}.teach ORDER BY _id")
        assert rows == [(f"answer: {name} item {i}",) for i in range(3)]
        shown = run_cli("show", f"{name}.teach", "--columns", "_raw", cwd=tmp_path)
        assert shown.returncode == 0 and f"{name} item 2" in shown.stdout
    ambiguous = run_cli("show", "teach", cwd=tmp_path)
    assert ambiguous.returncode == 2 and "alpha.teach, beta.teach" in ambiguous.stderr
    assert sql(tmp_path, "SELECT count(*) FROM calls") == [(6,)]


def test_retention_keeps_each_pipelines_latest_and_pinned_runs(tmp_path: Path) -> None:
    make(tmp_path, TWO.format(name="alpha"), rows=2, name="alpha")
    (tmp_path / "pipelines" / "beta.yaml").write_text(TWO.format(name="beta"))
    assert run_cli("run", "beta", "-q", cwd=tmp_path).returncode == 0  # run 1
    assert run_cli("run", "alpha", "-q", cwd=tmp_path).returncode == 0  # run 2
    assert run_cli("keep", "2", cwd=tmp_path).returncode == 0
    for _ in range(22):
        assert run_cli("run", "alpha", "-q", cwd=tmp_path).returncode == 0  # runs 3..24
    schemas = {r[0] for r in sql(tmp_path, "SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'run_%'")}
    assert {"run_1", "run_2"} <= schemas and "run_3" not in schemas and "run_4" not in schemas
    assert sql(tmp_path, "SELECT count(*) FROM beta.teach") == [(2,)]
    gone = run_cli("show", "teach", "--run", "3", cwd=tmp_path)
    assert gone.returncode == 2 and "pruned" in gone.stderr
    assert "0 calls" in gone.stderr and "retort run alpha" in gone.stderr


DUPES = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "funcs:slow", max_concurrency: 8}
stages:
  - name: ask
    template: "{{ text }}"
"""


def test_one_call_per_distinct_prompt(tmp_path: Path) -> None:
    make(tmp_path, DUPES, rows=600, text="prompt {i}")
    rows = [json.dumps({"text": f"prompt {i // 2}"}) for i in range(600)]  # 300 distinct, each twice
    (tmp_path / "data" / "rows.jsonl").write_text("\n".join(rows))
    out = run_cli("run", "p", "-q", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["calls_made"] == 300 and result["cache_hits"] == 300
    assert sql(tmp_path, "SELECT count(*), count(DISTINCT key) FROM calls") == [(300, 300)]
    assert sql(tmp_path, "SELECT count(*) FROM p.ask") == [(600,)]


def test_a_run_over_max_failures_is_kept_but_not_the_latest(tmp_path: Path) -> None:
    make(tmp_path, DUPES, rows=6)
    assert run_cli("run", "p", "-q", cwd=tmp_path).returncode == 0
    picky = DUPES.replace('"funcs:slow"', '"funcs:picky"').replace('template: "{{ text }}"', 'template: "{{ text }}!"')
    (tmp_path / "pipelines" / "p.yaml").write_text(picky)
    out = run_cli("run", "p", "-q", "--retries", "0", cwd=tmp_path)
    assert out.returncode == 1 and "kept as failed" in out.stderr
    assert sql(tmp_path, "SELECT run_id, status FROM runs ORDER BY 1") == [(1, "ok"), (2, "failed")]
    assert sql(tmp_path, "SELECT (SELECT count(*) FROM run_2.ask), (SELECT count(*) FROM failures)") == [(5, 1)]
    assert sql(tmp_path, "SELECT count(*) FROM p.ask WHERE _raw LIKE 'answer: %'") == [(6,)]  # still run 1's
    ok = run_cli("run", "p", "-q", "--retries", "0", "--max-failures", "1", cwd=tmp_path)
    assert ok.returncode == 0
    assert sql(tmp_path, "SELECT count(*) FROM p.ask") == [(5,)]  # accepted, with its failure recorded


def test_a_missing_table_says_where_it_is_and_what_to_do(tmp_path: Path) -> None:
    make(tmp_path, DUPES, rows=6)
    (tmp_path / "pipelines" / "p.yaml").write_text(DUPES.replace('"funcs:slow"', '"funcs:picky"'))
    assert run_cli("run", "p", "-q", "--retries", "0", cwd=tmp_path).returncode == 1  # only a failed run
    out = run_cli("show", "ask", cwd=tmp_path)
    assert out.returncode == 2 and "run 1 (p) is failed: `--run 1` shows its rows" in out.stderr
    out = run_cli("show", "nope", cwd=tmp_path)
    assert out.returncode == 2 and "no pipeline has a table 'nope'" in out.stderr and "internal" not in out.stderr
    assert run_cli("show", "ask", "--run", "1", cwd=tmp_path).returncode == 0
