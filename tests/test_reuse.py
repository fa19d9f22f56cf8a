"""Whole stage tables reused across runs: only when nothing a stage depends on has changed."""

from __future__ import annotations

import json
from pathlib import Path

from retort.backends.scripted import ScriptedBackend
from retort.errors import BackendError
from tests.conftest import db_rows, run_cli
from tests.test_runner import CHAIN, ROWS, make, reply, run


def table(workspace: Path, name: str, run_id: int) -> list[tuple[object, ...]]:
    return sorted(db_rows(workspace, f'SELECT * FROM run_{run_id}."{name}"'), key=repr)


def test_an_unchanged_rerun_copies_every_model_stage_and_calls_nothing(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    first = run(workspace, path, ScriptedBackend(function=reply))
    backend = ScriptedBackend(function=reply)
    second = run(workspace, path, backend)

    assert [s.reused_from for s in second.stages] == [1, 1, None]  # the SQL stage simply runs again
    assert backend.calls == [] and second.totals()["calls_made"] == 0
    for name in ("ask", "judge", "right"):
        assert table(workspace, name, 2) == table(workspace, name, 1)
    for before, after in zip(first.stages, second.stages, strict=True):  # the counts a summary and compare read
        assert (after.rows_in, after.rows_out, after.calls_needed, after.prompt_tokens, after.completion_tokens) \
            == (before.rows_in, before.rows_out, before.calls_needed, before.prompt_tokens, before.completion_tokens)
    assert second.stages[0].cache_hits == 24


def test_a_changed_template_rebuilds_that_stage_and_what_follows(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    path.write_text(path.read_text().replace("Classify {{ text }}", "Classify  {{ text }}"))
    backend = ScriptedBackend(function=reply)
    second = run(workspace, path, backend)

    assert [s.reused_from for s in second.stages] == [1, None, None]
    assert second.stages[1].calls_made == 6  # the judge's prompts changed


def test_one_edited_input_row_rebuilds_the_stage_from_the_cache(workspace: Path) -> None:
    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    make(workspace, CHAIN, [*ROWS[:-1], {"text": "item 77", "label": "positive"}])
    second = run(workspace, path, ScriptedBackend(function=reply))

    assert second.stages[0].reused_from is None
    assert second.stages[0].calls_made == 4 and second.stages[0].cache_hits == 20  # only the edited row is new
    assert second.stages[1].reused_from is None  # its input changed too


def test_a_param_change_rebuilds_and_changing_it_back_reuses_the_first_run(workspace: Path) -> None:
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }} {{ params.tone }}'}\n")
    path.write_text(path.read_text() + "params: {tone: briefly}\n")
    run(workspace, path, ScriptedBackend(function=reply))
    second = run(workspace, path, ScriptedBackend(function=reply), ["params.tone=at length"])
    third = run(workspace, path, ScriptedBackend(function=reply))

    assert second.stages[0].reused_from is None and second.stages[0].calls_made == 6
    assert third.stages[0].reused_from == 1


def test_a_stage_with_a_failed_call_is_not_reused(workspace: Path) -> None:
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n")

    def flaky(request):  # type: ignore[no-untyped-def]
        if request.messages[-1]["content"].endswith("item 3"):
            raise BackendError("boom", model="scripted")
        return reply(request)

    first = run(workspace, path, ScriptedBackend(function=flaky))
    assert first.failures == 1
    second = run(workspace, path, ScriptedBackend(function=reply))

    assert second.stages[0].reused_from is None
    assert second.stages[0].calls_made == 1 and second.stages[0].rows_out == 6
    third = run(workspace, path, ScriptedBackend(function=reply))
    assert third.stages[0].reused_from == 2


