"""The runner on the scripted backend: cache keys, resumption semantics, lineage, failures."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from retort.backends.base import Request
from retort.backends.scripted import ScriptedBackend
from retort.cache import Cache
from retort.errors import BackendError
from retort.runner import Runner, RunResult
from retort.spec import load_pipeline
from retort.workspace import Workspace
from tests.conftest import db_rows as query

ROWS = [{"text": f"item {i}", "label": "positive" if i % 2 else "negative"} for i in range(6)]


def reply(request: Request) -> list[str]:
    last = request.messages[-1]["content"]
    if last.startswith("Classify"):
        return ["positive" if int(last.split()[-1]) % 2 else "negative"] * request.n
    return [f"about {last}"] * request.n


def make(workspace: Path, stages: str, rows: list[dict[str, Any]] = ROWS) -> Path:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = workspace / "pipelines" / "p.yaml"
    path.write_text(f"input: {{path: data/rows.jsonl}}\nstages:\n{stages}")
    return path


def run(workspace: Path, path: Path, backend: ScriptedBackend | None = None,
        overrides: list[str] = ()) -> RunResult:  # type: ignore[assignment]
    """Run the pipeline at `path`: every model is `backend`, or the spec's own models when None."""
    return asyncio.run(_run_async(workspace, path, backend, overrides))


async def _run_async(workspace: Path, path: Path, backend: ScriptedBackend | None = None,
                     overrides: list[str] = ()) -> RunResult:  # type: ignore[assignment]
    ws = Workspace(workspace)
    spec, source = load_pipeline(path, list(overrides))
    cache = Cache(ws.db_path)
    factory = (lambda name, cfg: backend) if backend is not None else None
    try:
        return await Runner(ws, spec, source, cache, backend_factory=factory).execute()
    finally:
        cache.close()


CHAIN = """\
  - {name: ask, template: "Tell me about {{ text }}", samples: 4}
  - {name: judge, from: ask, template: "Classify {{ text }}", parse: {choice: [positive, negative]}, output: pred}
  - {name: right, sql: "SELECT * FROM judge WHERE pred = label"}
"""


def test_samples_4_to_8_makes_exactly_4_new_calls_per_row(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    backend = ScriptedBackend(function=reply)
    first = run(workspace, path, backend)
    assert first.stages[0].calls_made == 24 and first.stages[0].rows_out == 24
    second = run(workspace, path, ScriptedBackend(function=reply), ["stages.ask.samples=8"])
    assert second.stages[0].cache_hits == 24
    assert second.stages[0].calls_made == 24  # 4 new samples x 6 rows
    assert second.stages[0].rows_out == 48
    # every judge prompt is identical per row, so the judge stage finds them all cached
    assert second.stages[1].calls_made == 0
    assert query(workspace, "SELECT count(*) FROM main.right")[0][0] == 48


def test_one_request_carries_n_for_missing_samples(workspace: Path) -> None:
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}', samples: 3}\n")
    backend = ScriptedBackend(function=reply)
    run(workspace, path, backend)
    assert sorted(r.n for r in backend.calls) == [3] * 6


