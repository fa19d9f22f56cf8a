"""Every reply shape a misbehaving OpenAI-compatible server can send, through the real CLI.

For each mode of tests/hostile_server.py: every input row ends in the stage table or in
`failures` (rows + failures = rows in), the exit code and the summary say the same, and a
rerun against a server that now answers well calls exactly the rows that are missing.
Shapes that only the decoding sees run on one transport; what each HTTP client sees
differently (status pages, big and cut-off bodies, headers, a mix) runs on all three.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from retort import retries
from retort.backends.base import Request
from retort.backends.langchain import _finish_reason as lc_reason
from retort.backends.langchain import _text as lc_text
from retort.backends.langchain import _usage as lc_usage
from retort.backends.scripted import ScriptedBackend
from retort.cache import Cache
from retort.errors import BackendError
from retort.progress import RichProgress
from retort.runner import Progress, Runner, RunResult, StageStats
from retort.spec import load_pipeline
from retort.workspace import Workspace
from tests.conftest import db_rows, run_cli
from tests.hostile_server import Hostile, reply_text

pytestmark = pytest.mark.http

ROWS = 200
EVERY = {"body_10mb": 40, "mixed": 7}  # these modes send their bad reply on every Nth request only
FAILS_ALL = ("not_chat", "choices", "truncated", "html_502", "retry_day")
KEEPS_ALL = ("parts", "number", "null", "finish", "huge_tokens")
WORDS = {  # the server's words that a failure must carry
    "not_chat": "The model is overloaded, try again later",
    "choices": "2 choices for a request of n=1",
    "truncated": "not JSON (unexpected end of data",
    "html_502": "HTTP 502: 502 Bad Gateway 502 Bad Gateway nginx/1.24.0",
    "retry_day": "HTTP 429: Rate limit reached for requests per day (RPD): Limit 10000 (Retry-After 86,400s is above "
                 "max_retry_after 120s: not retried)",
    "body_10mb": "Proxy response buffer overflow upstream buffer",
}
CASES = [pytest.param(mode, "fast") for mode in (*KEEPS_ALL, "not_chat", "choices")]
CASES += [(mode, transport) for mode in ("truncated", "html_502", "retry_day", "body_10mb", "mixed")
          for transport in ("fast", "aiohttp", "sdk")]


@pytest.fixture(scope="module")
def server() -> Iterator[Hostile]:
    with Hostile(lifetime=900) as hostile:
        yield hostile


def prompt(i: int) -> str:
    return f"Q: question {i}"


def run(workspace: Path) -> tuple[int, dict[str, Any], str]:
    """`retort run p` (one retry, so a 502 is tried twice): exit code, the JSON summary, stderr."""
    proc = run_cli("run", "p", "--retries", "1", "--quiet", "--json", cwd=workspace, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def outcome(workspace: Path, run_id: int) -> tuple[int, list[tuple[Any, ...]]]:
    """Rows in this run's `ask` table (a run with failures is kept by number, not made the latest),
    and this run's failures (status, error)."""
    rows = db_rows(workspace, f"SELECT count(*) FROM run_{run_id}.ask")[0][0]
    return rows, db_rows(workspace, f"SELECT status, error FROM failures WHERE run_id = {run_id}")


@pytest.mark.parametrize(("mode", "transport"), CASES)
def test_every_row_ends_in_the_table_or_in_failures(workspace: Path, server: Hostile, mode: str,
                                                    transport: str) -> None:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"question {i}"})
                                                             for i in range(ROWS)))
    (workspace / "pipelines" / "p.yaml").write_text(
        "input: {path: data/rows.jsonl}\n"
        f"models:\n  default: {{backend: openai, model: hostile, base_url: '{server.url}', transport: {transport},"
        " max_concurrency: 32, timeout: 20}\n"
        "stages:\n  - {name: ask, template: 'Q: {{ text }}'}\n")
    server.reset(mode, EVERY.get(mode, 1))

    code, summary, stderr = run(workspace)
    rows, failures = outcome(workspace, summary["run_id"])
    assert rows + len(failures) == ROWS, stderr
    assert (summary["stages"][0]["rows_out"], summary["failures"]) == (rows, len(failures))
    assert code == (0 if not failures else 1), stderr
    if mode in KEEPS_ALL:
        assert (rows, server.requests) == (ROWS, ROWS)
    elif mode in FAILS_ALL:  # a 502 is retried once; a day's Retry-After is not waited for, nor retried
        assert (rows, server.requests) == (0, 2 * ROWS if mode == "html_502" else ROWS)
    elif mode == "body_10mb":
        assert (len(failures), server.requests) == (ROWS // EVERY[mode], ROWS)
    else:  # mixed: one request in 7 is bad, of every kind in turn; the parts, numbers and nulls are kept
        assert 0 < len(failures) < ROWS // EVERY[mode]
    if mode in WORDS:
        assert all(WORDS[mode] in error for _, error in failures), failures[:1]
    assert all(len(error) < 600 for _, error in failures)  # the server's words, cut to a line (10 MB bodies too)
    assert {status for status, _ in failures} <= {None, 502, 429}
    check_values(workspace, mode, summary["run_id"])

    server.reset("good")
    code, summary, stderr = run(workspace)
    assert server.requests == len(failures)  # only what was missing is called again
    assert (code, summary["failures"]) == (0, 0), stderr
    assert outcome(workspace, summary["run_id"]) == (ROWS, [])


def check_values(workspace: Path, mode: str, run_id: int) -> None:
    """What the stage table and the `calls` ledger hold for the shapes that are kept."""
    texts = dict(db_rows(workspace, f"SELECT text, ask FROM run_{run_id}.ask"))
    reasons = {r for (r,) in db_rows(workspace, "SELECT DISTINCT finish_reason FROM calls")}
    if mode == "parts":
        assert texts == {f"question {i}": reply_text(prompt(i)) for i in range(ROWS)}
    elif mode == "number":
        assert texts == {f"question {i}": f"{len(prompt(i)) + 0.5}" for i in range(ROWS)}
    elif mode == "null":
        assert set(texts.values()) == {""} and reasons == {"content_filter"}
    elif mode == "finish":
        assert reasons == {'{"type":"stop","stop":null}'}
    elif mode == "huge_tokens":
        assert db_rows(workspace, "SELECT DISTINCT prompt_tokens, completion_tokens FROM calls") == [
            (2 ** 33, 2 ** 40 + 1)]
    elif mode == "mixed":
        assert all(v in ("", reply_text(prompt(int(k.split()[1]))), f"{len(prompt(int(k.split()[1]))) + 0.5}")
                   for k, v in texts.items())


# --- bounded waits: a Retry-After above the model's cap is a failure, a long wait shows ----------------------


class Waits(Progress):
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, str]] = []

    def waiting(self, stats: StageStats, seconds: float, reason: str) -> None:
        self.seen.append((stats.name, seconds, reason))