def test_an_included_template_and_a_parse_function_are_part_of_the_fingerprint(workspace: Path) -> None:
    (workspace / "prompts" / "ask.j2").write_text("{% include 'header.j2' %} Tell me about {{ text }}")
    (workspace / "prompts" / "header.j2").write_text("Please:")
    (workspace / "evaluators" / "shout.py").write_text(
        "def helper(t):\n    return t.upper()\n\ndef parse(text):\n    return helper(text)\n")
    path = make(workspace, "  - {name: ask, prompt: ask.j2, parse: {function: 'shout:parse'}}\n")
    run(workspace, path, ScriptedBackend(function=reply))
    assert run(workspace, path, ScriptedBackend(function=reply)).stages[0].reused_from == 1

    (workspace / "prompts" / "header.j2").write_text("Kindly:")
    after_include = run(workspace, path, ScriptedBackend(function=reply))
    assert after_include.stages[0].reused_from is None and after_include.stages[0].calls_made == 6

    # The function itself is unchanged; the helper it calls is not.
    (workspace / "evaluators" / "shout.py").write_text(
        "def helper(t):\n    return t.lower()\n\ndef parse(text):\n    return helper(text)\n")
    after_helper = run(workspace, path, ScriptedBackend(function=reply))
    assert after_helper.stages[0].reused_from is None and after_helper.stages[0].calls_made == 0


