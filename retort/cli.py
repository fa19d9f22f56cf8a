"""The command line: `retort run|validate|plan|list|show|view|export|cache|schema|init`.

Errors become one line and an exit code here, and only here; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

from retort import __version__
from retort.cliutil import collector_for_runs, name_values
from retort.errors import NotFoundError, RetortError, UserError

EXIT_FAILURES = 1
EXIT_WARNINGS = 5  # --strict (or `strict: true`): the run finished and is recorded, but its summary warned


def _workspace(args: argparse.Namespace) -> Any:
    from retort.workspace import Workspace

    return Workspace(args.workspace)


def _db_path(args: argparse.Namespace) -> Path:
    return Path(args.db) if args.db else _workspace(args).db_path


def _runner(args: argparse.Namespace, mode: str, cache: Any, progress: Any = None) -> Any:
    from retort import backends
    from retort.runner import Runner
    from retort.spec import load_pipeline

    ws = _workspace(args)
    pipeline, source = load_pipeline(ws.pipeline(args.pipeline), args.set or [])
    targets = {name: backends.parse_target(t) for name, t in name_values(args.model, "--model").items()}
    runner = Runner(ws, pipeline, source, cache, mode=mode, input_path=args.input,
                    columns=name_values(args.map, "--map"), limit=args.limit, sample=args.sample, seed=args.seed,
                    model_targets=targets, progress=progress, max_retries=args.retries, argv=shlex.join(sys.argv[1:]),
                    reuse=not getattr(args, "no_reuse", False), max_failures=getattr(args, "max_failures", 0),
                    on=getattr(args, "on", "local"), ray_address=getattr(args, "ray_address", None))
    runner.models.check_targets()
    return runner


def cmd_run(args: argparse.Namespace) -> int:
    with collector_for_runs():
        return _cmd_run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from retort.cache import Cache
    from retort.progress import RichProgress, print_summary, run_warnings

    cache = Cache(_db_path(args))
    runner = None
    try:
        with RichProgress(enabled=not args.quiet) as progress:
            runner = _runner(args, "run", cache, progress)
            result = _until_signalled(runner.execute())
    except (KeyboardInterrupt, Terminated, asyncio.CancelledError) as exc:
        run = runner.run_id if runner is not None else None
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        kept = f"run {run} is kept as interrupted; " if run else ""
        print(f"{what}: completed calls are saved; {kept}the latest complete tables are unchanged; "
              "run again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        cache.close()
    warnings = run_warnings(result, runner.spec)
    if args.json:
        print(json.dumps({**result.to_dict(), "warnings": warnings}, indent=2))
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    else:
        print_summary(result, warnings)
    failures = result.failures
    if failures > args.max_failures:
        print(f"{failures} failure(s), more than --max-failures {args.max_failures}: run {result.run_id} is kept "
              f"as failed and the latest complete tables are unchanged; `retort show failures` lists them, and "
              f"running again retries only them", file=sys.stderr)
        return EXIT_FAILURES
    if warnings and (args.strict or runner.spec.strict):
        why = "--strict" if args.strict else f"strict: true in {runner.src.file}"
        print(f"{len(warnings)} warning(s) and {why}: exit {EXIT_WARNINGS} (run {result.run_id} is recorded)",
              file=sys.stderr)
        return EXIT_WARNINGS
    return 0


class Terminated(Exception):
    """SIGTERM arrived: handled like Ctrl-C (the run flushes, records itself, and stops)."""


def _until_signalled(coro: Any) -> Any:
    """Run `coro`; SIGTERM cancels it like Ctrl-C does, so its `finally` blocks save what is done."""
    import signal

    got: list[int] = []

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def stop() -> None:
            got.append(signal.SIGTERM)
            assert task is not None
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            return await coro
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if got:
            raise Terminated() from None
        raise


def cmd_plan(args: argparse.Namespace) -> int:
    from retort.cache import Cache
    from retort.progress import print_plan

    cache = Cache(_db_path(args))
    try:
        result = asyncio.run(_runner(args, "plan", cache).execute())
    finally:
        cache.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from retort.cache import Cache

    cache = Cache(":memory:")
    try:
        runner = _runner(args, "validate", cache)
        result = asyncio.run(runner.execute())
    finally:
        cache.close()
    stages = ", ".join(f"{s.name} ({s.kind})" for s in result.stages)
    print(f"ok: {runner.src.file}: {len(result.stages)} stages valid: {stages}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from retort.spec import load_pipeline

    ws = _workspace(args)
    table = Table(title="pipelines", title_justify="left")
    for col in ("name", "stages", "description", "path"):  # whole words: a name or path is never cut
        table.add_column(col, overflow="ellipsis" if col == "description" else "fold",
                         no_wrap=col in ("name", "stages"), min_width=len(col))
    for name, path in ws.pipelines().items():
        try:
            spec, _ = load_pipeline(path)
            description = " ".join((spec.description or "").split()).split(": ")[0].split(". ")[0]
            table.add_row(name, str(len(spec.stages)), textwrap.shorten(description, 90, placeholder=" …"),
                          _short(path))
        except RetortError as exc:
            table.add_row(name, "?", f"[red]invalid: {exc}[/red]", _short(path))
    console = _console()
    console.print(table)
    db = _db_path(args)
    if db.exists():
        from retort.cache import Cache, namespace_schema

        cache = Cache(db, read_only=True)
        try:
            runs = cache.runs(limit=10)
            latest = cache.latest_complete_runs()
            stage_names = {ns: [name for name, kind in cache.tables(namespace_schema(ns)).items() if kind == "view"]
                           for ns in latest}
        finally:
            cache.close()
        runs_table = Table(title=f"recent runs in {_short(db)}", title_justify="left")
        for col in ("run", "pipeline", "status", "started", "seconds", "calls made", "cache hits"):
            runs_table.add_column(col, overflow="fold")
        for r in runs:
            status = None if r.status is None else r.status + (" (pinned)" if r.pinned else "")
            cells = (r.run_id, r.pipeline, status, r.started_at, _tenths(r.seconds), r.stats.get("calls_made"),
                     r.stats.get("cache_hits"))
            runs_table.add_row(*(str(x) if x is not None else "" for x in cells))
        console.print(runs_table)
        if not latest:
            console.print("stage tables: none (no complete run yet)")
        for ns, run_id in latest.items():
            console.print(f"{ns} (latest complete: run {run_id}): {', '.join(stage_names[ns]) or 'no tables'}")
    return 0


def _tenths(seconds: float | None) -> float | None:
    """Seconds to one decimal as DuckDB's round does it: the exact value, halves away from zero."""
    import decimal

    if seconds is None:
        return None
    return float(decimal.Decimal(seconds).quantize(decimal.Decimal("0.1"), decimal.ROUND_HALF_UP))


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _open_read(args: argparse.Namespace) -> Any:
    from retort.cache import Cache

    return Cache(_db_path(args), read_only=True)


