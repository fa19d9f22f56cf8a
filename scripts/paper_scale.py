"""Run retort's built-in methods at the scale of their papers against any OpenAI-compatible server.

    python scripts/paper_scale.py --model http://gpu-host:8000/v1#Qwen/Qwen2.5-7B-Instruct \\
        --input sse_cot=../shared/datasets/sst2_test.jsonl --input bridge=../shared/datasets/bridge/test.json \\
        sse_cot bridge
    python scripts/paper_scale.py --model http://127.0.0.1:8000/v1 --plan-only      # all six, cost only
    python scripts/paper_scale.py --model URL --pilot 3 --plan-only bridge          # plan, then 3 rows for real
    python scripts/paper_scale.py --model URL --scale tiny --limit 6 cdmt           # a smoke test

For each method it first asks `retort plan` (nothing is called) and prints the expected
cost: the calls still to make (after cache hits), the prompt tokens they send (retort's
estimate) and the completion tokens they may return at most (calls x the stage's
max_tokens). A plan cannot see past answers it has not got: a stage fed by parsed answers
of an uncached stage (LbT's student exams, Bridge's judge, LbT M3's whole loop) counts 0
there, and the script names those stages. `--pilot N` then runs the first N rows for real
(their calls are cached, so the full run reuses them) and scales what they cost to the
whole input: calls, prompt and completion tokens as the server counted them.

Then, unless --plan-only, it runs the methods one after another with `retort run` and
prints what each spent. Every call is cached in the workspace's DuckDB file, so an
interrupted run resumes where it stopped.

`--model URL` points every model of every pipeline (teacher, students, judge) at the
server, in retort's target form `http://host:port/v1[#served-name]`; `--role NAME=URL`
points one named model elsewhere (e.g. a stronger judge). `--input`, `--set` and `--map`
take an optional `METHOD=` / `METHOD:` prefix to apply to one method only.

The paper-scale settings of each method, and where each number comes from, are in
PAPER below and in docs/methods/paper_scale.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "retort").is_dir():  # run from a checkout: its retort, not another installed one
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Method:
    pipeline: str
    paper: tuple[str, ...]  # --set overrides that bring the pipeline to its paper's scale
    tiny: tuple[str, ...] = ()  # the same knobs at their smallest, for a smoke test
    source: str = ""  # where the paper-scale numbers come from
    extra: tuple[str, ...] = field(default=())  # pipeline args always given
    per_row: bool = True  # its cost grows with the input rows, so a pilot's cost scales linearly
    hint: str = ""  # the calls a plan cannot count yet, as a formula


_LBT_HINT = ("student: teach calls x exam questions x repetitions x students (3 x 3 x 1 in the reference); "
             "exam sizes depend on which problems are in the input, so a pilot does not scale")

# The input set is the other half of the scale: each paper ran on a whole dataset (no --limit).
PAPER: dict[str, Method] = {
    "sse_cot": Method("sse_cot", (), source="every row of the test set given with --input, as the SSE-CoT paper "
                                             "evaluates on whole test sets"),
    "cdmt": Method("cdmt", (), source="one teacher answer per training example (distilling-step-by-step: "
                                       "every row of the training split)",
                   hint="rationalize: one call per example the teacher got wrong, only with params.rationalize"),
    "lbt_m1": Method("lbt_m1", ("stages.teach.samples=256", "stages.student.samples=3"),
                     ("stages.teach.samples=2", "stages.student.samples=1"),
                     source="imagination-research/lbt: 256 rationales per teaching problem (math200_r256), "
                            "3 repetitions per exam question (examples/config/math/*_exam.yaml)",
                     per_row=False, hint=_LBT_HINT),
    "lbt_m2": Method("lbt_m2", ("stages.teach.samples=256", "stages.student.samples=3"),
                     ("stages.teach.samples=2", "stages.student.samples=1"),
                     source="M1's scoring at M1's scale (the reference's M2 data size is not in its repository)",
                     per_row=False, hint=_LBT_HINT),
    "lbt_m3": Method("lbt_m3", ("params.n_examples=8", "params.rounds=5", "params.beam=4", "params.minibatch=64",
                                "params.candidates=4", "params.max_heldout=3000"),
                     ("params.n_examples=2", "params.rounds=1", "params.beam=1", "params.minibatch=2",
                      "params.candidates=1", "params.max_heldout=2"),
                     source="lbt/patch/lmops-lbtm3.patch defaults: n_icl 8, rounds 5, beam_size 4, "
                            "minibatch_size 64, n_gradients 4, n_test_exs 3000", per_row=False,
                     hint="the loop's calls depend on each round's answers; docs/methods/paper_scale.md bounds them"),
    "bridge": Method("bridge", (), source="rosewang2008/bridge: the 210 test conversations, all four conditions",
                     hint="judge: 2 orders x (1 + len(against_reference)) per item whose replies parsed, 6 by default"),
}


def _cli() -> list[str]:
    cli = ROOT / "cli.py"
    return [sys.executable, str(cli)] if cli.is_file() else ["retort"]


def _scoped(values: list[str], method: str, sep: str) -> list[str]:
    """The values meant for `method`: unprefixed ones, and those written `method<sep>value`."""
    out = []
    for value in values:
        head, found, rest = value.partition(sep)
        if found and head in PAPER:
            if head == method:
                out.append(rest)
        else:
            out.append(value)
    return out


def pipeline_args(method: str, args: argparse.Namespace) -> list[str]:
    """The `retort plan|run` arguments for one method, at the chosen scale."""
    spec = PAPER[method]
    out = [spec.pipeline, *spec.extra]
    inputs = _scoped(args.input or [], method, "=")
    if inputs:
        out += ["--input", inputs[-1]]
    if args.limit is not None:
        out += ["--limit", str(args.limit)]
    else:  # a built-in's own input.limit keeps its demo small on the embedded model: lift it
        out += ["--set", "input.limit=null"]
    for value in (spec.tiny if args.scale == "tiny" else spec.paper):
        out += ["--set", value]
    for value in _scoped(args.set or [], method, ":"):
        out += ["--set", value]
    for value in _scoped(args.map or [], method, ":"):
        out += ["--map", value]
    out += ["--model", f"*={args.model}"]
    for role in args.role or []:
        out += ["--model", role]
    return out


def _retort(command: str, argv: list[str], args: argparse.Namespace) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run([*_cli(), "-C", str(args.workspace), command, *argv, "--json",
                           *(["-q", "--max-failures", str(args.max_failures)] if command == "run" else [])],
                          capture_output=True, text=True)
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stderr.strip()
    except json.JSONDecodeError:
        return proc.returncode, None, (proc.stderr or proc.stdout).strip()


def completion_bound(method: str, argv: list[str], args: argparse.Namespace, plan: dict[str, Any]) -> int:
    """Completion tokens the calls to make may return at most: calls x max_tokens, per stage.

    A Python stage that prompts through ctx (lbt_m3) takes its sampling params from the
    pipeline's params, so it is bounded by the largest max_tokens found there."""
    from retort.spec import load_pipeline
    from retort.workspace import Workspace

    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    pipeline, _ = load_pipeline(Workspace(args.workspace).pipeline(PAPER[method].pipeline), sets)
    per_stage: dict[str, int] = {}
    for stage in pipeline.stages:
        params = getattr(stage, "params", None)
        if params is not None and getattr(params, "max_tokens", None):
            per_stage[stage.name] = int(params.max_tokens)
    fallback = max(_max_tokens_in(pipeline.params), default=0)
    return sum((s["calls_needed"] - s["cache_hits"]) * per_stage.get(s["name"], fallback) for s in plan["stages"])


