"""The first hour's dead ends, as a new user meets them: each bad input is one located line (never
"internal error"), and the small conveniences work through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ROOT, run_cli

PIPELINE = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "retort.backends.scripted:echo"}
stages:
  - name: ask
    template: "Say: {{ text }}"
"""


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(20)))
    (workspace / "pipelines" / "p.yaml").write_text(PIPELINE)
    return workspace


def error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
    return lines[0]


def rows(ws: Path, query: str) -> list[tuple[object, ...]]:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_limit_and_sample_take_positive_counts(ws: Path, value: str) -> None:
    for flag in ("--limit", "--sample"):
        out = run_cli("run", "p", flag, value, cwd=ws)
        assert out.returncode == 2 and f"argument {flag}" in out.stderr
    assert not (ws / ".retort" / "retort.duckdb").exists()  # nothing ran


def test_sample_is_a_seeded_random_subset(ws: Path) -> None:
    assert run_cli("run", "p", "-q", "--sample", "5", "--seed", "7", cwd=ws).returncode == 0
    first = rows(ws, "SELECT _id, text FROM run_1.input ORDER BY CAST(_id AS INT)")
    assert len(first) == 5 and [r[0] for r in first] != ["0", "1", "2", "3", "4"]
    assert all(text == f"row {i}" for i, text in first)  # ids are the rows' places in the file
    assert run_cli("run", "p", "-q", "--sample", "5", "--seed", "7", "--json", cwd=ws).returncode == 0
    assert rows(ws, "SELECT max(run_id) FROM runs") == [(1,)]  # the same subset: up to date
    assert run_cli("run", "p", "-q", "--sample", "5", "--seed", "8", cwd=ws).returncode == 0
    assert rows(ws, "SELECT _id FROM run_2.input ORDER BY 1") != [(r[0],) for r in sorted(first)]


@pytest.mark.parametrize(("template", "expect"), [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% for i in range(10000000) %}x{% endfor %}", "range too big"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursion"),
])
def test_template_failures_name_the_template(ws: Path, template: str, expect: str) -> None:
    (ws / "prompts" / "bad.j2").write_text(f"Say:\n{template}\n")
    (ws / "pipelines" / "p.yaml").write_text(PIPELINE.replace('template: "Say: {{ text }}"', "prompt: bad"))
    line = error_line(run_cli("run", "p", "-q", cwd=ws))
    assert "prompts/bad" in line and expect.lower() in line.lower()


def test_bad_inputs_are_located(ws: Path) -> None:
    (ws / "data" / "broken.json").write_text('[{"text": "a"},')
    assert "broken.json: invalid JSON" in error_line(run_cli("run", "p", "--input", "data/broken.json", cwd=ws))
    line = error_line(run_cli("run", "p", "--set", "params.labels=[a,", cwd=ws))
    assert "--set 'params.labels=[a,'" in line and "not valid YAML" in line
    (ws / "pipelines" / "p.yaml").write_text(PIPELINE + "    samples: 2\n    samples: 3\n")
    line = error_line(run_cli("run", "p", cwd=ws))
    assert "p.yaml:8" in line and "duplicate key 'samples' (first at line 7)" in line


def test_a_latin1_csv_reaches_the_model_as_text(ws: Path) -> None:
    (ws / "data" / "rows.csv").write_bytes("text\ncaf\xe9 cr\xe8me\n".encode("latin-1"))
    assert run_cli("run", "p", "-q", "--input", "data/rows.csv", cwd=ws).returncode == 0
    assert rows(ws, "SELECT _raw FROM p.ask") == [("Say: café crème",)]


def test_schema_into_a_closed_pipe_and_init_and_db_after_the_command(ws: Path, tmp_path: Path) -> None:
    piped = subprocess.run(f"{sys.executable} {ROOT / 'cli.py'} schema | head -c 10", shell=True,
                           capture_output=True, text=True, timeout=60)
    assert piped.stdout == '{\n  "$defs"'[:10] and "Error" not in piped.stderr, piped.stderr
    made = tmp_path / "fresh"
    assert run_cli("init", str(made), cwd=tmp_path).returncode == 0
    assert ".retort/" in (made / ".gitignore").read_text().splitlines()
    other = tmp_path / "elsewhere.duckdb"
    assert run_cli("run", "p", "-q", "--db", str(other), cwd=ws).returncode == 0  # --db after the command
    shown = run_cli("show", "ask", "--db", str(other), cwd=ws)
    assert shown.returncode == 0 and "(20 rows)" in shown.stdout
    assert not (ws / ".retort" / "retort.duckdb").exists()


def test_cache_vacuum_keeps_every_call(ws: Path) -> None:
    assert run_cli("run", "p", "-q", cwd=ws).returncode == 0
    out = run_cli("cache", "vacuum", cwd=ws)
    assert out.returncode == 0 and "(20 calls kept)" in out.stdout, out.stderr
    assert rows(ws, "SELECT count(*) FROM calls") == [(20,)] and rows(ws, "SELECT count(*) FROM p.ask") == [(20,)]
    stats = run_cli("cache", "stats", cwd=ws)
    assert stats.returncode == 0 and "20" in stats.stdout


def test_a_typo_in_a_model_target_is_a_usage_error(ws: Path) -> None:
    line = error_line(run_cli("run", "p", "--model", "default=opneai:gpt-4o-mini", cwd=ws))
    assert "--model target 'opneai:gpt-4o-mini'" in line and "openai:MODEL" in line


def test_a_prompt_stage_without_a_template_is_a_spec_error(ws: Path) -> None:
    (ws / "pipelines" / "p.yaml").write_text(PIPELINE.replace('    template: "Say: {{ text }}"\n', "    samples: 2\n"))
    line = error_line(run_cli("run", "p", cwd=ws))
    assert "p.yaml:5 stages[0] (ask): a prompt stage needs `prompt`" in line
    assert rows(ws, "SELECT count(*) FROM runs") == [(0,)]  # nothing ran


def test_a_pipeline_named_two_ways_is_the_same_pipeline(ws: Path) -> None:
    assert run_cli("run", "p", "-q", cwd=ws).returncode == 0
    again = run_cli("run", "pipelines/p.yaml", "--json", "-q", cwd=ws)
    assert json.loads(again.stdout)["up_to_date"] is True
    assert run_cli("run", str(ws / "pipelines" / "p.yaml"), "-q", cwd=ws).returncode == 0
    assert rows(ws, "SELECT count(*) FROM runs") == [(1,)]  # one run, however the pipeline was named
