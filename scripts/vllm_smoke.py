"""Check the in-process vLLM backend against a real vLLM, on a machine with vLLM and a GPU.

    python scripts/vllm_smoke.py                                   # Qwen/Qwen2.5-0.5B-Instruct
    python scripts/vllm_smoke.py --model Qwen/Qwen2.5-1.5B-Instruct --limit 8 \\
        --engine-args '{"max_model_len": 4096, "gpu_memory_utilization": 0.6}'

It makes a workspace in a temporary folder (`retort init`) and runs two pipelines
there through the CLI, each twice. Every run is its own process: it loads the
model once, and the GPU memory is freed when the process exits.

1. `example`, from `retort init`: a choice stage whose prompt ends with an
   assistant prefill, sent as `continue_final_message`.
2. The built-in `cdmt --limit N`: JSON stages decoded under the stage's JSON
   schema (`structured_outputs`).

It checks, and prints, that:
- the first run made calls and none failed;
- every `cdmt` completion that ended by itself parsed as JSON of the schema
  (completions cut at max_tokens are counted apart);
- the second run made no call, took every sample from the cache, and wrote the
  same rows.

Exit codes: 0 when every check holds, 1 when one fails, 2 when vLLM does not
import here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TARGET_VERSION = "0.33.0"  # retort/backends/vllm.py says which release it targets; kept in step here


class Check:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, message: str) -> bool:
        print(f"{'ok  ' if ok else 'FAIL'} {message}", flush=True)
        self.failed += not ok
        return ok


def vllm_version() -> str | None:
    """vLLM's version, found in a subprocess so this process never holds the GPU."""
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"vllm does not import here ({last}).\nThis smoke test needs vLLM and a GPU: "
              f'pip install "retort[vllm]" on a Linux machine with CUDA, then run it again.', file=sys.stderr)
        return None
    return probe.stdout.strip()


def run(ws: Path, db: Path, pipeline: str, model_name: str, model: dict[str, Any],
        extra: list[str]) -> dict[str, Any] | None:
    """`retort run PIPELINE --json` in a subprocess, with the named model pointed at vLLM."""
    env = {**os.environ, "VLLM_LOGGING_STREAM": os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stderr")}
    env.pop("RETORT_ALLOWED_BACKENDS", None)
    argv = [sys.executable, str(ROOT / "cli.py"), "-C", str(ws), "--db", str(db), "run", pipeline, "--json", "-q",
            "--set", f"models.{model_name}={json.dumps(model)}", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"FAIL {pipeline}: exit {done.returncode}\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def stage(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["stages"] if s["name"] == name)


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(sql).fetchall()
    finally:
        con.close()


def run_twice(check: Check, ws: Path, pipeline: str, model_name: str, model: dict[str, Any],
              extra: list[str], prompt_stages: list[str]) -> Path | None:
    db = ws / ".retort" / f"{pipeline}.duckdb"
    first = run(ws, db, pipeline, model_name, model, extra)
    if first is None:
        check(False, f"{pipeline} run 1 did not finish")
        return None
    check(first["calls_made"] > 0 and first["failures"] == 0,
          f"{pipeline} run 1: {first['calls_made']} calls made, {first['failures']} failed, "
          f"{first['parse_errors']} parse errors, {first['seconds']:.1f}s")
    second = run(ws, db, pipeline, model_name, model, extra)
    if second is None:
        check(False, f"{pipeline} run 2 did not finish")
        return None
    check(second["calls_made"] == 0 and second["cache_hits"] == second["calls_needed"] > 0,
          f"{pipeline} run 2: {second['calls_made']} calls made, {second['cache_hits']} of "
          f"{second['calls_needed']} samples from the cache")
    for name in prompt_stages:
        changed = query(db, f'SELECT count(*) FROM (SELECT _id, _raw FROM run_1."{name}" '
                            f'EXCEPT SELECT _id, _raw FROM run_2."{name}")')[0][0]
        check(changed == 0, f"{pipeline} run 2 wrote the same {name} rows as run 1 ({changed} differ)")
    return db


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face id or path (default {DEFAULT_MODEL})")
    parser.add_argument("--limit", type=int, default=4, help="input rows of cdmt (default 4)")
    parser.add_argument("--engine-args", default='{"max_model_len": 4096}',
                        help="JSON keyword arguments of vllm.LLM (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace and print where it is")
    args = parser.parse_args()

    version = vllm_version()
    if version is None:
        return 2
    engine_args = json.loads(args.engine_args)
    model = {"backend": "vllm", "model": args.model, "engine_args": engine_args}
    print(f"vLLM {version} (retort's backend targets {TARGET_VERSION}); model {args.model}; "
          f"engine_args {json.dumps(engine_args)}", flush=True)
    if "standin" in version:
        print("note: this `vllm` is the tests' stand-in, not vLLM: these checks exercise the script only",
              flush=True)

    check = Check()
    tmp = Path(tempfile.mkdtemp(prefix="retort-vllm-smoke-"))
    ws = tmp / "ws"
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "init", str(ws)], check=True, capture_output=True)

    run_twice(check, ws, "example", "default", model, [], ["classify"])

    db = run_twice(check, ws, "cdmt", "teacher", model, ["--limit", str(args.limit)], ["teach"])
    if db is not None:
        parsed, unparsed_stop, cut = query(db, """
            SELECT count(*) FILTER (WHERE t._error IS NULL),
                   count(*) FILTER (WHERE t._error IS NOT NULL AND c.finish_reason = 'stop'),
                   count(*) FILTER (WHERE c.finish_reason = 'length')
            FROM run_1.teach t JOIN calls c ON c.key = t._call""")[0]
        check(parsed > 0 and unparsed_stop == 0,
              f"cdmt structured output: {parsed} teach rows parsed as JSON of the schema, {unparsed_stop} "
              f"completions that ended by themselves did not parse, {cut} cut at max_tokens")

    if args.keep:
        print(f"workspace kept in {ws}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print("all checks passed" if not check.failed else f"{check.failed} check(s) failed", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
