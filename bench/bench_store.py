"""The store under load: per-chunk look-up time as the cache grows, and the event loop's lag while
a run commits.

    python bench/bench_store.py                      # look-ups at 10k, 1M, 10M cached calls; lag at 100k rows
    python bench/bench_store.py --sizes 10000 1000000 --lag-rows 20000

Look-ups: a DuckDB file with N calls (made by SQL, like a real cache's rows), then the time of
`Cache.lookup` for one prompt stage's chunk (4,096 keys), best and median of --rounds after a warm-up,
for three chunks: hits written together (a replay: an earlier run wrote them one after another), hits
scattered over the whole ledger (each written by a different run: the worst case), and misses (a first
run); with the key index (retort.cache._KeyIndex) and without it (the scan of every row that retort
did before). Also the first look-up, which builds the index, and the index's memory. The goal is
flat, not linear, in N.

Lag: a scripted pipeline of one prompt stage over N rows (an instant model, so the run is all
engine and store), with a task that sleeps 10 ms in a loop and records how late it wakes: the
longest time the event loop was held while calls stream (from the first call to the last; before,
each module's first use is an import; after, the table is digested and the run recorded, with no
request waiting: `max_lag_ms_with_start` is the whole run). Goal: under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa

from retort.cache import KEY_PREFIX_SQL, Cache

CHUNK = 4096


def make_cache(path: Path, n: int) -> None:
    cache = Cache(path)
    cache.close()
    import duckdb

    con = duckdb.connect(str(path))
    step = 1_000_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        con.execute(f"""INSERT INTO calls BY NAME SELECT key, {KEY_PREFIX_SQL} AS k, 'model' AS model,
            '{{}}' AS request,
            0 AS sample, 0 AS attempt, 'a completion of a realistic length for a short classification answer ' || i
            AS text, 'stop' AS finish_reason, 50 AS prompt_tokens, 20 AS completion_tokens, 1.0 AS latency_ms,
            1 AS run_id, 'ask' AS stage, now() AS created_at
            FROM (SELECT sha256(i::VARCHAR) AS key, i FROM range({start}, {stop}) t(i))""")
    con.execute("CHECKPOINT")
    con.close()


def _time(cache: Cache, keys: list[str], expect: int) -> float:
    t = time.perf_counter()
    found = cache.lookup(keys)
    elapsed = (time.perf_counter() - t) * 1000
    assert len(found) == expect, (len(found), expect)
    return elapsed


def lookups(n: int, workdir: Path, rounds: int = 5) -> dict[str, float]:
    """Per-chunk look-up times (best and median of `rounds`, after warm-up), with the key index and
    without it (the scan of every row that retort did before), for three kinds of chunk:
    hits written together (a replay: an earlier run wrote them one after another), hits scattered over
    the whole ledger (each written by a different run: the worst case), and misses (a first run)."""
    import random

    import retort.cache as store

    path = workdir / f"lookup_{n}.duckdb"
    began = time.monotonic()
    make_cache(path, n)
    made = time.monotonic() - began
    size = min(CHUNK, n)
    rng = random.Random(n)

    def chunk(kind: str, round_: int) -> tuple[list[str], int]:
        if kind == "hit":
            first = rng.randrange(max(1, n - size))
            return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(first, first + size)], size
        if kind == "scattered":
            return [hashlib.sha256(str(i).encode()).hexdigest() for i in rng.sample(range(n), size)], size
        return [hashlib.sha256(f"miss {round_} {i} {rng.random()}".encode()).hexdigest() for i in range(CHUNK)], 0

    out: dict[str, float] = {"calls": n, "build_s": round(made, 1)}
    saved = store.INDEX_SMALL, store.INDEX_AFTER_SCANS
    cache = Cache(path)
    try:
        store.INDEX_SMALL = 1 << 62  # the first look-up builds the index, whatever N
        # DuckDB imports pandas (where installed) at its first Arrow input, ~1 s: a run has paid it writing its
        # input table before any look-up; here it is paid before the clock starts.
        cache.con.register("_warm", pa.table({"k": pa.array([0], pa.int64())}))
        cache.con.unregister("_warm")
        rss = _rss_mb()
        out["index_first_lookup_ms"] = round(_time(cache, *chunk("miss", -1)), 1)
        index = cache._keys
        assert index is not None
        out["index_mb"] = round((index.values.nbytes + index.fence.nbytes) / 2**20, 1)
        out["index_rss_mb"] = round(_rss_mb() - rss, 1)
        store.INDEX_SMALL, store.INDEX_AFTER_SCANS = -1, 1 << 62  # with cache._keys None: the scan, always
        times: dict[str, list[float]] = {f"{mode}_{kind}": [] for mode in ("index", "scan")
                                          for kind in ("hit", "scattered", "miss")}
        for round_ in range(rounds + 1):  # the two modes interleaved, on the same chunks, in the same state
            for kind in ("hit", "scattered", "miss"):
                keys, expect = chunk(kind, round_)
                for mode in ("index", "scan"):
                    cache._keys = index if mode == "index" else None
                    elapsed = _time(cache, keys, expect)
                    if round_:  # the first round warms DuckDB's buffers
                        times[f"{mode}_{kind}"].append(elapsed)
        cache._keys = index
        for name, values in times.items():
            out[f"{name}_ms"] = round(min(values), 1)
            out[f"{name}_median_ms"] = round(statistics.median(values), 1)
    finally:
        store.INDEX_SMALL, store.INDEX_AFTER_SCANS = saved
        cache.close()
        path.unlink()
    return out


def _rss_mb() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def lag(rows: int, workdir: Path) -> dict[str, float]:
    from retort.backends.scripted import ScriptedBackend
    from retort.runner import Runner
    from retort.spec import load_pipeline
    from retort.workspace import Workspace

    ws = workdir / "lag"
    for folder in ("pipelines", "data"):
        (ws / folder).mkdir(parents=True, exist_ok=True)
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(rows)))
    (ws / "pipelines" / "p.yaml").write_text("input: {path: data/rows.jsonl}\nstages:\n"
                                             "  - {name: ask, template: 'Say {{ text }}'}\n")
    pipeline, source = load_pipeline(ws / "pipelines" / "p.yaml")
    cache = Cache(ws / "db.duckdb")
    late: list[tuple[float, float]] = []  # (when the loop woke, how late)
    first_call: list[float] = []

    last_call: list[float] = [0.0]

    def reply(request: object) -> str:
        if not first_call:
            first_call.append(time.perf_counter())
        last_call[0] = time.perf_counter()
        return "ok"

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            late.append((now, (now - t - 0.01) * 1000))

    async def main() -> float:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        runner = Runner(Workspace(ws), pipeline, source, cache,
                        backend_factory=lambda name, config: ScriptedBackend(function=reply, max_concurrency=64,
                                                                             record=False))
        began = time.perf_counter()
        result = await runner.execute()
        took = time.perf_counter() - began
        stop.set()
        await watcher
        assert result.status == "ok" and result.totals()["calls_made"] == rows
        return took

    try:
        took = asyncio.run(main())
    finally:
        cache.close()
    # While calls stream (from the first call to the last); before, the first use of each module is imported,
    # and after, the stage's table is digested and the run recorded, with no request waiting.
    streaming = sorted(x for t, x in late if first_call[0] < t <= last_call[0] + 0.01) or [0.0]
    overall = sorted(x for _, x in late)
    return {"rows": rows, "seconds": round(took, 2), "calls_per_s": round(rows / took),
            "max_lag_ms": round(streaming[-1], 1), "p99_lag_ms": round(streaming[int(len(streaming) * 0.99)], 1),
            "over_50ms": sum(1 for x in streaming if x > 50), "max_lag_ms_with_start": round(overall[-1], 1)}


def main() -> None:
    """Under the collector settings `retort run` uses for its own process (retort.cliutil.collector_for_runs);
    the library itself changes nothing process-wide."""
    from retort.cliutil import collector_for_runs

    with collector_for_runs():
        _main()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--lag-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5, help="timed look-ups of each kind (after one warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in args.sizes:
            print("lookup", json.dumps(lookups(n, work, args.rounds)), flush=True)
        if args.lag_rows:
            print("lag", json.dumps(lag(args.lag_rows, work)), flush=True)


if __name__ == "__main__":
    main()
