"""`retort compare SPEC`: run what is not cached, write the three reports, print one of them.

    retort compare SPEC                  run what is not cached, then report
    retort compare SPEC --disagree A B   the items on which A and B predict differently
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retort.cliutil import collector_for_runs, name_values
from retort.comparison.reports import print_disagreements, render, write_reports
from retort.comparison.run import run_comparison, short_path
from retort.comparison.spec import find_comparison, load_comparison
from retort.errors import NotFoundError

__all__ = ["cmd_compare"]


def cmd_compare(args: argparse.Namespace) -> int:
    from retort.cache import Cache
    from retort.workspace import Workspace

    ws = Workspace(getattr(args, "workspace", None) or ".")
    path = find_comparison(ws, args.spec)
    spec, _ = load_comparison(path)  # fail on a bad spec or --disagree name before opening the cache
    if args.disagree:
        for name in args.disagree:
            if name not in spec.strategies:
                raise NotFoundError(f"--disagree {name}: no strategy {name!r} in {spec.name} "
                                    f"(strategies: {', '.join(spec.strategies)})")
    targets = name_values(args.model, "--model")  # usage errors before the cache is opened
    columns = name_values(args.map, "--map")
    db = Path(args.db) if getattr(args, "db", None) else ws.db_path
    cache = Cache(db)
    try:
        with collector_for_runs():
            result = run_comparison(ws, path, cache, limit=args.limit, model_targets=targets,
                                    max_retries=args.retries, progress=not args.quiet, input_path=args.input,
                                    columns=columns, overrides=args.set or [], sample=args.sample, seed=args.seed)
    finally:
        cache.close()
    out = Path(args.out) if args.out else ws.root / "reports" / str(spec.name)
    paths = write_reports(result, out)
    if args.disagree:
        a, b = args.disagree
        print_disagreements(result, a, b, args.format)
    elif args.format in ("md", "json", "html"):
        print(paths[args.format].read_text(encoding="utf-8"), end="")
    else:
        render(result)
    print(f"reports: {short_path(paths['md'])}, {paths['json'].name}, {paths['html'].name}; per item: "
          f"retort show compare_items --where \"comparison = '{spec.name}'\"", file=sys.stderr)
    return 0
