"""`retort compare`: prompting strategies on the same items, with paired statistics, cost and a report.

A comparison is one YAML file (`comparisons/NAME.yaml`): a dataset, the
strategies (a pipeline, or a variant of one through `set:` overrides and
`model:` targets, exactly like `retort run --set/--model`), the column each
strategy predicts, the reference column and the metrics (the first is primary).

The data flows down through one module per job:

    command.py   the `retort compare` command: arguments, the cache, which report to print
    run.py       each strategy as a normal run of its pipeline; its predictions read back; the results
                 recorded in the store (`metrics`, `compare_items`, through Cache methods)
    scoring.py   metrics (evaluators), one prediction per item (majority), scores per item and strategy,
                 every metric's intervals through retort.stats (its one resampling loop)
    reports.py   the Result as the report data model (retort/report/): the strategies' table, the items
                 each pair disagrees on, the JSON details; then terminal, Markdown, JSON and HTML
    result.py    StrategyRun and Result, what run.py and scoring.py hand on
    spec.py      the YAML as pydantic models, checked with file, line and field

Results: the terminal table, `report.md`, `report.json` and a self-contained
`report.html` in `--out` (default `reports/NAME/`); one row per strategy and
metric in `metrics` (stage `compare:NAME`, the interval in `data`); and one row
per strategy and item in `compare_items`.
"""

from __future__ import annotations

from retort.comparison.result import Result, StrategyRun
from retort.comparison.run import run_comparison
from retort.comparison.scoring import choice_match, disagreements, majority
from retort.comparison.spec import ComparisonSpec, find_comparison, json_schema, load_comparison

__all__ = ["ComparisonSpec", "Result", "StrategyRun", "choice_match", "disagreements", "find_comparison",
           "json_schema", "load_comparison", "majority", "run_comparison"]