def test_a_pruned_run_is_not_reused(workspace: Path) -> None:
    path = make(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n")
    run(workspace, path, ScriptedBackend(function=reply))
    from retort.cache import Cache
    from retort.workspace import Workspace

    cache = Cache(Workspace(workspace).db_path)
    cache.con.execute("DROP SCHEMA run_1 CASCADE")  # as KEEP_RUNS pruning does to old runs
    cache.close()
    second = run(workspace, path, ScriptedBackend(function=reply))
    assert second.stages[0].reused_from is None and second.stages[0].cache_hits == 6


def for_the_cli(workspace: Path, stages: str) -> None:
    """Pipeline `p` over ROWS, its model the spec's own scripted one (the CLI takes no backend object)."""
    path = make(workspace, stages)
    path.write_text("models: {default: {backend: scripted, replies: [fine], cycle: true}}\n" + path.read_text())


def test_the_cli_says_what_it_reused_and_no_reuse_rebuilds(workspace: Path) -> None:
    for_the_cli(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n"  # with a SQL stage, which
                "  - {name: n, sql: 'SELECT count(*) AS n FROM ask'}\n")  # always runs: a new run each time
    assert run_cli("run", "p", "-q", cwd=workspace).returncode == 0
    second = run_cli("run", "p", "-q", cwd=workspace)
    assert second.returncode == 0, second.stderr
    assert "reused unchanged: ask" in second.stdout and "reused run 1" in second.stdout
    third = run_cli("run", "p", "-q", "--no-reuse", "--json", cwd=workspace)
    assert third.returncode == 0, third.stderr
    stats = json.loads(third.stdout)["stages"][0]
    assert stats["reused_from"] is None and stats["cache_hits"] == 6 and stats["calls_made"] == 0


def test_reused_tables_are_views_and_pruning_their_origin_moves_the_rows(workspace: Path) -> None:
    from retort.cache import KEEP_RUNS, Cache
    from retort.workspace import Workspace

    path = make(workspace, CHAIN)
    run(workspace, path, ScriptedBackend(function=reply))
    run(workspace, path, ScriptedBackend(function=reply))
    third = run(workspace, path, ScriptedBackend(function=reply))
    assert [s.reused_from for s in third.stages] == [1, 1, None]  # the run that built them
    views = db_rows(workspace, "SELECT schema_name, view_name FROM duckdb_views() WHERE schema_name LIKE 'run_%'")
    assert sorted(views) == [(f"run_{r}", t) for r in (2, 3) for t in ("ask", "input", "judge")]
    before = {name: table(workspace, name, 3) for name in ("input", "ask", "judge")}

    cache = Cache(Workspace(workspace).db_path)
    cache._prune(1 + KEEP_RUNS)  # what finish_run does once run 1 is KEEP_RUNS runs old
    cache.close()

    assert db_rows(workspace, "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = 'run_1'") == [(0,)]
    assert db_rows(workspace, "SELECT stage, run_id, origin FROM memo ORDER BY stage") == [
        ("ask", 1, 3), ("input", 1, 3), ("judge", 1, 3)]  # built by run 1, rows now in run 3
    tables = db_rows(workspace, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'run_3'")
    assert sorted(t for (t,) in tables) == ["ask", "input", "judge", "right"]  # the newest user holds the rows
    for name, rows in before.items():
        assert table(workspace, name, 3) == rows and table(workspace, name, 2) == rows  # run 2 reads run 3's
    fourth = run(workspace, path, ScriptedBackend(function=reply))
    assert [s.reused_from for s in fourth.stages] == [1, 1, None]  # built by run 1, its rows now in run 3
    assert table(workspace, "judge", 4) == before["judge"]


def test_the_input_table_is_reused_only_while_the_file_is_unchanged(workspace: Path) -> None:
    stages = "  - {name: ask, template: 'Tell me about {{ text }}'}\n  - {name: n, sql: 'SELECT count(*) FROM ask'}\n"
    path = make(workspace, stages)  # the SQL stage makes every rerun a new run
    run(workspace, path, ScriptedBackend(function=reply))
    run(workspace, path, ScriptedBackend(function=reply))
    is_view = "SELECT count(*) FROM duckdb_views() WHERE schema_name = 'run_{}' AND view_name = 'input'"
    assert db_rows(workspace, is_view.format(2)) == [(1,)]
    make(workspace, stages, ROWS[:5])
    third = run(workspace, path, ScriptedBackend(function=reply))
    assert db_rows(workspace, is_view.format(3)) == [(0,)]
    assert third.stages[0].rows_out == 5 and third.stages[0].reused_from is None


def test_reruns_past_the_kept_runs_keep_their_rows(workspace: Path) -> None:
    from retort.cache import KEEP_RUNS

    path = make(workspace, CHAIN)
    first = run(workspace, path, ScriptedBackend(function=reply))
    expected = {name: table(workspace, name, 1) for name in ("input", "ask", "judge", "right")}
    for _ in range(KEEP_RUNS + 2):  # runs 1 and 2 are pruned along the way; every later run reused run 1
        last = run(workspace, path, ScriptedBackend(function=reply))
        assert [s.reused_from for s in last.stages] == [1, 1, None]
    assert last.run_id == KEEP_RUNS + 3
    kept = db_rows(workspace, "SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'run_%'")
    assert len(kept) == KEEP_RUNS
    origins = {o for (o,) in db_rows(workspace, "SELECT origin FROM memo")}
    assert origins and all(o > 2 for o in origins)  # no memo row points into a pruned run
    for run_id in range(4, KEEP_RUNS + 4):  # every kept run still reads the rows run 1 built
        for name, rows in expected.items():
            assert table(workspace, name, run_id) == rows
    assert first.stages[1].rows_out == len(expected["judge"])


# --- up to date: a rerun with nothing to do makes no run --------------------------------------------

TWO_PROMPTS = ("  - {name: ask, template: 'Tell me about {{ text }}'}\n"
               "  - {name: judge, from: ask, template: 'Classify {{ text }}', parse: {choice: [positive, negative]}}\n")


def database(workspace: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """Runs, schemas and memo rows: what a rerun that is up to date must leave as it was."""
    return (db_rows(workspace, "SELECT run_id, status, stats FROM runs ORDER BY run_id"),
            db_rows(workspace, "SELECT schema_name FROM duckdb_schemas() ORDER BY 1"),
            db_rows(workspace, "SELECT count(*) FROM memo")[0][0])


def test_an_unchanged_pipeline_of_model_stages_is_up_to_date_and_writes_nothing(workspace: Path) -> None:
    path = make(workspace, TWO_PROMPTS)
    first = run(workspace, path, ScriptedBackend(function=reply))
    before = database(workspace)
    backend = ScriptedBackend(function=reply)
    again = run(workspace, path, backend)

    assert again.up_to_date and again.run_id == first.run_id == 1
    assert backend.calls == [] and database(workspace) == before
    assert [s.reused_from for s in again.stages] == [1, 1]
    for built, found in zip(first.stages, again.stages, strict=True):
        assert (found.rows_out, found.calls_needed, found.cache_hits, found.calls_made, found.prompt_tokens) == \
            (built.rows_out, built.calls_needed, built.calls_needed, 0, built.prompt_tokens)
    assert set(again.fingerprints) == {"input", "ask", "judge"} and again.fingerprints == first.fingerprints


def test_up_to_date_against_the_latest_run_of_the_same_pipeline(workspace: Path) -> None:
    path = make(workspace, TWO_PROMPTS)
    other = workspace / "pipelines" / "other.yaml"
    other.write_text(path.read_text())  # the same stages, another pipeline (named after its file)
    run(workspace, path, ScriptedBackend(function=reply))
    assert run(workspace, other, ScriptedBackend(function=reply)).run_id == 2  # not p's run: a new one
    third = run(workspace, path, ScriptedBackend(function=reply))
    assert third.up_to_date and third.run_id == 1  # another pipeline's run in between changes none of p's tables
    assert db_rows(workspace, "SELECT count(*) FROM p.judge")[0][0] == 6
    assert db_rows(workspace, "SELECT count(*) FROM other.judge")[0][0] == 6
    assert db_rows(workspace, "SELECT max(run_id) FROM runs") == [(2,)]


def test_a_change_anywhere_makes_a_new_run(workspace: Path) -> None:
    path = make(workspace, TWO_PROMPTS)
    run(workspace, path, ScriptedBackend(function=reply))
    path.write_text(path.read_text().replace("Classify {{ text }}", "Classify: {{ text }}"))
    changed = run(workspace, path, ScriptedBackend(function=reply))
    assert not changed.up_to_date and changed.run_id == 2 and [s.reused_from for s in changed.stages] == [1, None]
    assert run(workspace, path, ScriptedBackend(function=reply)).up_to_date  # and then that run is the latest

    make(workspace, TWO_PROMPTS, ROWS[:4])  # the input file
    assert run(workspace, path, ScriptedBackend(function=reply)).run_id == 3
    assert run(workspace, path, ScriptedBackend(function=reply), ["params.x=1"]).run_id == 4  # the params


def test_a_run_with_a_failed_call_is_never_up_to_date(workspace: Path) -> None:
    path = make(workspace, TWO_PROMPTS)

    def flaky(request):  # type: ignore[no-untyped-def]
        if request.messages[-1]["content"].endswith("item 3"):
            raise BackendError("boom", model="scripted")
        return reply(request)

    assert run(workspace, path, ScriptedBackend(function=flaky)).failures == 1
    backend = ScriptedBackend(function=reply)
    second = run(workspace, path, backend)
    assert not second.up_to_date and len(backend.calls) == 2  # the failed row, in both stages
    assert run(workspace, path, ScriptedBackend(function=reply)).up_to_date


def test_the_cli_says_up_to_date_and_no_reuse_still_runs(workspace: Path) -> None:
    for_the_cli(workspace, "  - {name: ask, template: 'Tell me about {{ text }}'}\n")
    assert run_cli("run", "p", "-q", cwd=workspace).returncode == 0
    second = run_cli("run", "p", "-q", cwd=workspace)
    assert second.returncode == 0, second.stderr
    assert "run 1 of p: up to date" in second.stdout and "no new run was made" in second.stdout
    third = json.loads(run_cli("run", "p", "-q", "--no-reuse", "--json", cwd=workspace).stdout)
    assert (third["run_id"], third["up_to_date"], third["calls_made"], third["cache_hits"]) == (2, False, 0, 6)
    assert db_rows(workspace, "SELECT run_id FROM runs ORDER BY 1") == [(1,), (2,)]