def _max_tokens_in(value: Any) -> list[int]:
    if isinstance(value, dict):
        found = [int(v) for k, v in value.items() if k == "max_tokens" and isinstance(v, int)]
        return found + [t for v in value.values() for t in _max_tokens_in(v)]
    if isinstance(value, list):
        return [t for v in value for t in _max_tokens_in(v)]
    return []


def _row(cells: list[Any]) -> str:
    return f"{cells[0]:<8} " + " ".join(f"{c:>14,}" if isinstance(c, int) else f"{c:>14}" for c in cells[1:])


def blind_stages(plan: dict[str, Any]) -> list[str]:
    """Stages the plan could not count: prompt stages left with no row because an earlier stage's
    answers are not cached yet, and Python stages whose calls a plan cannot run at all."""
    out, uncached = [], False
    for s in plan["stages"]:
        if s["calls_needed"] == 0 and (s["name"] in _PROMPTING_PYTHON
                                       or (s["kind"] == "prompt" and uncached and s["rows_out"] == 0)):
            out.append(s["name"])
        uncached = uncached or s["calls_needed"] > s["cache_hits"]
    return out


_PROMPTING_PYTHON = {"refine"}  # lbt_m3's loop, which prompts through ctx as it goes


def _visible_calls(plan: dict[str, Any]) -> int:
    return sum(s["calls_needed"] for s in plan["stages"])


def pilot(method: str, argv_m: list[str], full: dict[str, Any], args: argparse.Namespace) -> list[int] | None:
    """Run the first `args.pilot` rows for real and scale their cost to the whole input:
    [calls, prompt tokens, completion tokens], or None when the method's cost is not per row."""
    if not PAPER[method].per_row:
        return None
    small = _with_limit(argv_m, args.pilot)
    _, small_plan, err = _retort("plan", small, args)
    if small_plan is None or not _visible_calls(small_plan):
        return None
    # --no-reuse: every stage is rebuilt (from the cache where it can), so every call is counted
    code, result, err = _retort("run", [*small, "--no-reuse"], args)
    if result is None:
        raise SystemExit(f"{method}: the pilot run failed (exit {code}): {err}")
    calls = result["calls_made"] + result["cache_hits"]
    if not calls:
        return None
    scale = _visible_calls(full) / _visible_calls(small_plan)  # rows in the whole input / rows in the pilot
    expected = round(calls * scale)
    # tokens as the server counted them, cached calls included
    return [expected, round(expected * result["prompt_tokens"] / calls),
            round(expected * result["completion_tokens"] / calls)]