def _relation(cache: Any, stage: str, run: int | None) -> str:
    """`STAGE`, `PIPELINE.STAGE` or a record, as a relation (see Cache.resolve); a table of a run
    that did not complete is shown with a warning."""
    relation, run_id, status = cache.resolve(stage, run)
    if status not in (None, "ok"):
        print(f"warning: run {run_id} is {status}: {stage} may be incomplete", file=sys.stderr)
    return str(relation)


def cmd_show(args: argparse.Namespace) -> int:
    if args.lineage:
        return _show_lineage(args)
    cache = _open_read(args)
    try:
        rel = _relation(cache, args.stage, args.run)
        if args.row is not None and "_id" not in cache.columns(rel):
            raise UserError(f"{rel} has no _id column: --row finds a stage table's row by its _id")
        page = cache.page(rel, where=args.where, row_id=args.row, limit=args.limit)  # --where: checked by the store
    finally:
        cache.close()
    rows, columns, json_columns, total = page.rows, page.columns, page.json_columns, page.total
    if args.row is not None and not rows:
        raise NotFoundError(f"{rel} has no row with _id {args.row!r}")
    if args.columns:  # chosen by name among all columns, hidden ones included
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise UserError(f"{rel} has no column {missing[0]!r} (columns: {', '.join(columns)})")
        keep = [columns.index(c) for c in wanted]
    elif args.all_columns or args.vertical or args.json:
        keep = list(range(len(columns)))
    else:  # the call key and the request JSON are long and rarely read in a table
        keep = [i for i, c in enumerate(columns) if c not in ("_call", "request")]
    columns = [columns[i] for i in keep]
    rows = [tuple(r[i] for i in keep) for r in rows]
    if args.json:
        for r in rows:
            record = {c: (_json_value(v) if c in json_columns else v) for c, v in zip(columns, r, strict=True)}
            _write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
    elif args.vertical:
        _print_vertical(columns, rows, f"{rel}: {len(rows)} of {total} rows")
    else:
        _print_table(f"{rel} ({total} rows)", columns, rows, args.width)
    return 0


