"""Fault injection: a 3-stage pipeline against a stub that fails, stalls and drops; nothing may be lost.

    python bench/bench_faults.py                         # 5,000 rows, 3 prompt stages
    python bench/bench_faults.py --rows 200 --retries 1  # quick

1. The stub (bench/stub_server.py, in a subprocess) answers --fail-rate of the requests with
   429 (Retry-After: 1) or 500, holds --slow-rate of them for --slow-seconds, past the model's
   `timeout`, and drops --drop-rate of the connections. The pipeline (s1 from the input, s2
   from s1, s3 from s2, each a Jinja template and `parse: text`) runs through the CLI, as a
   user would: `cli.py run --max-failures <large> --retries R --json`.
   Checked, per stage: every row the stage should see (its input rows without an error) is
   either done (exactly one output row, linked by `_parent`) or recorded in `failures` with
   its error, and not both; no output row twice (`_id`s distinct); every failed call's key is
   absent from `calls`.
2. The same pipeline again, on a stub without faults (the base URL is not part of the cache
   key, so the cache carries over). Checked: the rerun calls exactly what had not succeeded,
   counted two ways: from the failures (a row that failed in s1 now needs s1, s2 and s3:
   3*F1 + 2*F2 + F3) and by `cli.py plan` just before the rerun; every stage then has all rows,
   and there is no new failure.

Prints each check with PASS or FAIL, and the counts; exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from stub_server import launch  # noqa: E402  (after the path set-up)

ROOT = BENCH.parent
STAGES = ("s1", "s2", "s3")

PIPELINE = """\
input: {{path: data/rows.jsonl}}
models:
  default:
    backend: openai
    model: stub
    base_url: {url}
    transport: fast
    max_concurrency: {concurrency}
    timeout: {timeout}
stages:
  - {{name: s1, template: "What is {{{{ i }}}} plus {{{{ i }}}}?", parse: text}}
  - {{name: s2, from: s1, template: "Check this: {{{{ s1 }}}}", parse: text}}
  - {{name: s3, from: s2, template: "Summarise: {{{{ s2 }}}}", parse: text}}
"""


def start_stub(args: argparse.Namespace, faults: bool) -> tuple[subprocess.Popen[str], str]:
    flags = ["--seed", str(args.seed)]
    if faults:
        flags += ["--fail-rate", str(args.fail_rate), "--slow-rate", str(args.slow_rate),
                  "--slow-seconds", str(args.slow_seconds), "--drop-rate", str(args.drop_rate)]
    return launch(*flags)


def write_workspace(root: Path, args: argparse.Namespace, url: str) -> None:
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "pipelines" / "faults.yaml").write_text(
        PIPELINE.format(url=url, concurrency=args.concurrency, timeout=args.timeout))
    with (root / "data" / "rows.jsonl").open("w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"i": i}) + "\n")


def cli(root: Path, *argv: str, timeout: float) -> tuple[int, dict[str, Any], float]:
    """Run `cli.py -C root ARGV --json`; return the exit code, the JSON result and the wall time."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    begun = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "-C", str(root), *argv, "--json"],
                          capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - begun
    start = proc.stdout.find("{")
    if start < 0:
        raise SystemExit(f"cli.py {' '.join(argv)} printed no JSON (exit code {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.returncode, json.loads(proc.stdout[start:]), seconds


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}", flush=True)


def audit(con: duckdb.DuckDBPyConnection, run_id: int, rows: int, check: Checks) -> dict[str, int]:
    """Per stage: expected = done + failed, disjoint, nothing twice. Returns the failed rows per stage."""
    failed_per_stage: dict[str, int] = {}
    expected = {str(i) for i in range(rows)}  # the input's _ids
    for stage in STAGES:
        table = f'run_{run_id}."{stage}"'
        out = con.execute(f"SELECT _id, _parent, _error FROM {table}").fetchall()
        ids = [r[0] for r in out]
        done = {r[1] for r in out}
        failures = con.execute("SELECT row_id, call_key, error FROM failures WHERE run_id = ? AND stage = ?",
                               [run_id, stage]).fetchall()
        failed = {r[0] for r in failures}
        lost = expected - done - failed
        stray = (done | failed) - expected
        both = done & failed
        check(len(ids) == len(set(ids)) and len(done) == len(out),
              f"{stage}: {len(out)} output rows, {len(set(ids))} distinct _ids, {len(done)} distinct parents "
              "(no row twice)")
        check(not lost and not stray and not both,
              f"{stage}: {len(expected)} rows in = {len(done)} done + {len(failed)} in failures "
              f"(lost {len(lost)}, unexpected {len(stray)}, both done and failed {len(both)})")
        check(len(failures) == len(failed) and all(r[2] for r in failures),
              f"{stage}: {len(failures)} failure records, one per failed row, each with its error")
        keys = [r[1] for r in failures]
        cached = con.execute("SELECT count(*) FROM calls WHERE key IN (SELECT unnest(?::VARCHAR[]))",
                             [keys]).fetchall()[0][0] if keys else 0
        check(cached == 0, f"{stage}: none of the {len(keys)} failed call keys is in `calls` ({cached})")
        failed_per_stage[stage] = len(failed)
        # The next stage reads this one's rows without an error (parse: text never fails to parse).
        expected = {r[0] for r in out if r[2] is None}
    return failed_per_stage


