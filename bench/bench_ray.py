"""The Ray executor's overhead against a local run, and the single writer's ceiling.

    python bench/bench_ray.py                          # 4,000 rows, stub server, a Ray head started here
    python bench/bench_ray.py --rows 20000 --stub-latency 0.02 --address 127.0.0.1:6379

Same job both ways: a one-stage pipeline of `rows` rows (one call each) on the `openai` backend
against bench/stub_server.py in a subprocess, `max_concurrency: 64`, a fresh DuckDB each run,
timed from Runner.execute() to its return, in this process:
  local         the ordinary run (64 worker coroutines in the driver); with the driver's CPU time
                per call (all its threads), steadier than wall time on a shared machine
  ray_connect   joining the cluster (ray.init), once per `retort run` process; the ray runs below
                find this process connected (as in a notebook), so their figures exclude it
  ray           `on="ray"`: the driver sends its misses to Ray actors in batches (retort.cluster);
                includes making the model's actors (a worker process each); with the driver's
                CPU per call (its threads include Ray's client)
  actors_up     of which: making the actors and waiting for them to be ready
  ray_data      (to choose the design) the same requests as a ray.data pipeline: from_items,
                map_batches with a class holding the retort backend (2 actors), iter_batches back
                to the driver; no cache, no parsing, no store: Ray Data's own cost only
  writer        the single DuckDB writer alone: Cache.add_call for `writer_calls` calls and the
                group commits, calls/s (what the driver's store sustains, whatever the cluster)
  parquet_merge what could replace the single writer: Parquet shards merged into a DuckDB table
                (1M rows in 8 shards, one INSERT ... SELECT from read_parquet), rows/s
  driver        an instant in-process model (scripted echo), run locally: rendering, keys,
                look-ups, parsing, rows and commits, i.e. every call's cost the driver keeps
                under --on ray: its calls/s is the ceiling of one driver

The Ray head (2 CPUs, 127.0.0.1) is started here unless --address names one; it shares the
machine's cores with the stub and the driver, so these figures are an upper bound of the
overhead, not what a cluster with cores to spare would show.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stub_server import launch

from retort.cache import Cache
from retort.runner import Runner
from retort.spec import load_pipeline
from retort.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def workspace(tmp: Path, rows: int, model: str) -> Workspace:
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    (tmp / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"question {i}"}) for i in range(rows)))
    (tmp / "pipelines" / "p.yaml").write_text(f"input: {{path: data/rows.jsonl}}\nmodels:\n  default: {model}\n"
                                              "stages:\n  - {name: ask, template: 'Q: {{ text }}'}\n")
    return Workspace(tmp)


def timed_run(rows: int, model: str, on: str = "local", address: str | None = None) -> tuple[float, float]:
    """Wall seconds of the run, and the driver's CPU microseconds per call (every thread of this process:
    the engine, the DuckDB writer, and under Ray its client threads; not the stub, not the Ray workers)."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace(Path(tmp), rows, model)
        spec, source = load_pipeline(ws.pipeline("p"))
        cache = Cache(ws.db_path)
        try:
            runner = Runner(ws, spec, source, cache, on=on, ray_address=address)
            begun, cpu = time.perf_counter(), time.process_time()
            result = asyncio.run(runner.execute())
            seconds, cpu = time.perf_counter() - begun, time.process_time() - cpu
        finally:
            cache.close()
    stats = result.stages[0]
    assert (stats.calls_made, stats.failures) == (rows, 0), stats
    return seconds, cpu * 1e6 / rows


def connect(address: str) -> float:
    """Seconds to join the cluster (ray.init), paid once per `retort run --on ray` process."""
    import ray

    begun = time.perf_counter()
    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return time.perf_counter() - begun


def actors_up(address: str, url: str) -> float:
    """Seconds to make one model's actors and have them ready (as a run does on its first miss)."""
    from retort.cluster import RayCluster, RayOptions

    async def go() -> float:
        cluster = RayCluster(RayOptions(address=address))
        begun = time.perf_counter()
        await cluster.pool("default", {"backend": "openai", "model": "stub", "base_url": url, "name": "default"},
                           "openai:stub", 64, None, 5)
        seconds = time.perf_counter() - begun
        cluster.close()
        return seconds
    return asyncio.run(go())


