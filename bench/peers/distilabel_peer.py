"""The one-stage job in distilabel; run with the distilabel venv's python by bench/bench_peers.py.

    python distilabel_peer.py --url http://127.0.0.1:PORT/v1 --n 10000 --concurrency 64 --cache-dir DIR

LoadDataFromDicts >> TextGeneration(template "What is {{ i }} plus {{ i }}?", OpenAILLM on
the stub with a dummy key). distilabel sends one batch's requests concurrently, so
`input_batch_size` = --concurrency is its concurrency setting. `pipeline.run(use_cache=True)`
with the pipeline's cache in DIR: run twice with the same DIR for the cached rerun. Prints one
JSON line: the time of pipeline.run alone (imports excluded) and the checks on the output.
"""

from __future__ import annotations

import time

from job import report, setup

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
    args = setup(OFFLINE_ENV)

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
    report("distilabel", importlib.metadata.version("distilabel"), args.n, distiset["default"]["train"].to_list(),
           "generation", seconds, None)


if __name__ == "__main__":
    main()
