"""Running a comparison: every strategy as a normal run of its pipeline, then its predictions read back.

Each strategy is a run through `retort.runner.Runner`, all of them on one
DuckDB cache, so adding a strategy and rerunning calls only the new one. Its
predictions are read right after its run (the cache keeps the stage tables of
the last 20 runs only) and aligned per dataset item: every stage row's `_id`
starts with the dataset row id ("3" -> "3.0" -> "3.0.1"). Then scoring.py
scores them, and the results go to the store: one row per strategy and metric
in `metrics` (stage `compare:NAME`, the interval in `data`) and one row per
strategy and item in `compare_items`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retort.comparison.result import Result, StrategyRun
from retort.comparison.scoring import majority, natural_order, resolve_metric, score
from retort.comparison.spec import ComparisonSpec, load_comparison, split_predict
from retort.errors import BackendError, NotFoundError, SpecError, UserError
from retort.spec import Source

__all__ = ["Comparer", "record", "run_comparison"]


def run_comparison(workspace: Any, spec_path: Path, cache: Any, *, limit: int | None = None,
                   model_targets: dict[str, str] | None = None, max_retries: int = 5, progress: bool = True,
                   log: Callable[[str], None] | None = None, **data: Any) -> Result:
    """`data`: input_path, columns, overrides, sample, seed (see Comparer)."""
    spec, src = load_comparison(spec_path)
    comparer = Comparer(workspace, spec, src, cache, limit=limit, model_targets=model_targets,
                        max_retries=max_retries, progress=progress, log=log, **data)
    result = comparer.run()
    result.spec_path = short_path(spec_path)
    record(result, cache)
    return result


def short_path(path: Path) -> str:
    """The path relative to the working directory when it is under it, as reports and messages show it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Comparer:
    """Loads every strategy's pipeline first (so a typo fails before any call), then runs them one by one."""

    def __init__(self, workspace: Any, spec: ComparisonSpec, src: Source, cache: Any, *,
                 limit: int | None = None, model_targets: dict[str, str] | None = None, max_retries: int = 5,
                 progress: bool = True, log: Callable[[str], None] | None = None, input_path: str | None = None,
                 columns: dict[str, str] | None = None, overrides: list[str] | None = None,
                 sample: int | None = None, seed: int = 0) -> None:
        """`input_path`, `columns`, `overrides` (`--set`, applied to every strategy's pipeline before its
        own `set:`), `limit`, `sample` and `seed` are what `retort run` takes, for every strategy at once."""
        from retort.backends import parse_target
        from retort.spec import load_pipeline

        self.ws, self.spec, self.src, self.cache = workspace, spec, src, cache
        self.limit = limit or spec.dataset.limit
        self.sample, self.seed = sample, seed
        self.max_retries, self.progress = max_retries, progress
        self.log = log or (lambda text: print(text, file=sys.stderr))
        spec_dir = Path(src.file).resolve().parent
        self.input_path = input_path or str(workspace.data(spec.dataset.path, base=spec_dir.parent))
        self.columns = {**spec.dataset.columns, **(columns or {})}
        common = list(overrides or [])
        cli = dict(model_targets or {})
        self.plans: list[tuple[StrategyRun, Source, dict[str, dict[str, Any]], str]] = []
        for name, strategy in spec.strategies.items():
            at = ("strategies", name)
            # Without a limit the runner falls back to the pipeline's own `input.limit`;
            # every strategy must see the same items, so pin it.
            sets = [f"input.limit={json.dumps(self.limit)}", *common]
            sets += [f"{k}={json.dumps(v)}" for k, v in strategy.set_.items()]
            try:
                pipeline, psrc = load_pipeline(workspace.pipeline(strategy.pipeline), sets)
            except SpecError as exc:
                raise src.error(f"strategy {name}: {exc}",
                                (*at, "set") if strategy.set_ else (*at, "pipeline")) from None
            except NotFoundError as exc:
                raise src.error(str(exc), (*at, "pipeline")) from None
            targets = {} if "*" in cli else dict(strategy.model)
            targets.update(cli)
            try:
                parsed = {k: parse_target(t) for k, t in targets.items()}
            except (BackendError, UserError) as exc:
                raise src.error(str(exc), (*at, "model")) from None
            stage, column = split_predict(strategy.predict or spec.predict or "")  # type: ignore[misc]
            names = [s.name for s in pipeline.stages]
            if stage not in names:
                where = (*at, "predict") if strategy.predict else ("predict",)
                raise src.error(f"strategy {name}: pipeline {pipeline.name} has no stage {stage!r} "
                                f"(stages: {', '.join(names)})", where)
            argv = f"compare {spec.name} --strategy {name}"  # what `retort list` shows for the run
            self.plans.append((StrategyRun(name, pipeline, stage, column), psrc, parsed, argv))
        self.metrics = [resolve_metric(m, workspace) for m in spec.metrics]

    # ------------------------------------------------------------ runs

    def run(self) -> Result:
        from retort.progress import RichProgress
        from retort.runner import Runner

        items: list[dict[str, Any]] | None = None
        runs: list[StrategyRun] = []
        for k, (run, psrc, targets, argv) in enumerate(self.plans, 1):
            self.log(f"[{k}/{len(self.plans)}] strategy {run.name} (pipeline {run.pipeline.name})")
            with RichProgress(enabled=self.progress) as progress:
                runner = Runner(self.ws, run.pipeline, psrc, self.cache, mode="run", input_path=self.input_path,
                                columns=self.columns, limit=self.limit, sample=self.sample, seed=self.seed,
                                model_targets=targets,
                                progress=progress, max_retries=self.max_retries, argv=argv,
                                namespace=f"{self.spec.name}/{run.name}")
                result = asyncio.run(runner.execute())
            run.run_id = result.run_id
            totals = result.totals()
            run.calls, run.calls_made, run.cache_hits = totals["calls_needed"], totals["calls_made"], \
                totals["cache_hits"]
            run.failures = result.failures
            # tokens of cached calls count: they are what a fresh run of this strategy would spend
            run.prompt_tokens, run.completion_tokens = totals["prompt_tokens"], totals["completion_tokens"]
            run.cost_usd = self._cost(runner, result)
            self.log(f"      run {run.run_id}: {run.calls_made} calls made, {run.cache_hits} cached, "
                     f"{run.failures} failed")
            if items is None:
                items = self._items(run.run_id)
            self._read(run, {str(i["_id"]) for i in items})
            runs.append(run)
        assert items is not None
        return score(self.spec, self.src.file, items, runs, self.metrics, self.ws)

    def _items(self, run_id: int | None) -> list[dict[str, Any]]:
        rows = self.cache.run_input_rows(run_id)
        if rows and self.spec.reference not in rows[0]:
            raise self.src.error(f"no column {self.spec.reference!r} in the dataset {self.input_path} "
                                 f"(columns: {', '.join(c for c in rows[0] if c != '_id')}); map one in "
                                 "dataset.columns", ("reference",))
        if self.spec.text and rows and self.spec.text not in rows[0]:
            raise self.src.error(f"no column {self.spec.text!r} in the dataset", ("text",))
        kept = [r for r in rows if r.get(self.spec.reference) is not None]
        if not kept:
            raise UserError(f"{self.src.file}: no item of {self.input_path} has a reference "
                            f"({self.spec.reference!r})")
        return sorted(kept, key=lambda r: natural_order(r["_id"]))

    def _read(self, run: StrategyRun, item_ids: set[str]) -> None:
        """The strategy's prediction per item, and the wall time of the calls its tables reference."""
        if run.run_id is None or not self.cache.table_exists(f"run_{run.run_id}", run.stage):
            raise NotFoundError(f"strategy {run.name}: run {run.run_id} produced no table {run.stage!r} "
                                "(a stage failed; see `retort show failures`)")
        columns = self.cache.stage_column_names(run.run_id, run.stage)
        for needed in ("_id", run.column):
            if needed not in columns:
                raise self.src.error(f"strategy {run.name}: table {run.stage} has no column {needed!r} "
                                     f"(columns: {', '.join(columns)})",
                                     ("strategies", run.name, "predict") if self.spec.strategies[run.name].predict
                                     else ("predict",))
        cells = self.cache.stage_values(run.run_id, run.stage, run.column)
        run.rows = len(cells)
        by_item: dict[str, list[tuple[str, Any]]] = {}
        for row_id, value in cells:
            item = str(row_id).split(".", 1)[0]
            if item not in item_ids and not item.isdigit():
                raise UserError(f"strategy {run.name}: rows of {run.stage} have _id {row_id!r}, which does not "
                                "start with a dataset row id; a SQL stage must carry `_id` from its source")
            by_item.setdefault(item, []).append((str(row_id), value))
        run.predictions = {item: majority(rows) for item, rows in by_item.items() if item in item_ids}
        run.wall_seconds = self.cache.call_latency_seconds(run.run_id)

    def _cost(self, runner: Any, result: Any) -> float | None:
        """USD from the models' `price_input`/`price_output` (per million tokens); None if a used model has none."""
        stages = {s.name: s for s in runner.spec.stages}
        total = 0.0
        for stats in result.stages:
            if not (stats.prompt_tokens or stats.completion_tokens):
                continue
            stage = stages.get(stats.name)
            model = getattr(stage, "model", None)
            if isinstance(model, str):
                prices = {_price(runner.model_config(model))}
            else:  # a model per row, or prompts from a Python stage: one price must fit every model
                prices = {_price(runner.model_config(m)) for m in {"default", *runner.spec.models}}
            if len(prices) != 1 or None in prices:
                return None
            (pin, pout), = prices  # type: ignore[misc]
            total += (stats.prompt_tokens * pin + stats.completion_tokens * pout) / 1e6
        return total


