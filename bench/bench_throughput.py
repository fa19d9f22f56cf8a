"""Throughput baselines: requests/s at the same concurrency against an OpenAI-compatible server.

    python bench/bench_throughput.py                       # stub server in a subprocess, 10,000 requests each
    python bench/bench_throughput.py --n 2000 --only aiohttp_orjson backend_fast
    python bench/bench_throughput.py --url http://gpu1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    python bench/bench_throughput.py --repeat 3 --only aiohttp_orjson retort_e2e retort_cached
    python bench/bench_throughput.py --only retort_e2e --profile /tmp/retort.prof   # cProfile of the run
    python bench/bench_throughput.py --stub-latency 0.05   # a server that takes 50 ms per answer

The stub (bench/stub_server.py) answers at once, so what is measured is the client's
own per-request cost. It runs in a subprocess so that it has a core of its own.

Each contender is one async function `(target, n, concurrency) -> Timing` listed in
CONTENDERS: it sets up its client, hands `drive` a coroutine that makes request i
and checks the answer, and tears the client down. A new contender (say, a one-stage
pipeline run end to end through the runner) is one more function and one more entry.
Ratios are against the bare aiohttp + orjson loop, what a plain Python client costs;
`wire_bare` is the same loop over retort's own HTTP/1.1 client (retort.backends.wire).

Four contenders run the whole engine instead (`retort.runner.Runner`, in process,
as bench/bench_replay.py does): a one-stage pipeline of n rows (a Jinja template
that renders the very prompt `messages(i)`, parse text) on the `openai` backend,
`transport: fast`, `max_concurrency` = the loops' concurrency.
  retort_e2e     a fresh workspace and DuckDB each time, so every row is a real HTTP
                 call; timed from Runner.execute() to its return (input load,
                 preflight, calls, group commits, finish_run).
  retort_cached  the same pipeline run once untimed to fill the DuckDB, then timed
                 again on it: nothing changed, so the stage's table is copied from
                 the first run (its fingerprint matches), the stub never asked.
  retort_replayed  the same rerun with reuse off (`--no-reuse`): every row
                 rendered, hashed, looked up in `calls` and parsed again.
  retort_engine  (diagnostic) retort_e2e with the in-process echo backend instead of
                 HTTP: what the engine itself costs per call.

Requests/s depends on whatever else runs on the machine; the client's CPU time per
request (this process only, the stub excluded) is steadier, so both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stub_server import launch

from retort.backends.base import Request
from retort.backends.openai import OpenAIBackend
from retort.backends.wire import Pool
from retort.cache import Cache
from retort.runner import Runner, RunResult
from retort.spec import load_pipeline
from retort.workspace import Workspace

BASELINE = "aiohttp_orjson"


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # base URL, ending in /v1
    model: str


def messages(i: int) -> list[dict[str, str]]:
    """A distinct short prompt per request, the same for every contender."""
    return [{"role": "user", "content": f"What is {i} plus {i}?"}]


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float  # wall clock for the n timed calls
    cpu_seconds: float  # this process's CPU time over the same span


async def drive(call: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> Timing:
    """Make calls 0..n-1 from `concurrency` workers; return how long the n calls took.

    One untimed round first, so every contender is measured with its connections open.
    """
    await asyncio.gather(*(call(n + k) for k in range(concurrency)))
    ids: Iterator[int] = iter(range(n))

    async def worker() -> None:
        for i in ids:  # the iterator is shared: each worker takes the next id
            await call(i)

    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Timing(time.perf_counter() - start, time.process_time() - cpu_start)


# --- contenders ---------------------------------------------------------------------------

async def sdk_httpx(target: Target, n: int, concurrency: int) -> Timing:
    """(a) AsyncOpenAI as most code uses it: the default httpx client."""
    async with openai.AsyncOpenAI(base_url=target.url, api_key="bench", max_retries=0) as client:
        async def call(i: int) -> None:
            resp = await client.chat.completions.create(model=target.model, messages=messages(i))  # type: ignore[arg-type]
            assert resp.choices[0].message.content

        return await drive(call, n, concurrency)


async def sdk_aiohttp(target: Target, n: int, concurrency: int) -> Timing:
    """(b) AsyncOpenAI over the SDK's aiohttp transport (DefaultAioHttpClient)."""
    async with openai.AsyncOpenAI(base_url=target.url, api_key="bench", max_retries=0,
                                  http_client=openai.DefaultAioHttpClient()) as client:
        async def call(i: int) -> None:
            resp = await client.chat.completions.create(model=target.model, messages=messages(i))  # type: ignore[arg-type]
            assert resp.choices[0].message.content

        return await drive(call, n, concurrency)