def _with_limit(argv_m: list[str], n: int) -> list[str]:
    out = list(argv_m)
    if "--limit" in out:
        i = out.index("--limit")
        out[i + 1] = str(min(n, int(out[i + 1])))
    else:
        out[1:1] = ["--limit", str(n)]  # --limit wins over the input.limit=null beside it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("methods", nargs="*", metavar="METHOD", help=f"any of {', '.join(PAPER)} (default: all)")
    parser.add_argument("--model", required=True, help="the server, e.g. http://host:8000/v1#served-name")
    parser.add_argument("--role", action="append", metavar="NAME=URL", help="one named model elsewhere")
    parser.add_argument("--input", action="append", metavar="[METHOD=]PATH", help="the dataset to run on")
    parser.add_argument("--set", action="append", metavar="[METHOD:]KEY=VALUE", help="passed to retort")
    parser.add_argument("--map", action="append", metavar="[METHOD:]COLUMN=EXPR", help="passed to retort")
    parser.add_argument("--limit", type=int, help="only the first N input rows (default: all, the paper's scale)")
    parser.add_argument("--scale", choices=["paper", "tiny"], default="paper",
                        help="paper: the papers' sampling settings; tiny: the smallest, for a smoke test")
    parser.add_argument("--pilot", type=int, default=0, metavar="N",
                        help="run N rows for real first and scale their cost to the whole input")
    parser.add_argument("--workspace", type=Path, default=Path("."), help="retort workspace (default: .)")
    parser.add_argument("--plan-only", action="store_true", help="print the expected cost and stop")
    parser.add_argument("--max-failures", type=int, default=10**9,
                        help="a run's failed rows before retort exits non-zero (default: never)")
    args = parser.parse_args(argv)
    methods = args.methods or list(PAPER)
    unknown = [m for m in methods if m not in PAPER]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(PAPER)}")

    print(f"expected cost at {args.scale} scale (retort plan: nothing called yet)")
    print(_row(["method", "calls", "cached", "to call", "prompt tokens", "max completion"]))
    plans: dict[str, tuple[list[str], dict[str, Any]]] = {}
    totals = [0, 0, 0, 0, 0]
    for method in methods:
        argv_m = pipeline_args(method, args)
        code, plan, err = _retort("plan", argv_m, args)
        if plan is None:
            print(f"{method}: retort plan failed: {err}", file=sys.stderr)
            return 2
        calls = sum(s["calls_needed"] for s in plan["stages"])
        cached = sum(s["cache_hits"] for s in plan["stages"])
        prompt_tokens = sum(s["est_prompt_tokens"] for s in plan["stages"])
        bound = completion_bound(method, argv_m, args, plan)
        cells = [calls, cached, calls - cached, prompt_tokens, bound]
        totals = [t + c for t, c in zip(totals, cells, strict=True)]
        print(_row([method, *cells]))
        plans[method] = (argv_m, plan)
    print(_row(["total", *totals]))
    for method in methods:
        blind = blind_stages(plans[method][1])
        print(f"  {method}: {PAPER[method].source}")
        if blind:
            print(f"    not counted until earlier answers exist: {', '.join(blind)}. {PAPER[method].hint}")

    if args.pilot > 0:
        print(f"expected cost from a pilot of {args.pilot} row(s), scaled to the whole input")
        print(_row(["method", "calls", "prompt tokens", "completion"]))
        for method in methods:
            scaled = pilot(method, *plans[method], args)
            print(_row([method, *scaled]) if scaled else f"{method:<8} not scaled: its cost is not linear in the rows")
    if args.plan_only:
        return 0

    failed = 0
    for method in methods:
        argv_m = plans[method][0]
        print(f"running {method}: retort run {' '.join(argv_m)}", flush=True)
        code, result, err = _retort("run", argv_m, args)
        if result is None:
            print(f"  {method}: retort run failed (exit {code}): {err}", file=sys.stderr)
            failed += 1
            continue
        metrics = {k: v for s in result["stages"] for k, v in (s.get("metrics") or {}).items()}
        print(f"  {method}: {result['status']}, run {result['run_id']}, {result['calls_made']:,} calls made, "
              f"{result['cache_hits']:,} cached, {result['prompt_tokens']:,} prompt + "
              f"{result['completion_tokens']:,} completion tokens, {result['failures']:,} failures, "
              f"{result['seconds']:.1f} s")
        if metrics:
            print("    " + ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:8]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
