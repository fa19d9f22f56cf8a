"""Throughput baselines: requests/s at the same concurrency against an OpenAI-compatible server.

    python bench/bench_throughput.py                       # stub server in a subprocess, 10,000 requests each
    python bench/bench_throughput.py --n 2000 --only aiohttp_orjson backend_fast
    python bench/bench_throughput.py --url http://gpu1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

The stub (bench/stub_server.py) answers at once, so what is measured is the client's
own per-request cost. It runs in a subprocess so that it has a core of its own.

Each contender is one async function `(target, n, concurrency) -> Timing` listed in
CONTENDERS: it sets up its client, hands `drive` a coroutine that makes request i
and checks the answer, and tears the client down. A new contender (say, a one-stage
pipeline run end to end through the runner) is one more function and one more entry.
Ratios are against the bare aiohttp + orjson loop, the ceiling for a Python client.

Requests/s depends on whatever else runs on the machine; the client's CPU time per
request (this process only, the stub excluded) is steadier, so both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
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

from retort.backends.base import Request
from retort.backends.openai import OpenAIBackend

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


Contender = Callable[[Target, int, int], Coroutine[Any, Any, Timing]]
CONTENDERS: dict[str, Contender] = {
    "sdk_httpx": sdk_httpx,
    "sdk_aiohttp": sdk_aiohttp,
    BASELINE: aiohttp_orjson,
    "backend_fast": backend_fast,
    "backend_sdk": backend_sdk,
}


# --- the harness --------------------------------------------------------------------------

def start_stub_process() -> tuple[subprocess.Popen[str], str]:
    """Start bench/stub_server.py on a free port; its first stdout line is its URL."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("stub_server.py")), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit(f"the stub server did not start (exit code {proc.wait()})")
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="timed requests per contender")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all contenders; the best counts")
    parser.add_argument("--only", nargs="+", choices=sorted(CONTENDERS), help="run only these contenders")
    parser.add_argument("--url", help="an existing server's base URL (…/v1) instead of the stub")
    parser.add_argument("--model", default="stub", help="model name sent in each request")
    args = parser.parse_args()

    proc, url = (None, args.url) if args.url else start_stub_process()
    target = Target(url=url.rstrip("/"), model=args.model)
    names = args.only or list(CONTENDERS)
    best: dict[str, float] = {}  # requests/s
    cpu: dict[str, float] = {}  # client CPU microseconds per request
    try:
        print(f"{args.n} requests per contender, concurrency {args.concurrency}, server {target.url}")
        # Rounds interleave the contenders, so a burst of load from elsewhere on the machine
        # hits them alike; the best round is the least disturbed one.
        for round_ in range(1, args.repeat + 1):
            for name in names:
                # A fresh event loop per contender: nothing left over from the previous one.
                timing = asyncio.run(CONTENDERS[name](target, args.n, args.concurrency))
                rate, cpu_us = args.n / timing.seconds, timing.cpu_seconds / args.n * 1e6
                best[name] = max(best.get(name, 0.0), rate)
                cpu[name] = min(cpu.get(name, float("inf")), cpu_us)
                print(f"  round {round_}  {name:<16} {rate:>8,.0f} req/s  {cpu_us:>7,.0f} µs CPU/req  "
                      f"({timing.seconds:.2f} s)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"best of {args.repeat}, and ratio to {BASELINE} (throughput; CPU per request):")
    for name, rate in best.items():
        ratios = f"{rate / best[BASELINE]:6.2f}  {cpu[name] / cpu[BASELINE]:6.2f}" if BASELINE in best else ""
        print(f"  {name:<16} {rate:>8,.0f} req/s  {cpu[name]:>7,.0f} µs CPU/req  {ratios}")


if __name__ == "__main__":
    main()