async def aiohttp_orjson(target: Target, n: int, concurrency: int) -> Timing:
    """(c) The ceiling: one aiohttp session, orjson both ways, nothing else."""
    url = f"{target.url}/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     headers={"Content-Type": "application/json"}) as session:
        async def call(i: int) -> None:
            body = orjson.dumps({"model": target.model, "messages": messages(i)})
            async with session.post(url, data=body) as resp:
                data = orjson.loads(await resp.read())
            assert resp.status == 200 and data["choices"][0]["message"]["content"]

        return await drive(call, n, concurrency)


async def wire_bare(target: Target, n: int, concurrency: int) -> Timing:
    """(d) The same bare loop over retort's own HTTP/1.1 client (retort.backends.wire)."""
    pool = Pool(target.url, headers={"Content-Type": "application/json"}, limit=concurrency)

    async def call(i: int) -> None:
        body = orjson.dumps({"model": target.model, "messages": messages(i)})
        status, _, content = await pool.request("POST", "/chat/completions", body, timeout=60)
        data = orjson.loads(content)
        assert status == 200 and data["choices"][0]["message"]["content"]

    try:
        return await drive(call, n, concurrency)
    finally:
        await pool.close()


async def _backend(target: Target, n: int, concurrency: int, transport: str) -> Timing:
    backend = OpenAIBackend(target.model, target.url, max_concurrency=concurrency,
                            transport=transport)  # type: ignore[arg-type]

    async def call(i: int) -> None:
        completion = await backend.complete(Request(messages=messages(i)))
        assert completion.texts[0]

    try:
        return await drive(call, n, concurrency)
    finally:
        await backend.aclose()


async def backend_fast(target: Target, n: int, concurrency: int) -> Timing:
    """(d) OpenAIBackend, fast transport, called directly (no runner)."""
    return await _backend(target, n, concurrency, "fast")


async def backend_sdk(target: Target, n: int, concurrency: int) -> Timing:
    """(e) OpenAIBackend, SDK transport, called directly (no runner)."""
    return await _backend(target, n, concurrency, "sdk")


# --- retort end to end -------------------------------------------------------------------

# The template renders exactly messages(i): the same bytes on the wire as the loops above.
TEMPLATE = "What is {{ i }} plus {{ i }}?"


def pipeline_yaml(url: str, model: str, concurrency: int, *, scripted: bool = False) -> str:
    """The one-stage pipeline on the stub; `scripted` swaps in the in-process echo backend (no HTTP at all)."""
    if scripted:
        model_lines = ["    backend: scripted", '    function: "retort.backends.scripted:echo"']
    else:
        model_lines = ["    backend: openai", f"    model: {json.dumps(model)}", f"    base_url: {json.dumps(url)}",
                       "    transport: fast"]
    return "\n".join([
        "input: {path: data/rows.jsonl}",
        "models:",
        "  default:",
        *model_lines,
        f"    max_concurrency: {concurrency}",
        "stages:",
        f"  - {{name: s1, template: {json.dumps(TEMPLATE)}, parse: text}}",
    ]) + "\n"


def make_workspace(root: Path, url: str, model: str, rows: int, concurrency: int, *,
                   scripted: bool = False) -> Path:
    """A workspace in `root` with pipelines/bench.yaml and data/rows.jsonl (rows {"i": 0..rows-1})."""
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    spec = root / "pipelines" / "bench.yaml"
    spec.write_text(pipeline_yaml(url, model, concurrency, scripted=scripted))
    (root / "data" / "rows.jsonl").write_bytes(b"".join(orjson.dumps({"i": i}) + b"\n" for i in range(rows)))
    return spec