def error_kinds(con: duckdb.DuckDBPyConnection, run_id: int) -> list[tuple[Any, ...]]:
    return con.execute("SELECT stage, coalesce(CAST(status AS VARCHAR), 'no status') AS status, "
                       "regexp_replace(error, '[0-9]+(\\.[0-9]+)?', 'N', 'g') AS kind, count(*) FROM failures "
                       "WHERE run_id = ? GROUP BY ALL ORDER BY 1, 4 DESC", [run_id]).fetchall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--fail-rate", type=float, default=0.2, help="429 or 500, half and half")
    ap.add_argument("--slow-rate", type=float, default=0.02)
    ap.add_argument("--slow-seconds", type=float, default=3.0, help="longer than --timeout")
    ap.add_argument("--drop-rate", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=2.0, help="the model's `timeout`, seconds")
    ap.add_argument("--retries", type=int, default=1,
                    help="cli.py --retries: few, so that some rows do end in `failures`")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="build the workspace here and keep it")
    args = ap.parse_args()

    check = Checks()
    with tempfile.TemporaryDirectory(prefix="retort-faults-") as tmp:
        root = args.keep or Path(tmp)
        limit = 3600.0
        proc, url = start_stub(args, faults=True)
        try:
            write_workspace(root, args, url)
            print(f"{args.rows} rows x 3 prompt stages; stub {url}: fail {args.fail_rate:.0%} (429/500), "
                  f"slow {args.slow_rate:.0%} for {args.slow_seconds:g}s (timeout {args.timeout:g}s), "
                  f"drop {args.drop_rate:.0%}; --retries {args.retries}", flush=True)
            code, first, seconds = cli(root, "run", "faults", "-q", "--retries", str(args.retries),
                                       "--max-failures", str(10 * args.rows), timeout=limit)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        print(f"run 1 (faults): exit code {code}, {seconds:.1f}s, calls made {first['calls_made']}, "
              f"failures {first['failures']}", flush=True)
        for s in first["stages"]:
            print(f"    {s['name']}: rows in {s['rows_in']}, out {s['rows_out']}, calls made {s['calls_made']}, "
                  f"failures {s['failures']}")
        check(code == 0, "run 1 exits 0 (failures stay under --max-failures)")

        con = duckdb.connect(str(root / ".retort" / "retort.duckdb"), read_only=True)
        try:
            failed = audit(con, first["run_id"], args.rows, check)
            print("  failures by stage, status and kind of error:")
            for stage, status, kind, count in error_kinds(con, first["run_id"]):
                print(f"    {stage}  {status:>9}  {count:>5}  {kind[:90]}")
            calls_before = con.execute("SELECT count(*) FROM calls").fetchall()[0][0]
        finally:
            con.close()
        check(first["calls_made"] == calls_before,
              f"run 1: calls made ({first['calls_made']}) = rows in `calls` ({calls_before})")

        # The rerun on a healthy stub calls what had not succeeded, and only that.
        expected = 3 * failed["s1"] + 2 * failed["s2"] + failed["s3"]
        proc, url = start_stub(args, faults=False)
        try:
            write_workspace(root, args, url)  # same pipeline, the healthy stub's URL
            _, plan, _ = cli(root, "plan", "faults", timeout=limit)
            planned = sum(s["calls_needed"] - s["cache_hits"] for s in plan["stages"])
            code, again, seconds = cli(root, "run", "faults", "-q", "--retries", str(args.retries),
                                       "--max-failures", "0", timeout=limit)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        print(f"run 2 (no faults): exit code {code}, {seconds:.1f}s, calls made {again['calls_made']}, cache hits "
              f"{again['cache_hits']}, failures {again['failures']}; expected calls 3*{failed['s1']} + "
              f"2*{failed['s2']} + {failed['s3']} = {expected}, plan said {planned}", flush=True)
        check(code == 0 and again["failures"] == 0, "run 2 exits 0 with no failure")
        check(again["calls_made"] == expected == planned,
              f"run 2 calls exactly what had not succeeded: made {again['calls_made']}, from the failures "
              f"{expected}, from `plan` {planned}")
        check(all(s["rows_out"] == args.rows for s in again["stages"]),
              f"run 2: every stage has all {args.rows} rows ({[s['rows_out'] for s in again['stages']]})")
        con = duckdb.connect(str(root / ".retort" / "retort.duckdb"), read_only=True)
        try:
            for stage in STAGES:
                n, distinct = con.execute(f'SELECT count(*), count(DISTINCT _parent) FROM run_{again["run_id"]}.'
                                          f'"{stage}"').fetchall()[0]
                check(n == distinct == args.rows, f"run 2 {stage}: {n} rows, {distinct} distinct parents")
            calls_after = con.execute("SELECT count(*), count(DISTINCT key) FROM calls").fetchall()[0]
        finally:
            con.close()
        check(calls_after[0] == calls_after[1] == calls_before + again["calls_made"],
              f"`calls` holds each key once: {calls_after[0]} rows, {calls_after[1]} distinct keys "
              f"= {calls_before} + {again['calls_made']}")
    print("PASS" if not check.failed else f"FAIL ({check.failed} checks failed)")
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
