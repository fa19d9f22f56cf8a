"""Peak RSS while 200,000 input rows go through a prompt stage on the scripted backend.

    python bench/bench_memory.py [--rows 200000]

Goal: under 1 GiB. The stage streams its input in chunks and the cache
group-commits rows and calls, so memory is bounded by the chunk and the flush
interval, not by the dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
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
  - name: classify
    template: "{% block system %}Label the review.{% endblock %}{% block user %}Review: {{ text }}{% endblock %}"
    parse: {regex: "(?P<first>\\\\w+)"}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("pipelines", "data"):
            (root / folder).mkdir()
        (root / "pipelines" / "mem.yaml").write_text(PIPELINE)
        with (root / "data" / "rows.jsonl").open("w") as f:
            for i in range(args.rows):
                f.write(json.dumps({"text": f"review number {i}: " + "quite a long sentence about a film " * 3,
                                    "label": "positive" if i % 2 else "negative"}) + "\n")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ws = Workspace(root)
        spec, source = load_pipeline(root / "pipelines" / "mem.yaml")
        cache = Cache(ws.db_path)
        begun = time.perf_counter()
        try:
            result = asyncio.run(Runner(ws, spec, source, cache).execute())
        finally:
            cache.close()
        seconds = time.perf_counter() - begun
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{args.rows:,} rows, {result.totals()['calls_made']:,} calls in {seconds:.1f}s "
              f"({result.totals()['calls_made'] / seconds:,.0f} calls/s); peak RSS {peak:,.0f} MiB "
              f"(before the run {before:,.0f} MiB); goal < 1024 MiB -> {'PASS' if peak < 1024 else 'FAIL'}")


if __name__ == "__main__":
    main()
