"""An honest plan: fan-out through SQL stages is counted, completion tokens and cost are estimated
before anything is spent, and the run's summary shows what was spent the same way."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from retort import costs
from tests.conftest import run_cli

PARSABLE = "*=scripted:retort.backends.scripted:parsable"


def plan(ws: Path, *args: str) -> dict[str, object]:
    out = run_cli("plan", *args, "--json", cwd=ws)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_plan_counts_calls_after_a_sql_fan_out(tmp_path: Path) -> None:
    planned = plan(tmp_path, "lbt_m2", "--limit", "2", "--model", PARSABLE)
    stages = {s["name"]: s for s in planned["stages"]}
    assert stages["student"]["calls_needed"] > 0  # was 0: the exam's fan-out dropped the placeholders
    ran = run_cli("run", "lbt_m2", "--limit", "2", "--model", PARSABLE, "--json", "-q", cwd=tmp_path)
    assert ran.returncode in (0, 5), ran.stderr
    needed = {s["name"]: s["calls_needed"] for s in json.loads(ran.stdout)["stages"]}
    # the samples each stage needed; rows with the same prompt then share a call, which a plan cannot know
    assert {n: s["calls_needed"] for n, s in stages.items() if s["kind"] == "prompt"} == \
        {n: needed[n] for n in ("teach", "student")}
    assert planned["calls_made"] == 0
    con = duckdb.connect(str(tmp_path / ".retort" / "retort.duckdb"), read_only=True)
    try:  # the plan wrote nothing: one run, and its failures only
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(1,)]
        assert con.execute("SELECT count(*) FROM failures WHERE run_id = 0").fetchall() == [(0,)]
    finally:
        con.close()


PRICED = """\
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "retort.backends.scripted:echo", price_input: 2.0, price_output: 8.0}
stages:
  - name: ask
    template: "{{ text }}"
    params: {max_tokens: 10}
"""


def test_cost_and_completion_tokens_before_and_after(workspace: Path) -> None:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"w{i} " * 40}) for i in range(5)))
    (workspace / "pipelines" / "p.yaml").write_text(PRICED)
    first = plan(workspace, "p")
    ask = first["stages"][0]
    assert ask["model"] == "default" and ask["completion_basis"] == "max_tokens"
    assert ask["est_completion_tokens"] == 5 * 10
    assert ask["cost_usd"] == pytest.approx((ask["est_prompt_tokens"] * 2.0 + 50 * 8.0) / 1e6)
    assert first["cost_usd"] == pytest.approx(ask["cost_usd"])
    shown = run_cli("plan", "p", cwd=workspace)
    assert f"${ask['cost_usd']:,.4f}" in shown.stdout and "max_tokens" in shown.stdout

    ran = run_cli("run", "p", "--json", "-q", cwd=workspace)
    result = json.loads(ran.stdout)
    spent = (result["prompt_tokens"] * 2.0 + result["completion_tokens"] * 8.0) / 1e6
    assert result["cost_usd"] == pytest.approx(spent) and spent > 0
    summary = run_cli("run", "p", "--no-reuse", cwd=workspace)  # all cached: nothing spent
    assert "cost $0.0000" in summary.stdout

    (workspace / "pipelines" / "p.yaml").write_text(PRICED.replace('"{{ text }}"', '"again {{ text }}"'))
    second = plan(workspace, "p")["stages"][0]
    assert second["completion_basis"] == "history (5 calls)"  # this stage's own calls, not max_tokens
    assert second["est_completion_tokens"] == pytest.approx(5 * result["completion_tokens"] / 5, abs=5)


def test_prices() -> None:
    assert costs.price({"backend": "openai", "model": "gpt-4o-mini"}) == (0.15, 0.60)
    assert costs.price({"backend": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:8000/v1"}) is None
    assert costs.price({"backend": "openai", "model": "my-model", "price_input": 1, "price_output": 3}) == (1.0, 3.0)
    assert costs.price({"backend": "local"}) == (0.0, 0.0) and costs.price({"backend": "scripted"}) is None
    assert costs.price({"backend": "vllm", "model": "x"}) is None
    assert costs.usd(1e6, 2e6, (1.0, 3.0)) == pytest.approx(7.0) and costs.usd(1, 1, None) is None