async def run_pipeline(root: Path, spec: Path, *, max_retries: int = 5,
                       reuse: bool = True) -> tuple[RunResult, Timing]:
    """One Runner.execute() on the workspace's DuckDB, timed (wall and this process's CPU)."""
    ws = Workspace(root)
    pipeline, source = load_pipeline(spec)
    cache = Cache(ws.db_path)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = await Runner(ws, pipeline, source, cache, max_retries=max_retries, reuse=reuse).execute()
        timing = Timing(time.perf_counter() - start, time.process_time() - cpu_start)
    finally:
        cache.close()
    return result, timing


PROFILE: cProfile.Profile | None = None  # set by --profile: wraps the timed retort run


async def _timed_retort_run(root: Path, spec: Path, reuse: bool = True) -> tuple[RunResult, Timing]:
    if PROFILE is None:
        return await run_pipeline(root, spec, reuse=reuse)
    PROFILE.enable()
    try:
        return await run_pipeline(root, spec, reuse=reuse)
    finally:
        PROFILE.disable()


def check_totals(result: RunResult, n: int, *, made: int, hits: int) -> None:
    totals = result.totals()
    stage = result.stages[0]
    if (totals["calls_made"], totals["cache_hits"], totals["failures"], stage.rows_out) != (made, hits, 0, n):
        raise AssertionError(f"expected {made} calls made, {hits} cache hits, 0 failures and {n} rows out, got "
                             f"{totals} and {stage.rows_out} rows out")


async def retort_e2e(target: Target, n: int, concurrency: int) -> Timing:
    """(f) A one-stage pipeline through retort.runner.Runner, fresh DuckDB: n real HTTP calls."""
    with tempfile.TemporaryDirectory(prefix="retort-bench-") as tmp:
        spec = make_workspace(Path(tmp), target.url, target.model, n, concurrency)
        result, timing = await _timed_retort_run(Path(tmp), spec)
        check_totals(result, n, made=n, hits=0)
        return timing


async def retort_engine(target: Target, n: int, concurrency: int) -> Timing:
    """(h) Diagnostic: retort_e2e on the in-process echo backend: the engine's own cost, no HTTP."""
    with tempfile.TemporaryDirectory(prefix="retort-bench-") as tmp:
        spec = make_workspace(Path(tmp), target.url, target.model, n, concurrency, scripted=True)
        result, timing = await _timed_retort_run(Path(tmp), spec)
        check_totals(result, n, made=n, hits=0)
        return timing


async def _cached(target: Target, n: int, concurrency: int, reuse: bool) -> Timing:
    with tempfile.TemporaryDirectory(prefix="retort-bench-") as tmp:
        spec = make_workspace(Path(tmp), target.url, target.model, n, concurrency)
        first, _ = await run_pipeline(Path(tmp), spec)
        check_totals(first, n, made=n, hits=0)
        result, timing = await _timed_retort_run(Path(tmp), spec, reuse)
        check_totals(result, n, made=0, hits=n)
        if (result.stages[0].reused_from is not None) != reuse or result.up_to_date != reuse:
            raise AssertionError(f"stage reused from {result.stages[0].reused_from}, expected reuse={reuse}")
        return timing


async def retort_cached(target: Target, n: int, concurrency: int) -> Timing:
    """(g) The same pipeline again on its filled DuckDB: nothing changed, so the run is up to date."""
    return await _cached(target, n, concurrency, reuse=True)


async def retort_replayed(target: Target, n: int, concurrency: int) -> Timing:
    """(g') The same rerun with reuse off (--no-reuse): every row rendered, hashed, looked up and parsed."""
    return await _cached(target, n, concurrency, reuse=False)


Contender = Callable[[Target, int, int], Coroutine[Any, Any, Timing]]
CONTENDERS: dict[str, Contender] = {
    "sdk_httpx": sdk_httpx,
    "sdk_aiohttp": sdk_aiohttp,
    BASELINE: aiohttp_orjson,
    "wire_bare": wire_bare,
    "backend_fast": backend_fast,
    "backend_sdk": backend_sdk,
    "retort_e2e": retort_e2e,
    "retort_cached": retort_cached,
    "retort_replayed": retort_replayed,
    "retort_engine": retort_engine,
}
# What each contender's rate counts: requests, or (retort_cached) cache hits.
UNITS = {"retort_cached": "rows/s", "retort_replayed": "hits/s", "retort_engine": "calls/s"}


# --- the harness --------------------------------------------------------------------------

