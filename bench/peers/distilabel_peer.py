"""The one-stage job in distilabel; run with the distilabel venv's python by bench/bench_peers.py.

    python distilabel_peer.py --url http://127.0.0.1:PORT/v1 --n 10000 --concurrency 64 --cache-dir DIR

LoadDataFromDicts >> TextGeneration(template "What is {{ i }} plus {{ i }}?", OpenAILLM on
the stub with a dummy key). distilabel sends one batch's requests concurrently, so
`input_batch_size` = --concurrency is its concurrency setting. `pipeline.run(use_cache=True)`
with the pipeline's cache in DIR: run twice with the same DIR for the cached rerun. Prints one
JSON line: the time of pipeline.run alone (imports excluded) and the checks on the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

OFFLINE_ENV = {
    # distilabel 1.5 sends no telemetry of its own; the Hugging Face libraries it uses would
    # reach the Hub, so they are kept offline.
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISTILABEL_LOG_LEVEL": "WARNING",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the stub's base URL, ending in /v1")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--cache-dir", required=True)
    args = ap.parse_args()
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["OPENAI_API_KEY"] = "dummy"
    os.environ.pop("OPENAI_BASE_URL", None)

    import importlib.metadata

    from distilabel.models.llms import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    with Pipeline(name="retort-bench", cache_dir=args.cache_dir) as pipeline:
        load = LoadDataFromDicts(data=[{"i": i} for i in range(args.n)], batch_size=args.concurrency)
        generate = TextGeneration(
            llm=OpenAILLM(model="stub", base_url=args.url, api_key="dummy", max_retries=0, timeout=60),
            template="What is {{ i }} plus {{ i }}?", columns=["i"], input_batch_size=args.concurrency)
        load >> generate

    start = time.perf_counter()
    distiset = pipeline.run(use_cache=True)
    seconds = time.perf_counter() - start
    rows = distiset["default"]["train"].to_list()
    answers = {r["i"]: r["generation"] for r in rows}
    ok = len(rows) == args.n and len(answers) == args.n and all(
        isinstance(a, str) and a.endswith(f"What is {i} plus {i}?"[:24]) for i, a in answers.items())
    print(json.dumps({"peer": "distilabel", "version": importlib.metadata.version("distilabel"),
                      "seconds": seconds, "cpu_seconds": None, "rows": len(rows), "distinct": len(answers),
                      "ok": ok}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