def ray_data(rows: int, url: str, address: str) -> float:
    """The same calls through ray.data: a Dataset of requests, map_batches on 2 actors, iterated back."""
    import ray

    class Caller:
        def __init__(self) -> None:
            from retort.backends.openai import OpenAIBackend
            self.loop = asyncio.new_event_loop()  # the backend's connections live on one loop
            self.backend = OpenAIBackend("stub", base_url=url, max_concurrency=64)

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            from retort.backends.base import Request

            async def go() -> list[str]:
                done = await asyncio.gather(*(self.backend.complete(Request([{"role": "user", "content": p}]))
                                              for p in batch["prompt"]))
                return [c.texts[0] for c in done]
            return {"text": self.loop.run_until_complete(go())}

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    begun = time.perf_counter()
    ds = ray.data.from_items([{"prompt": f"Q: question {i}"} for i in range(rows)])
    out = ds.map_batches(Caller, batch_size=64, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    count = sum(len(b["text"]) for b in out.iter_batches(batch_size=256))
    assert count == rows
    return time.perf_counter() - begun


def writer(calls: int) -> float:
    """Calls/s of the store alone: add_call and the group commits, on one DuckDB file."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "w.duckdb")
        try:
            request = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "Q: question"}]}).encode()
            begun = time.perf_counter()
            for i in range(calls):
                key = hashlib.sha256(b"%d" % i).hexdigest()
                cache.add_call(key, "openai:stub", request, 0, 0, f"a reply of some words {i}", "stop", 12, 24,
                               3.0, 1, "ask")
                if i % 4096 == 4095:
                    cache.maybe_flush()
            cache.flush()
            seconds = time.perf_counter() - begun
        finally:
            cache.close()
    return calls / seconds


def merge(calls: int) -> float:
    """Rows/s of what would replace the single writer past its ceiling: workers write `calls` rows to
    Parquet shards (here, 8 shards written in this process), and one INSERT ... SELECT FROM
    read_parquet merges them into a store's `calls` table, skipping keys it already holds."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        per = calls // 8
        for n in range(8):
            ids = range(n * per, (n + 1) * per)
            pq.write_table(pa.table({
                "key": [hashlib.sha256(b"%d" % i).hexdigest() for i in ids],
                "model": ["openai:stub"] * per, "text": [f"a reply of some words {i}" for i in ids],
                "prompt_tokens": [12] * per, "completion_tokens": [24] * per}), shards / f"{n}.parquet")
        con = duckdb.connect(str(Path(tmp) / "store.duckdb"))
        con.execute("SET enable_progress_bar = false")
        con.execute("CREATE TABLE calls (key VARCHAR, model VARCHAR, text VARCHAR, prompt_tokens BIGINT, "
                    "completion_tokens BIGINT)")
        begun = time.perf_counter()
        con.execute(f"INSERT INTO calls SELECT * FROM read_parquet('{shards}/*.parquet') s "
                    "WHERE NOT EXISTS (SELECT 1 FROM calls c WHERE c.key = s.key)")
        seconds = time.perf_counter() - begun
        assert con.execute("SELECT count(*) FROM calls").fetchone() == (per * 8,)
        con.close()
    return per * 8 / seconds


def start_head() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}  # loopback: see main()
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(180):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(2)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("ray start did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for local and ray")
    parser.add_argument("--address", help="a running Ray cluster (default: start a 2-CPU head here)")
    parser.add_argument("--stub-latency", type=float, default=0.0, help="seconds the stub holds each answer")
    parser.add_argument("--writer-calls", type=int, default=200_000)
    parser.add_argument("--skip-data", action="store_true", help="leave out the ray.data comparison")
    args = parser.parse_args()
    if not args.address:  # Ray binds its own head and this driver to 127.0.0.1 only (read when ray is imported)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    flags = ["--slow-rate", "1", "--slow-seconds", str(args.stub_latency)] if args.stub_latency else []
    stub, url = launch(*flags)
    head, address = (None, args.address) if args.address else start_head()
    model = f"{{backend: openai, model: stub, base_url: '{url}', max_concurrency: 64}}"
    out: dict[str, Any] = {"rows": args.rows, "stub_latency": args.stub_latency, "cores": os.cpu_count()}
    try:
        local = [timed_run(args.rows, model) for _ in range(args.repeat)]
        out["ray_connect_s"] = connect(address)  # once: the runs below find Ray connected, as a notebook would
        remote = [timed_run(args.rows, model, "ray", address) for _ in range(args.repeat)]
        out["local_s"], out["local_cpu_us_per_call"] = min(local)
        out["ray_s"], out["ray_driver_cpu_us_per_call"] = min(remote)
        out["ratio"] = out["ray_s"] / out["local_s"]
        out["actors_up_s"] = actors_up(address, url)
        out["ray_without_actors_up_s"] = out["ray_s"] - out["actors_up_s"]
        out["ratio_without_actors_up"] = out["ray_without_actors_up_s"] / out["local_s"]
        if not args.skip_data:
            out["ray_data_s"] = ray_data(args.rows, url, address)
        out["writer_calls_per_s"] = writer(args.writer_calls)
        out["parquet_merge_rows_per_s"] = merge(1_000_000)
        driver_rows = max(args.rows, 20_000)
        seconds, cpu = timed_run(driver_rows, "{backend: scripted, function: 'retort.backends.scripted:echo'}")
        out["driver_calls_per_s"], out["driver_cpu_us_per_call"] = driver_rows / seconds, cpu
    finally:
        stub.kill()
        if head is not None:
            import ray
            if ray.is_initialized():
                ray.shutdown()
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
    for key, value in out.items():
        print(f"{key:26} {value:,.3f}" if isinstance(value, float) else f"{key:26} {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