def start_stub_process(latency: float = 0.0, jitter: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """Start bench/stub_server.py on a free port; its first stdout line is its URL.

    `latency` > 0 holds every answer that long (the stub's slow path at rate 1), like a server
    that takes time to generate: then the ceiling is concurrency / latency, not the client's CPU.
    `jitter` j draws each hold from latency * [1 - j, 1 + j] instead.
    """
    extra = ["--slow-rate", "1", "--slow-seconds", str(latency), "--slow-jitter", str(jitter)] if latency > 0 else []
    return launch(*extra)


@dataclass
class Best:
    """The best round of each contender: rate (requests or hits per second), CPU µs per request."""

    rate: dict[str, float]
    cpu_us: dict[str, float]


def measure(names: list[str], target: Target, n: int, concurrency: int, repeat: int) -> Best:
    """Run the contenders `repeat` rounds, interleaved, printing each round; keep the best of each."""
    best = Best({}, {})
    # Rounds interleave the contenders, so a burst of load from elsewhere on the machine
    # hits them alike; the best round is the least disturbed one.
    for round_ in range(1, repeat + 1):
        for name in names:
            # A fresh event loop per contender: nothing left over from the previous one.
            timing = asyncio.run(CONTENDERS[name](target, n, concurrency))
            rate, cpu_us = n / timing.seconds, timing.cpu_seconds / n * 1e6
            best.rate[name] = max(best.rate.get(name, 0.0), rate)
            best.cpu_us[name] = min(best.cpu_us.get(name, float("inf")), cpu_us)
            print(f"  round {round_}  {name:<16} {rate:>8,.0f} {UNITS.get(name, 'req/s'):<6} "
                  f"{cpu_us:>7,.0f} µs CPU/req  ({timing.seconds:.2f} s)", flush=True)
    return best


def print_best(best: Best, repeat: int) -> None:
    print(f"best of {repeat}, and ratio to {BASELINE} (throughput; CPU per request):")
    base_rate, base_cpu = best.rate.get(BASELINE), best.cpu_us.get(BASELINE)
    for name, rate in best.rate.items():
        cpu_us = best.cpu_us[name]
        ratios = f"{rate / base_rate:6.2f}  {cpu_us / base_cpu:6.2f}" if base_rate and base_cpu else ""
        print(f"  {name:<16} {rate:>8,.0f} {UNITS.get(name, 'req/s'):<6} {cpu_us:>7,.0f} µs CPU/req  {ratios}")


def main() -> None:
    """Under the collector settings `retort run` uses for its own process (retort.cliutil.collector_for_runs);
    the library itself changes nothing process-wide."""
    from retort.cliutil import collector_for_runs

    with collector_for_runs():
        _main()


def _main() -> None:
    global PROFILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="timed requests (retort: rows) per contender")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all contenders; the best counts")
    parser.add_argument("--only", nargs="+", choices=sorted(CONTENDERS), help="run only these contenders")
    parser.add_argument("--url", help="an existing server's base URL (…/v1) instead of the stub")
    parser.add_argument("--model", default="stub", help="model name sent in each request")
    parser.add_argument("--stub-latency", type=float, default=0.0, metavar="SECONDS",
                        help="the stub holds every answer this long (default 0: answers at once)")
    parser.add_argument("--stub-jitter", type=float, default=0.0, metavar="J",
                        help="each hold drawn from latency * [1 - J, 1 + J] (default 0: all alike)")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile the timed retort runs (retort_e2e, retort_cached) into FILE (pstats)")
    args = parser.parse_args()

    proc, url = (None, args.url) if args.url else start_stub_process(args.stub_latency, args.stub_jitter)
    target = Target(url=url.rstrip("/"), model=args.model)
    names = args.only or list(CONTENDERS)
    if args.profile:
        PROFILE = cProfile.Profile()
    try:
        latency = f" (answers held {args.stub_latency * 1000:g} ms)" if args.stub_latency and not args.url else ""
        print(f"{args.n} requests per contender, concurrency {args.concurrency}, server {target.url}{latency}")
        best = measure(names, target, args.n, args.concurrency, args.repeat)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    print_best(best, args.repeat)
    if PROFILE is not None:
        PROFILE.dump_stats(args.profile)
        print(f"profile of the timed retort runs: {args.profile} (python -m pstats {args.profile})")


if __name__ == "__main__":
    main()
