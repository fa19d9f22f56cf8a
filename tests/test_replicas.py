"""One model behind three replicas on loopback; one starts dropping connections mid-run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bench.stub_server import STATE, start_stub
from retort import backends
from retort.backends.base import Backend
from retort.cache import Cache
from retort.runner import Runner, RunResult
from retort.spec import load_pipeline
from retort.workspace import Workspace

pytestmark = pytest.mark.http


def test_a_failing_replica_is_taken_out_and_the_others_carry_the_load(workspace: Path) -> None:
    rows = [{"text": f"question {i}"} for i in range(600)]
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec_path = workspace / "pipelines" / "p.yaml"

    async def scenario() -> tuple[RunResult, list[int], int]:
        servers = [await start_stub() for _ in range(3)]
        urls = [url for _, url in servers]
        spec_path.write_text(
            "input: {path: data/rows.jsonl}\n"
            f"models:\n  default: {{backend: openai, model: stub, base_url: {json.dumps(urls)}, max_concurrency: 16,"
            " timeout: 5}\n"
            "stages:\n  - {name: ask, template: 'Q: {{ text }}'}\n")
        sick = servers[1][0].app[STATE]
        made: list[Any] = []

        def factory(name: str, config: dict[str, Any]) -> Backend:
            made.append(backends.create(name, config))
            return made[-1]  # type: ignore[no-any-return]

        async def break_replica() -> int:
            while sick.requests < 40:
                await asyncio.sleep(0.005)
            sick.faults.drop_rate = 1.0  # from now on every connection to it is reset
            return sick.requests

        ws = Workspace(workspace)
        spec, source = load_pipeline(spec_path)
        cache = Cache(ws.db_path)
        breaker = asyncio.create_task(break_replica())
        try:
            result = await Runner(ws, spec, source, cache, backend_factory=factory).execute()
        finally:
            cache.close()
            for runner, _ in servers:
                await runner.cleanup()
        return result, [s[0].app[STATE].requests for s in servers], await breaker

    result, served, broke_at = asyncio.run(scenario())
    assert result.failures == 0 and result.stages[0].rows_out == 600
    healthy = served[0] + served[2]
    # every row answered by a healthy replica, except those the sick one answered before it broke
    assert healthy + broke_at >= 600
    assert served[1] - broke_at <= 20  # after breaking it got only the few requests that took it out
    assert min(served[0], served[2]) > 200  # and the healthy two shared the rest
