"""The one-stage job in Bespoke Labs Curator; run with the curator venv's python by bench/bench_peers.py.

    python curator_peer.py --url http://127.0.0.1:PORT/v1 --n 10000 --concurrency 64 --cache-dir DIR

Prompts "What is {i} plus {i}?" for i in 0..n-1 through `curator.LLM` (backend openai,
base_url = the stub, a dummy key), the cache in DIR (CURATOR_CACHE_DIR), and prints one JSON
line: what ran, the time of the LLM call alone (imports and dataset building excluded), and
the checks on the output. Run twice with the same DIR: the second run is the cached rerun.

The environment (set by bench_peers.py, repeated here so the script is safe on its own) keeps
it offline: telemetry off, litellm's local cost map, Hugging Face offline, and tiktoken's
cl100k_base read from TIKTOKEN_CACHE_DIR.
"""

from __future__ import annotations

import os
import time

from job import report, setup

OFFLINE_ENV = {
    "TELEMETRY_ENABLED": "false",  # curator's PostHog client (bespokelabs/curator/telemetry/client.py)
    "DO_NOT_TRACK": "1",
    "CURATOR_VIEWER": "0",  # no hosted viewer session
    "CURATOR_DISABLE_RICH_DISPLAY": "1",  # a plain log instead of a live console
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm fetches its cost map at import otherwise
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def main() -> None:
    args = setup(OFFLINE_ENV)
    os.environ["CURATOR_CACHE_DIR"] = args.cache_dir

    import importlib.metadata

    from bespokelabs import curator
    from datasets import Dataset

    class Sums(curator.LLM):
        def prompt(self, input: dict) -> str:
            return f"What is {input['i']} plus {input['i']}?"

        def parse(self, input: dict, response: str) -> dict:
            return {"i": input["i"], "answer": response}

    llm = Sums(model_name="stub", backend="openai",
               backend_params={"base_url": args.url, "api_key": "dummy",
                               "max_concurrent_requests": args.concurrency,
                               # Curator's rate limiter otherwise paces to its default budget.
                               "max_requests_per_minute": 100_000_000, "max_tokens_per_minute": 10_000_000_000,
                               "max_retries": 1, "request_timeout": 60})
    dataset = Dataset.from_list([{"i": i} for i in range(args.n)])
    start, cpu_start = time.perf_counter(), time.process_time()
    out = llm(dataset)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    data = getattr(out, "dataset", out)  # CuratorResponse in recent versions, a Dataset before
    report("curator", importlib.metadata.version("bespokelabs-curator"), args.n, data.to_list(), "answer",
           seconds, cpu)


if __name__ == "__main__":
    main()