def _price(config: dict[str, Any]) -> tuple[float, float] | None:
    pin, pout = config.get("price_input"), config.get("price_output")
    if pin is None and pout is None:
        return None
    return float(pin or 0.0), float(pout or 0.0)


def record(result: Result, cache: Any) -> None:
    """One row per strategy and metric in `metrics`; this comparison's rows of `compare_items` replaced."""
    name, spec = result.spec.name, result.spec
    assert name is not None
    items: list[tuple[Any, ...]] = []
    metrics: list[tuple[Any, ...]] = []
    for run in result.runs:
        items += [(name, run.name, str(item["_id"]), _cell(run.predictions.get(item["_id"])),
                   _cell(item[spec.reference]), s)
                  for item, s in zip(result.items, result.item_scores[run.name], strict=True)]
        for metric in spec.metrics:
            iv = result.intervals[metric.name][run.name]
            data = {"comparison": name, "strategy": run.name, "pipeline": run.pipeline.name,
                    "estimate": iv.estimate, "low": iv.low, "high": iv.high, "confidence": spec.confidence,
                    "resamples": result.resamples[metric.name], "seed": spec.seed, "n": len(result.items),
                    "missing": result.missing(run), "primary": metric.name == result.primary}
            metrics.append((run.run_id, run.name, f"compare:{name}", metric.name, iv.estimate, json.dumps(data)))
    cache.record_comparison(name, items, metrics)


def _cell(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
