"""Replay of a fully cached 4-stage pipeline: cached calls per second, end to end.

    python bench/bench_replay.py [--rows 10000]

Builds a workspace in a temp folder with a 4-stage chain on the scripted backend,
runs it once to fill the cache, then times reruns in the same process with stage
reuse off (`--no-reuse`), so that every row is rendered, hashed, looked up and
written again: the cost of replaying a pipeline whose calls are all cached (what a
rerun after editing the first stage's parser costs, say). Goal (issue 10): 100,000
cached calls/s, wall clock, best of --repeat; the rate per second of the process's CPU
time is printed too (steadier when the machine is shared). Last, one rerun with reuse
on, where nothing changed and every stage is reused whole, and one more, which finds
that run up to date and makes none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from retort.cache import Cache
from retort.runner import Runner
from retort.spec import load_pipeline
from retort.workspace import Workspace

PIPELINE = """
input: {path: data/rows.jsonl}
models:
  default: {backend: scripted, function: "retort.backends.scripted:echo", max_concurrency: 256}
stages:
  - {name: s1, template: "Key concepts of: {{ text }}", params: {max_tokens: 32}}
  - {name: s2, from: s1, template: "Knowledge about {{ s1 }} for {{ label }}"}
  - {name: s3, from: s2, template: "{% block system %}Rewrite.{% endblock %}{% block user %}{{ s2 }}{% endblock %}"}
  - {name: s4, from: s3, template: "Classify: {{ s3 }}", parse: {choice: [positive, negative]}, output: pred}
"""


def make_workspace(root: Path, rows: int) -> Path:
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "pipelines" / "chain.yaml").write_text(PIPELINE)
    with (root / "data" / "rows.jsonl").open("w") as f:
        for i in range(rows):
            label = "positive" if i % 2 else "negative"
            f.write(json.dumps({"text": f"row {i}: a short text that is rather {label}", "label": label}) + "\n")
    return root / "pipelines" / "chain.yaml"


def run_once(root: Path, spec_path: Path, reuse: bool = False) -> tuple[float, float, dict[str, int]]:
    """Wall and process CPU seconds of one run (CPU time is steadier on a shared machine)."""
    ws = Workspace(root)
    pipeline, source = load_pipeline(spec_path)
    cache = Cache(ws.db_path)
    try:
        begun, cpu = time.perf_counter(), time.process_time()
        result = asyncio.run(Runner(ws, pipeline, source, cache, reuse=reuse).execute())
        if result.totals()["calls_made"] == 0 and any(s.reused_from for s in result.stages) != reuse:
            raise AssertionError(f"reuse={reuse}, but stages reused: {[s.reused_from for s in result.stages]}")
        cache.flush()
        seconds, cpu = time.perf_counter() - begun, time.process_time() - cpu
    finally:
        cache.close()
    return seconds, cpu, result.totals()


def main() -> None:
    """Under the collector settings `retort run` uses for its own process (retort.cliutil.collector_for_runs);
    the library itself changes nothing process-wide."""
    from retort.cliutil import collector_for_runs

    with collector_for_runs():
        _main()


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = make_workspace(root, args.rows)
        cold, _, totals = run_once(root, spec, reuse=True)  # builds every stage, and remembers them
        print(f"cold run (scripted backend, {totals['calls_made']} calls): {cold:.2f}s")
        best = best_cpu = 0.0
        for _ in range(args.repeat):
            warm, cpu, totals = run_once(root, spec)
            assert totals["calls_made"] == 0, totals
            rate = totals["cache_hits"] / warm
            best, best_cpu = max(best, rate), max(best_cpu, totals["cache_hits"] / cpu)
            print(f"replay: {totals['cache_hits']} cached calls in {warm:.2f}s wall ({cpu:.2f}s CPU) = "
                  f"{rate:,.0f} cached calls/s")
        verdict = "PASS" if best >= 100_000 else "FAIL"
        print(f"best of {args.repeat}: {best:,.0f} cached calls/s (goal 100,000) -> {verdict}; "
              f"per CPU second: {best_cpu:,.0f}")
        warm, _, totals = run_once(root, spec, reuse=True)  # the latest run is a --no-reuse one: a new run
        print(f"rerun with every stage reused: {warm * 1000:.1f} ms for {totals['cache_hits']} cached calls "
              f"({totals['cache_hits'] / warm:,.0f}/s)")
        warm, _, totals = run_once(root, spec, reuse=True)  # and now the latest is the same: up to date
        print(f"rerun again, up to date (no new run): {warm * 1000:.1f} ms")


if __name__ == "__main__":
    main()