def run_scripted(workspace: Path, function: Callable[[Request], str], model: str = "{backend: scripted, "
                 "replies: [unused]}") -> tuple[RunResult, Waits]:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(6)))
    path = workspace / "pipelines" / "p.yaml"
    path.write_text(f"input: {{path: data/rows.jsonl}}\nmodels:\n  default: {model}\n"
                    "stages:\n  - {name: ask, template: '{{ text }}'}\n")
    ws, waits = Workspace(workspace), Waits()
    spec, source = load_pipeline(path)
    cache = Cache(ws.db_path)
    backend = ScriptedBackend(function=function)
    try:
        result = asyncio.run(Runner(ws, spec, source, cache, progress=waits, max_retries=3,
                                    backend_factory=lambda name, config: backend).execute())
    finally:
        cache.close()
    return result, waits


def test_a_retry_after_of_a_day_fails_the_row_at_once_with_the_servers_words(workspace: Path) -> None:
    asked: list[str] = []

    def daily_limit(request: Request) -> str:
        asked.append(request.messages[-1]["content"])
        if asked[-1] == "row 2":
            raise BackendError("Rate limit reached for requests per day", status=429, retryable=True,
                               retry_after=86400)
        return "ok"

    result, waits = run_scripted(workspace, daily_limit)
    assert asked.count("row 2") == 1 and len(asked) == 6  # not retried (3 retries were allowed), not slept
    assert (result.failures, result.stages[0].rows_out) == (1, 5)
    assert db_rows(workspace, "SELECT status, error FROM failures") == [
        (429, "HTTP 429: Rate limit reached for requests per day (Retry-After 86,400s is "
       "above max_retry_after 120s: not retried)")]
    assert waits.seen == []


def test_the_cap_is_a_model_setting_and_a_long_wait_is_told_to_the_progress(workspace: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retries, "LONG_WAIT", 0.2)  # "a few seconds", scaled down so the test waits little
    tries: dict[str, int] = {}

    def pacing(request: Request) -> str:
        row = request.messages[-1]["content"]
        tries[row] = tries.get(row, 0) + 1
        if row == "row 1" and tries[row] <= 2:  # waited out twice: before the first retry, and in tenacity's loop
            raise BackendError("slow down", status=429, retryable=True, retry_after=0.3)
        if row == "row 4":
            raise BackendError("come back later", status=503, retryable=True, retry_after=0.9)
        return "ok"

    result, waits = run_scripted(workspace, pacing, "{backend: scripted, replies: [unused], max_retry_after: 0.5}")
    assert (tries["row 1"], tries["row 4"], result.failures) == (3, 1, 1)
    assert [(stage, reason) for stage, _, reason in waits.seen] == [("ask", "HTTP 429: slow down")] * 2
    assert 0.3 <= waits.seen[0][1] <= 0.5 and 0.3 <= waits.seen[1][1] <= 1.0
    assert db_rows(workspace, "SELECT error FROM failures")[0][0].endswith(
        "HTTP 503: come back later (Retry-After 1s is above max_retry_after 0.5s: not retried)")


def test_the_progress_line_says_how_long_a_call_waits_and_until_when() -> None:
    progress, stats = RichProgress(enabled=False), StageStats("ask", "prompt")
    progress.stage_started(stats, 10)
    progress.waiting(stats, 90, "model 'm': HTTP 429: slow down")
    progress.waiting(stats, 5, "model 'm': HTTP 503: busy")  # ends sooner: the longer wait stays shown
    shown = progress.bar.tasks[progress.tasks["ask"]].fields["wait"]
    assert re.fullmatch(r"waiting 90s \(until \d\d:\d\d:\d\d\): model 'm': HTTP 429: slow down", shown), shown


def test_langchain_messages_decode_like_server_replies() -> None:
    message = AIMessage(content=[{"type": "text", "text": "a"}, "b", {"type": "reasoning", "reasoning": "x"}],
                        response_metadata={"finish_reason": {"type": "end_turn"}},
                        usage_metadata={"input_tokens": 2 ** 33, "output_tokens": 3, "total_tokens": 2 ** 33 + 3})
    assert (lc_text(message), lc_reason(message), lc_usage(message)) == ("ab", '{"type":"end_turn"}', (2 ** 33, 3))
    assert lc_reason(AIMessage(content="x")) is None and lc_text(AIMessage(content=[])) == ""