def test_editing_a_template_recalls_only_changed_rows(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    edited = CHAIN.replace('"Tell me about {{ text }}"',
                           "\"Tell me about {{ text }}{% if text == 'item 3' %} please{% endif %}\"")
    path.write_text(path.read_text().split("stages:\n")[0] + "stages:\n" + edited)
    backend = ScriptedBackend(function=reply)
    result = run(workspace, path, backend)
    assert result.stages[0].calls_made == 4  # one row x 4 samples
    assert [r.messages[-1]["content"] for r in backend.calls] == ["Tell me about item 3 please"]


def test_editing_parser_sql_or_evaluator_makes_no_call(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    edited = CHAIN.replace("parse: {choice: [positive, negative]}", "parse: {regex: '(?P<pred>\\w+)'}")
    edited = edited.replace("WHERE pred = label", "WHERE pred <> label")
    path.write_text(path.read_text().split("stages:\n")[0] + "stages:\n" + edited
                    + "  - {name: score, python: accuracy, from: judge, with: {prediction: pred}}\n")
    backend = ScriptedBackend(function=reply)
    result = run(workspace, path, backend)
    assert backend.calls == []
    assert result.totals()["calls_made"] == 0
    assert query(workspace, "SELECT count(*) FROM main.right")[0][0] == 0
    assert query(workspace, "SELECT accuracy FROM main.score")[0][0] == 1.0
    assert query(workspace, "SELECT value FROM metrics WHERE name = 'accuracy'")[0][0] == 1.0


def test_lineage_links_rows_to_parents_and_calls(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    rows = query(workspace, "SELECT j._id, j._parent, a._parent, c.text, j._raw FROM main.judge j "
                            "JOIN main.ask a ON j._parent = a._id JOIN calls c ON c.key = j._call ORDER BY j._id")
    assert len(rows) == 24
    for jid, jparent, aparent, call_text, raw in rows:
        assert jid.startswith(jparent + ".") and jparent.startswith(aparent + ".")
        assert call_text == raw


def test_parse_failure_keeps_raw_and_reask_is_a_new_call(workspace: Path) -> None:
    answers = iter(["no idea", "still no", "negative"] + ["positive"] * 10)
    backend = ScriptedBackend(function=lambda r: next(answers))
    path = make(workspace, "  - {name: judge, template: 'Classify {{ text }}', parse: {choice: [positive, negative]}, "
                           "reask: 2}\n", ROWS[:1])
    result = run(workspace, path, backend)
    assert len(backend.calls) == 3 and result.stages[0].parse_errors == 0
    assert query(workspace, "SELECT judge, _raw, _error FROM main.judge") == [("negative", "negative", None)]
    # without re-asks the unparseable raw output stays on the row with its error
    path.write_text(path.read_text().replace("reask: 2", "reask: 0"))
    result = run(workspace, path, ScriptedBackend(function=lambda r: "unused"))
    assert result.totals()["calls_made"] == 0
    row = query(workspace, "SELECT judge, _raw, _error FROM main.judge")[0]
    assert row[0] is None and row[1] == "no idea" and "positive" in row[2]


def test_failed_call_is_recorded_and_the_run_goes_on(workspace: Path) -> None:
    def flaky(request: Request) -> str:
        if "item 2" in request.messages[-1]["content"]:
            raise BackendError("context length exceeded", status=400, retryable=False)
        return "fine"

    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n")
    result = run(workspace, path, ScriptedBackend(function=flaky))
    assert result.failures == 1 and result.stages[0].rows_out == 5
    failures = query(workspace, "SELECT stage, row_id, status, error FROM failures")
    assert failures == [("ask", "2", 400, "HTTP 400: context length exceeded")]
    # the rerun calls only what had failed
    backend = ScriptedBackend(function=lambda r: "fine now")
    result = run(workspace, path, backend)
    assert len(backend.calls) == 1 and result.stages[0].rows_out == 6


def test_retryable_errors_are_retried_with_backoff(workspace: Path) -> None:
    attempts = {"n": 0}

    def overloaded(request: Request) -> str:
        attempts["n"] += 1
        if attempts["n"] <= 2:
            raise BackendError("slow down", status=429, retryable=True, retry_after=0.3)
        return "ok"

    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n", ROWS[:1])
    begun = time.monotonic()
    result = run(workspace, path, ScriptedBackend(function=overloaded))
    assert time.monotonic() - begun >= 0.6  # each of the two retries waited out Retry-After
    assert attempts["n"] == 3 and result.failures == 0
    assert query(workspace, "SELECT ask FROM main.ask") == [("ok",)]


def test_model_column_routes_rows_to_models(workspace: Path) -> None:
    rows = [{"text": "a", "student": "small"}, {"text": "b", "student": "big"}]
    path = make(workspace, "  - {name: ask, template: 'Q {{ text }}', model: {column: student}}\n", rows)
    path.write_text(path.read_text().replace(
        "stages:", "models:\n  small: {backend: scripted, replies: [s1]}\n"
                   "  big: {backend: scripted, replies: [b1]}\nstages:"))
    run(workspace, path)
    assert sorted(query(workspace, "SELECT text, ask FROM main.ask")) == [("a", "s1"), ("b", "b1")]
    assert sorted(query(workspace, "SELECT model FROM calls")) == [("scripted:big",), ("scripted:small",)]


def test_plan_counts_cached_and_missing_without_calling(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply), ["input.limit=2"])
    ws = Workspace(workspace)
    spec, source = load_pipeline(path)
    cache = Cache(ws.db_path)
    backend = ScriptedBackend(function=reply)
    try:
        plan = asyncio.run(Runner(ws, spec, source, cache, mode="plan",
                                  backend_factory=lambda n, c: backend).execute())
    finally:
        cache.close()
    assert backend.calls == []
    ask, judge = plan.stages[0], plan.stages[1]
    assert (ask.calls_needed, ask.cache_hits) == (24, 8)
    assert (judge.rows_in, judge.calls_needed) == (24, 24)
    assert query(workspace, "SELECT count(*) FROM runs")[0][0] == 1  # a plan is not a run


@pytest.mark.parametrize("secret", ["sk-test-SECRET-123456"])
def test_api_key_never_lands_in_the_database(workspace: Path, monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("MY_KEY", secret)
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n")
    path.write_text(path.read_text().replace(
        "stages:", "models:\n  default: {backend: openai, model: stub, api_key_env: MY_KEY}\nstages:"))
    run(workspace, path, ScriptedBackend(replies=["x"] * 6))  # the spec names the key; a stand-in answers
    assert secret.encode() not in (workspace / ".retort" / "retort.duckdb").read_bytes()
    assert secret not in json.dumps(query(workspace, "SELECT * FROM runs"), default=str)


def test_a_model_pointed_at_another_backend_keeps_only_its_served_name(workspace: Path) -> None:
    path = make(workspace, "  - {name: ask, template: 'Q {{ text }}', model: teacher}\n")
    path.write_text(path.read_text().replace(
        "stages:", "models:\n  teacher: {backend: openai, model: gpt-4o-mini, max_concurrency: 64, "
                   "api_key_env: NOT_SET_ANYWHERE}\nstages:"))
    spec, source = load_pipeline(path)
    ws = Workspace(workspace)
    cache = Cache(":memory:")
    try:
        to_local = Runner(ws, spec, source, cache, model_targets={"teacher": {"backend": "local"}})
        assert to_local.model_config("teacher") == {"backend": "local", "name": "teacher"}
        to_server = Runner(ws, spec, source, cache,
                           model_targets={"*": {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}})
        assert to_server.model_config("teacher") == {
            "backend": "openai", "model": "gpt-4o-mini", "max_concurrency": 64,  # no key sent to another endpoint
            "base_url": "http://127.0.0.1:8000/v1", "name": "teacher"}
    finally:
        cache.close()


def test_an_unexpected_backend_exception_is_a_recorded_failure_not_a_lost_row(workspace: Path) -> None:
    def buggy(request: Request) -> str:
        if request.messages[-1]["content"].endswith(("1", "4")):
            raise ValueError("a bug in someone's backend")
        return "fine"

    rows = [{"text": f"item {i}"} for i in range(6)]
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n", rows)
    result = asyncio.run(asyncio.wait_for(_run_async(workspace, path, ScriptedBackend(function=buggy,
                                                                                      max_concurrency=1)), 60))
    assert result.failures == 2 and result.stages[0].rows_out == 4
    assert sorted(query(workspace, "SELECT row_id, error FROM failures")) == [
        ("1", "model 'scripted:scripted': ValueError: a bug in someone's backend"),
        ("4", "model 'scripted:scripted': ValueError: a bug in someone's backend")]



def test_a_python_stage_keeps_every_key_its_rows_have(workspace: Path) -> None:
    # Arrow's from_pylist would keep only the first row's keys: `note` (rows 2+) would vanish.
    (workspace / "evaluators" / "ragged.py").write_text(
        "def ragged(rows):\n"
        "    return [{'text': r['text'], **({'note': 'later'} if i else {})} for i, r in enumerate(rows)]\n")
    path = make(workspace, "  - {name: out, python: ragged}\n")
    result = run(workspace, path)
    assert result.stages[0].rows_out == 6
    rows = query(workspace, "SELECT text, note FROM main.out ORDER BY text")
    assert rows == [(f"item {i}", None if i == 0 else "later") for i in range(6)]


def test_a_target_for_a_model_the_pipeline_does_not_name_is_refused(tmp_path: Path) -> None:
    """`--model techer=...` (a typo) must not run the spec's own model with nobody told."""
    from tests.conftest import run_cli

    proc = run_cli("run", "sse_cot", "--model", "default=scripted:retort.backends.scripted:echo",
                   "--model", "techer=scripted:retort.backends.scripted:echo", "--limit", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no model named 'techer' to target" in proc.stderr and "Traceback" not in proc.stderr
    ok = run_cli("run", "sse_cot", "--model", "*=scripted:retort.backends.scripted:echo", "--limit", "2",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    cache = Cache(tmp_path / ".retort" / "retort.duckdb", read_only=True)
    try:  # the refused run left no record: the first run is the one that ran
        assert [r.run_id for r in cache.runs(10)] == [1]
    finally:
        cache.close()