def _json_value(value: Any) -> Any:
    """A JSON column as the value it holds (DuckDB hands it over as text)."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _text(value: Any) -> str:
    """A whole value as text: strings as they are, other values as JSON, NULL as NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _print_vertical(columns: list[str], rows: list[tuple[Any, ...]], title: str) -> None:
    """One field per line, whole values; the lines of a long text continue under the bar, as psql's \\x."""
    pad = max((len(c) for c in columns), default=0)
    out = [title]
    for n, r in enumerate(rows, 1):
        out.append(f"-[ row {n} ]" + "-" * max(3, pad - 6))
        for c, v in zip(columns, r, strict=True):
            lines = _text(v).split("\n")
            out.append(f"{c.ljust(pad)} | {lines[0]}")
            out.extend(f"{'':{pad}} | {line}" for line in lines[1:])
    _write("\n".join(out) + "\n")


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `retort show ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fit(columns: list[str], cells: list[list[str]], width: int, room: int) -> list[int]:
    """Column widths that fit `room` characters: never narrower than a header (or 6), the widest shrunk
    first; a column that still does not fit gets width 0 (left out, and named under the table)."""
    natural = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    widths = [min(n, max(width, len(c))) for n, c in zip(natural, columns, strict=True)]
    floors = [min(w, max(len(c), 6)) for w, c in zip(widths, columns, strict=True)]

    def total(ws: list[int]) -> int:  # rich's box: a bar and a space either side of each cell
        return sum(w + 3 for w in ws if w) + 1

    while total(widths) > room:
        i = max(range(len(widths)), key=lambda k: widths[k] - floors[k])
        if widths[i] <= floors[i]:
            break
        widths[i] -= 1
    for i in reversed(range(len(widths))):
        if total(widths) <= room or i == 0:
            break
        widths[i] = 0
    return widths


def _print_table(title: str, columns: list[str], rows: list[tuple[Any, ...]], width: int) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    cells = [[_cell(v, width) for v in r] for r in rows]
    widths = _fit(columns, cells, width, console.width)
    shown = [i for i, w in enumerate(widths) if w]
    table = Table(title=title, title_justify="left", show_lines=False)
    for i in shown:
        table.add_column(columns[i], width=widths[i], no_wrap=True, overflow="ellipsis")
    for r in cells:
        table.add_row(*(Text(r[i]) for i in shown))  # Text: a completion's [brackets] are not markup
    console.print(table)
    hidden = [c for c, w in zip(columns, widths, strict=True) if not w]
    if hidden:
        console.print(Text(f"{len(hidden)} more column(s) did not fit: {', '.join(hidden)}; "
                           "pick with --columns, or read every field with --vertical"))


def _show_lineage(args: argparse.Namespace) -> int:
    from retort.lineage import find_run, lineage

    if args.row is None:
        raise UserError("--lineage needs --row ID (a row's _id; `retort show STAGE` lists them)")
    cache = _open_read(args)
    try:
        # `PIPELINE.STAGE`, a bare STAGE or `--run N`, as `show` names tables; then the run that holds it
        _, run_id, _ = cache.resolve(args.stage, args.run)
        stage = args.stage.rpartition(".")[2]
        run = run_id if run_id is not None else find_run(cache, stage)
        found = lineage(cache, run, stage, args.row)
    finally:
        cache.close()
    if args.json:
        _write(json.dumps(found.to_dict(), default=str, ensure_ascii=False) + "\n")
    else:
        _write(_lineage_text(found))
    return 0


def _lineage_text(found: Any) -> str:
    """The path as text: for each step its new fields, and for a model's row the prompt and completion."""
    from retort.lineage import LINEAGE_COLUMNS

    out = [f"lineage of {found.stage} row {found.row_id} (run {found.run_id}): "
           f"{' -> '.join(s.stage for s in found.steps)}"]
    if found.duplicates:
        out.append(f"note: {found.duplicates} more row(s) of {found.stage} have _id {found.row_id}; this is the first")
    before: dict[str, Any] = {}
    for step in found.steps:
        head = f"== {step.stage} · row {step.row_id} "
        out += ["", head + "=" * max(3, 72 - len(head))]
        if step.passes:
            out.append(f"(the row of {step.passes}, passed through: its prompt and completion are above)")
        if step.note:
            out.append(f"({step.note})")
        fields = {k: v for k, v in step.row.items()
                  if k not in LINEAGE_COLUMNS and (k not in before or before[k] != v)}
        for k, v in fields.items():
            out.append(_field(k, v))
        if step.call is not None:
            call = step.call
            tokens = f"{call.prompt_tokens or 0} + {call.completion_tokens or 0} tokens"
            out.append(f"-- prompt ({call.model}, call {call.key[:12]}, {tokens}, made by stage {call.stage})")
            for m in call.messages:
                out.append(f"[{m.get('role', '?')}]")
                out.append(_text(m.get("content")))
            out.append("-- completion" + (f" (finish: {call.finish_reason})" if call.finish_reason else ""))
            out.append(_text(call.text))
        elif step.row.get("_call") and not step.passes:
            out.append(f"-- call {step.row['_call']} is not in the cache")
        if step.error:
            out.append(f"-- error: {step.error}")
        before = step.row
    if found.children:
        out += ["", "made from it: " + ", ".join(f"{s} {i}" for s, i in found.children)]
    return "\n".join(out) + "\n"


def _field(name: str, value: Any) -> str:
    text = _text(value)
    return f"{name}: {text}" if "\n" not in text else f"{name}:\n  " + text.replace("\n", "\n  ")


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a log: wide enough for tables not to fold
        console.width = max(console.width, 160)
    return console


def _cell(value: Any, width: int) -> str:
    if value is None:
        return ""
    text = " ".join(_text(value).split("\n"))
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_view(args: argparse.Namespace) -> int:
    from retort.view import serve

    ws = _workspace(args)
    return serve(_db_path(args), ws.root / "reports", port=args.port)


def cmd_export(args: argparse.Namespace) -> int:
    from retort.export import export

    cache = _open_read(args)
    try:
        rel = _relation(cache, args.stage, args.run)
        out = export(cache, rel, args.stage, args.format, Path(args.out) if args.out else None, run=args.run,
                     where=args.where, root=_workspace(args).root, read_argv=run_options)
    finally:
        cache.close()
    print(f"wrote {out.rows} rows to {_short(out.path)} (manifest: {_short(out.manifest)})")
    if out.dropped:
        reasons = ", ".join(f"{n} with {'_error set (the output did not parse)' if why == '_error' else 'no ' + why}"
                            for why, n in out.dropped_because.items())
        print(f"dropped {out.dropped} of {out.kept + out.dropped} rows: {reasons}", file=sys.stderr)
    if not out.rows:
        print(f"warning: {_short(out.path)} is empty", file=sys.stderr)
    return 0


def run_options(argv: str) -> dict[str, Any] | None:
    """The options a recorded `retort run` command line (`runs.argv`) was started with, as an export's
    manifest records them; None for any other command line. Parsed with this CLI's own parser, so an
    abbreviated option reads as it did. NAME=VALUE options come as dicts, their values as given (the
    export redacts what looks like a credential)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(shlex.split(argv))
    except (SystemExit, ValueError):
        return None
    if args.command != "run":
        return None

    def pairs(items: list[str] | None) -> dict[str, str]:
        return {k: v for k, _, v in (item.partition("=") for item in items or [])}

    return {"input": args.input, "limit": args.limit, "map": pairs(args.map), "set": pairs(args.set),
            "model": pairs(args.model), "sample": args.sample, "seed": args.seed}


def cmd_cache(args: argparse.Namespace) -> int:
    from rich.table import Table

    if args.action == "vacuum":
        return _vacuum(args)
    cache = _open_read(args)
    try:
        rows = cache.calls_by_model()
        runs = cache.count("runs")
    finally:
        cache.close()
    size = _db_path(args).stat().st_size
    table = Table(title=f"cache {_short(_db_path(args))}: {size / 1e6:.1f} MB, {runs} runs", title_justify="left")
    for col in ("model", "calls", "stages", "prompt tokens", "completion tokens", "avg latency ms", "first",
                "last"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(x) for x in r))
    _console().print(table)
    return 0


def _vacuum(args: argparse.Namespace) -> int:
    from retort.cache import Cache

    path = _db_path(args)
    if not path.exists():
        raise NotFoundError(f"no retort database at {path}; run a pipeline first")
    wal = path.with_name(path.name + ".wal")
    before = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    cache = Cache(path)
    try:
        calls = cache.count("calls")
        cache.execute("VACUUM")
        cache.execute("CHECKPOINT")
        assert cache.count("calls") == calls  # nothing recorded is removed
    finally:
        cache.close()
    after = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    print(f"{_short(path)}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({calls:,} calls kept)")
    return 0


def cmd_keep(args: argparse.Namespace) -> int:
    from retort.cache import Cache

    cache = Cache(_db_path(args))
    try:
        for run in args.runs:
            cache.pin(run, not args.unpin)
    finally:
        cache.close()
    runs = ", ".join(str(r) for r in args.runs)
    print(f"run {runs}: {'no longer pinned' if args.unpin else 'pinned: its tables are kept whatever its age'}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from retort.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from retort.scaffold import init_workspace

    root = init_workspace(Path(args.dir))
    print(f"created a retort workspace in {root}\n  cd {root} && retort run example")
    return 0


def positive(text: str) -> int:
    """A row count: a whole number of at least 1 (0 and negatives are mistakes, not "all")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, not {value}")
    return value


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="a pipeline name (pipelines/NAME.yaml) or a path to a YAML file")
    p.add_argument("--input", metavar="FILE", help="run on another dataset (JSONL, CSV, Parquet, JSON list)")
    p.add_argument("--map", action="append", metavar="COLUMN=EXPR",
                   help="map a dataset column (or a DuckDB expression over its columns) to a pipeline column")
    p.add_argument("--limit", type=positive, metavar="N", help="only the first N input rows")
    p.add_argument("--sample", type=positive, metavar="N", help="a random subset of N input rows (seeded, see --seed)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the seed of --sample (default 0)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override any spec value, e.g. stages.classify.samples=4")
    p.add_argument("--model", action="append", metavar="NAME=TARGET",
                   help="point a named model at another backend: local, http://host:port/v1[#model], "
                        "openai:MODEL, vllm:MODEL, scripted:module:function, langchain:module:attr; "
                        "NAME '*' means every model")
    p.add_argument("--retries", type=int, default=5, help="retries of a retryable call failure (default 5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    from retort.export import FORMATS

    parser = argparse.ArgumentParser(prog="retort", description="Declarative LLM prompting pipelines, "
                                                                "every call cached in DuckDB.")
    parser.add_argument("--version", action="version", version=f"retort {__version__}")
    parser.add_argument("-C", "--workspace", default=".", help="workspace folder (default: current)")
    parser.add_argument("--db", help="DuckDB file (default: WORKSPACE/.retort/retort.duckdb)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline")
    _add_pipeline_args(p)
    p.add_argument("--max-failures", type=int, default=0, help="exit non-zero past this many failures")
    p.add_argument("--on", choices=("local", "ray"), default="local",
                   help="where model calls run: here (default), or on a Ray cluster (pip install 'retort[ray]')")
    p.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster to use with --on ray (default: "
                   "RAY_ADDRESS, else a new local one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-reuse", action="store_true",
                   help="rebuild every stage table, even one an earlier run built from the same inputs "
                        "(calls still come from the cache)")
    p.add_argument("--strict", action="store_true",
                   help=f"exit {EXIT_WARNINGS} when the summary warns (a prompt stage with many parse errors, "
                        "an empty table), after the run is recorded; the spec setting `strict: true` does the same")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a pipeline without calling a model")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plan", help="rows, calls needed, cache hits and tokens per stage, before spending")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("list", help="pipelines, recent runs and stage tables")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="the head of a stage table (or calls, runs, failures, metrics)")
    p.add_argument("stage")
    p.add_argument("--run", type=int, help="an earlier run's table")
    p.add_argument("-n", "--limit", type=int, default=10)
    p.add_argument("--where", help="a SQL filter")
    p.add_argument("--row", metavar="ID", help="only the row with this _id")
    p.add_argument("--lineage", action="store_true",
                   help="with --row: the input row and, for each stage on its path, its prompt and completion")
    p.add_argument("--width", type=int, default=40, help="characters shown per cell in the table")
    p.add_argument("--columns", help="comma-separated columns to show, by name (hidden ones too)")
    p.add_argument("--all-columns", action="store_true", help="also the call key and the request JSON")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--vertical", action="store_true", help="one field per line, whole texts")
    form.add_argument("--json", action="store_true", help="one JSON object per line (with --lineage: one object)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("view", help="browse runs, stage tables, lineage, failures and reports in a web browser")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free port)")
    p.set_defaults(func=cmd_view)
    p = sub.add_parser("export", help="write a stage table as a dataset file, with a manifest")
    p.add_argument("stage")
    p.add_argument("--format", default="jsonl", choices=list(FORMATS),
                   help="jsonl, parquet: the table; chat, multitask, dpo, dpo-chat: training records from the "
                        "model's outputs (rows whose output failed are dropped); chat-gold: the gold label "
                        "(see docs/export.md)")
    p.add_argument("--out", help="output path (default: WORKSPACE/exports/STAGE.EXT)")
    p.add_argument("--run", type=int, help="an earlier run's table")
    p.add_argument("--where", help="a SQL filter over the table's columns, e.g. \"label = 'positive'\"")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("cache", help="cache statistics, and compacting the file")
    p.add_argument("action", choices=["stats", "vacuum"],
                   help="stats: calls, tokens and latency per model; vacuum: fold the write-ahead log into the "
                        "file and reclaim the space of pruned runs (nothing recorded is removed)")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("keep", help="pin runs: their tables are kept whatever their age")
    p.add_argument("runs", type=int, nargs="+", metavar="RUN")
    p.add_argument("--unpin", action="store_true", help="let retention drop them again")
    p.set_defaults(func=cmd_keep)
    p = sub.add_parser("schema", help="the JSON Schema of the pipeline spec")
    p.set_defaults(func=cmd_schema)
    _add_compare_parser(sub)
    for command in sub.choices.values():  # `retort show X --db F` as well as `retort --db F show X`
        command.add_argument("-C", "--workspace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p = sub.add_parser("init", help="a new workspace with one working example")
    p.add_argument("dir")
    p.set_defaults(func=cmd_init)
    return parser


def _add_compare_parser(sub: Any) -> None:
    """`retort compare`'s options; retort.comparison is imported only when it runs (start-up time)."""
    p = sub.add_parser("compare", help="compare prompting strategies on the same items: paired statistics, "
                                       "cost, a report",
                       description="Run every strategy of a comparison spec (what is cached is not called "
                                   "again), score them on the same items and write report.md, report.json and "
                                   "report.html.")
    p.add_argument("spec", help="a comparison name (comparisons/NAME.yaml) or a path to a YAML file")
    p.add_argument("--out", metavar="DIR", help="report folder (default: reports/NAME/ in the workspace)")
    p.add_argument("--limit", type=positive, metavar="N",
                   help="only the first N dataset rows (overrides dataset.limit)")
    p.add_argument("--sample", type=positive, metavar="N", help="a random subset of N dataset rows (seeded)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the seed of --sample (default 0)")
    p.add_argument("--input", metavar="FILE", help="another dataset for every strategy (JSONL, CSV, Parquet, JSON)")
    p.add_argument("--map", action="append", metavar="COLUMN=EXPR",
                   help="map a dataset column (or a DuckDB expression) to a pipeline column, for every strategy")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a value in every strategy's pipeline (before the strategy's own set:)")
    p.add_argument("--model", action="append", metavar="NAME=TARGET",
                   help="point a named model of every strategy at another backend (as in `retort run`); "
                        "NAME '*' means every model and replaces the strategies' own targets")
    p.add_argument("--disagree", nargs=2, metavar=("A", "B"),
                   help="list the items on which strategies A and B predict differently")
    p.add_argument("--format", choices=["table", "md", "json", "html"], default="table",
                   help="what to print (the three report files are always written)")
    p.add_argument("--retries", type=int, default=5, help="retries of a retryable call failure (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from retort.comparison.command import cmd_compare

    return cmd_compare(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RetortError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed calls are cached; run again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `retort schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug or os.environ.get("RETORT_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
