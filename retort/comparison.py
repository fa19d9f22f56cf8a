"""`retort compare`: prompting strategies on the same items, with paired statistics, cost and a report.

A comparison is one YAML file (`comparisons/NAME.yaml`): a dataset, the
strategies (a pipeline, or a variant of one through `set:` overrides and
`model:` targets, exactly like `retort run --set/--model`), the column each
strategy predicts, the reference column and the metrics (the first is primary).

    retort compare SPEC                  run what is not cached, then report
    retort compare SPEC --disagree A B   the items on which A and B predict differently

Each strategy is a normal run through `retort.runner.Runner`, all of them on one
DuckDB cache, so adding a strategy and rerunning calls only the new one. Its
predictions are read right after its run (the cache keeps the stage tables of
the last 20 runs only) and aligned per dataset item: every stage row's `_id`
starts with the dataset row id ("3" -> "3.0" -> "3.0.1"). Several rows for one
item (samples > 1) become their majority prediction, ties going to the lowest
`_id`; an item with no usable prediction (a failed call, an answer that did not
parse) scores 0 and is counted as missing.

Metrics are evaluators (`evaluators/*.py`) called with `prediction=` and
`reference=` column names. Per-item metrics (accuracy, exact match, math, choice
match, and user evaluators by default) score each item 0/1 (or any number), so
`retort.stats` gives paired bootstrap intervals and McNemar tests. A corpus-level
metric (macro-F1) has no per-item score: its interval comes from
`bootstrap_statistic` here, which evaluates it on resampled items using the same
seeded index draws as `retort.stats`, so its paired differences are paired too.

Results: the terminal table, `report.md`, `report.json` and a self-contained
`report.html` in `--out` (default `reports/NAME/`); one row per strategy and
metric in `metrics` (stage `compare:NAME`, the interval in `data`); and one row
per strategy and item in `compare_items`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retort.errors import BackendError, NotFoundError, SpecError, UserError
from retort.spec import IDENT, InputSpec, Pipeline, Source, read_yaml, validation_error
from retort.stats import (
    Comparison,
    Interval,
    PairResult,
    StrategyResult,
    adjust,
    bootstrap_p,
    compare_strategies,
    interval,
)

__all__ = ["ComparisonSpec", "bootstrap_statistic", "choice_match", "cmd_compare", "json_schema",
           "load_comparison", "run_comparison"]

FOLDER = "comparisons"
DISAGREEMENTS_SHOWN = 20  # items per pair listed in the HTML report (--disagree A B lists them all)
STRATEGY_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"
# Corpus-level metrics are recomputed on every resample; cap the rows an evaluator sees
# per strategy (macro-F1 runs ~3 µs a row) so 2,000 items stay a few seconds, not a minute.
CORPUS_ROW_BUDGET = 500_000


# --------------------------------------------------------------------------- the spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StrategySpec(_Strict):
    """One strategy: a pipeline as it is, or a variant of it. A bare string is the pipeline name."""

    pipeline: str = Field(description="pipeline name (pipelines/NAME.yaml) or path")
    description: str | None = None
    set_: dict[str, Any] = Field(default_factory=dict, alias="set",
                                 description="spec overrides, as `--set`: {stages.classify.samples: 5}")
    model: dict[str, str] = Field(default_factory=dict,
                                  description="model targets, as `--model`: {default: openai:gpt-4o-mini}; "
                                              "a string means every model ('*')")
    predict: str | None = Field(None, description="STAGE.COLUMN holding the prediction (default: the top level's)")

    @field_validator("model", mode="before")
    @classmethod
    def _every_model(cls, v: Any) -> Any:
        return {"*": v} if isinstance(v, str) else v


class MetricSpec(_Strict):
    """A metric is an evaluator. A bare string names a built-in metric or an evaluator."""

    name: str = Field(description="the metric's name in the report")
    evaluator: str | None = Field(None, description="evaluator (module.function); default: from the name")
    key: str | None = Field(None, description="which value of the evaluator's dict; default: the name")
    per_item: bool | None = Field(None, description="score items one by one (true) or the corpus (false)")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="more keyword arguments")


class ComparisonSpec(_Strict):
    name: str | None = Field(None, description="default: the file name")
    description: str | None = None
    dataset: InputSpec = Field(description="the items every strategy sees: {path, columns, limit}")
    reference: str = Field(description="the dataset column (after `columns`) holding the gold answer")
    text: str | None = Field(None, description="the column shown for an item in --disagree (default: text)")
    predict: str | None = Field(None, description="STAGE.COLUMN holding each strategy's prediction")
    metrics: list[MetricSpec] = Field(default_factory=lambda: [MetricSpec.model_validate({"name": "accuracy"})],
                                      min_length=1, description="evaluator names; the first is the primary metric")
    strategies: dict[str, StrategySpec] = Field(min_length=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    resamples: int = Field(2000, ge=1)
    seed: int = 0

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("strategies", mode="before")
    @classmethod
    def _pipeline_names(cls, v: Any) -> Any:
        return {k: {"pipeline": s} if isinstance(s, str) else s for k, s in v.items()} if isinstance(v, dict) else v


def json_schema() -> dict[str, Any]:
    schema = ComparisonSpec.model_json_schema(by_alias=True)
    schema["title"] = "retort comparison"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def load_comparison(path: Path | str) -> tuple[ComparisonSpec, Source]:
    path = Path(path)
    data, src = read_yaml(path, "a mapping with `dataset`, `reference` and `strategies`")
    data.setdefault("name", path.stem)
    try:
        spec = ComparisonSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data, src) from None
    for name, strategy in spec.strategies.items():
        if not re.match(STRATEGY_NAME, name):
            raise src.error(f"strategy name {name!r}: use letters, digits and _ . + -", ("strategies", name))
        predict = strategy.predict or spec.predict
        where = ("strategies", name, "predict") if strategy.predict else ("predict",)
        if predict is None:
            raise src.error("which column does this strategy predict? give `predict: STAGE.COLUMN` here or at "
                            "the top level", ("strategies", name))
        if not _split_predict(predict):
            raise src.error(f"expected STAGE.COLUMN (got {predict!r})", where)
    names = [m.name for m in spec.metrics]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise src.error(f"metric {n!r} is listed twice", ("metrics", i))
    return spec, src


def _split_predict(value: str) -> tuple[str, str] | None:
    stage, _, column = value.partition(".")
    if re.match(IDENT, stage) and re.match(IDENT, column):
        return stage, column
    return None


def find_comparison(workspace: Any, name: str) -> Path:
    """A path as given, else `comparisons/NAME.yaml` in the workspace, then in the built-in library."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if path.is_file():
            return path
        raise NotFoundError(f"comparison file {name} does not exist")
    for root in workspace.roots:
        for suffix in (".yaml", ".yml"):
            candidate = root / FOLDER / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for root in workspace.roots for p in (root / FOLDER).glob("*.y*ml")})
    raise NotFoundError(f"no comparison named {name!r} in {FOLDER}/ (known: {', '.join(known) or 'none'})")


# --------------------------------------------------------------------------- metrics


def _choice_key(value: Any) -> str:
    """"(B) Paris", "B.", "b" -> "b"; any other answer -> itself, case- and space-insensitive."""
    text = re.sub(r"\s+", " ", str(value)).strip().casefold()
    m = re.match(r"^[\(\[]?([a-z0-9])(?:[\)\]\.:]|$)", text)
    if m and (len(text) == 1 or text[1] in ")].:" or text[0] in "(["):
        return m.group(1)
    return text.strip("()[]. ")


def choice_match(rows: Sequence[dict[str, Any]], prediction: str = "prediction",
                 reference: str = "label") -> dict[str, Any]:
    """Share of rows whose predicted choice is the reference choice: "(B) Paris", "B." and "b" all read B."""
    scored = [(r.get(prediction), r.get(reference)) for r in rows if r.get(reference) is not None]
    correct = sum(1 for p, g in scored if p is not None and _choice_key(p) == _choice_key(g))
    return {"choice_match": correct / len(scored) if scored else 0.0, "n": len(scored), "correct": correct}


# name -> (evaluator, key of its dict, scored per item)
BUILTIN_METRICS: dict[str, tuple[str | Callable[..., Any], str, bool]] = {
    "accuracy": ("metrics.accuracy", "accuracy", True),
    "exact_match": ("metrics.exact_match", "exact_match", True),
    "math_equal": ("metrics.math_accuracy", "math_accuracy", True),
    "math_accuracy": ("metrics.math_accuracy", "math_accuracy", True),
    "choice": (choice_match, "choice_match", True),
    "choice_match": (choice_match, "choice_match", True),
    "macro_f1": ("metrics.macro_f1", "macro_f1", False),
}


@dataclass
class Metric:
    name: str
    fn: Callable[..., Any]
    key: str
    per_item: bool
    kwargs: dict[str, Any]

    def value(self, rows: list[dict[str, Any]], reference: str) -> float:
        out = self.fn(rows, prediction="prediction", reference=reference, **self.kwargs)
        if isinstance(out, dict):
            if self.key not in out:
                raise UserError(f"metric {self.name}: the evaluator returned no {self.key!r} "
                                f"(keys: {', '.join(map(str, out))}); name one with `key:`")
            out = out[self.key]
        if isinstance(out, bool):
            return float(out)
        if not isinstance(out, int | float) or not math.isfinite(out):
            raise UserError(f"metric {self.name}: expected a finite number, got {out!r}")
        return float(out)


def resolve_metric(spec: MetricSpec, workspace: Any) -> Metric:
    builtin = BUILTIN_METRICS.get(spec.evaluator or spec.name)
    ref: str | Callable[..., Any]
    if builtin:
        ref, key, per_item = builtin
    else:
        ref = spec.evaluator or spec.name
        key, per_item = re.split(r"[.:]", ref)[-1], True
    fn = workspace.evaluator(ref) if isinstance(ref, str) else ref
    key = spec.key or key
    return Metric(spec.name, fn, key, spec.per_item if spec.per_item is not None else per_item, spec.with_)


# --------------------------------------------------------------------------- statistics


def bootstrap_statistic(n: int, statistics: Sequence[Callable[[list[int]], float]], *, resamples: int = 2000,
                        seed: int = 0) -> list[list[float]]:
    """Each statistic over `resamples` shared draws of n item indices (with replacement).

    The draws are the ones `retort.stats` makes for the same (n, resamples, seed),
    so the mean as a statistic reproduces `bootstrap_ci` exactly, and the
    difference of two statistics' replicates is a paired bootstrap.
    """
    if n < 1:
        raise ValueError("no items")
    rng = random.Random(seed)
    population = range(n)
    out = [[0.0] * resamples for _ in statistics]
    for r in range(resamples):
        idx = rng.choices(population, k=n)
        for s, stat in enumerate(statistics):
            out[s][r] = stat(idx)
    return out


def corpus_resamples(n: int, resamples: int) -> int:
    return max(1, min(resamples, max(200, CORPUS_ROW_BUDGET // max(n, 1))))


# --------------------------------------------------------------------------- running


@dataclass
class StrategyRun:
    name: str
    pipeline: Pipeline
    stage: str
    column: str
    run_id: int | None = None
    predictions: dict[str, Any] = field(default_factory=dict)  # item id -> majority prediction (or None)
    rows: int = 0
    calls: int = 0
    calls_made: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    cost_usd: float | None = None


@dataclass
class Result:
    spec: ComparisonSpec
    spec_path: str
    items: list[dict[str, Any]]  # dataset rows with a reference, in dataset order
    runs: list[StrategyRun]
    scores: dict[str, dict[str, list[float]]]  # metric -> strategy -> per-item scores (per-item metrics)
    intervals: dict[str, dict[str, Interval]]  # metric -> strategy -> interval
    resamples: dict[str, int]  # metric -> resamples used
    comparison: Comparison  # the primary metric, with pairs
    item_scores: dict[str, list[float]]  # strategy -> per-item score kept in `compare_items`

    @property
    def primary(self) -> str:
        return self.spec.metrics[0].name

    def missing(self, run: StrategyRun) -> int:
        return sum(1 for item in self.items if run.predictions.get(item["_id"]) is None)

    def run(self, name: str) -> StrategyRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise NotFoundError(f"no strategy {name!r} in {self.spec.name} (strategies: "
                            f"{', '.join(r.name for r in self.runs)})")


def _natural(item_id: str) -> tuple[tuple[int, Any], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in str(item_id).split("."))


def _vote_key(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"\s+", " ", value).strip().casefold()
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


def majority(rows: Sequence[tuple[str, Any]]) -> Any:
    """The most frequent prediction of one item's rows; a tie goes to the lowest `_id`; None if none."""
    ordered = sorted(((i, p) for i, p in rows if p is not None), key=lambda r: _natural(r[0]))
    if not ordered:
        return None
    counts = Counter(_vote_key(p) for _, p in ordered)
    top = max(counts.values())
    return next(p for _, p in ordered if counts[_vote_key(p)] == top)


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
            stage, column = _split_predict(strategy.predict or spec.predict or "")  # type: ignore[misc]
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
        rows = self.cache.con.sql(f'SELECT * FROM run_{run_id}."input"').to_arrow_table().to_pylist()
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
        return sorted(kept, key=lambda r: _natural(r["_id"]))

    def _read(self, run: StrategyRun, item_ids: set[str]) -> None:
        """The strategy's prediction per item, and the wall time of the calls its tables reference."""
        con, schema = self.cache.con, f"run_{run.run_id}"
        if not self.cache.table_exists(schema, run.stage):
            raise NotFoundError(f"strategy {run.name}: run {run.run_id} produced no table {run.stage!r} "
                                "(a stage failed; see `retort show failures`)")
        columns = [r[0] for r in con.execute(f'DESCRIBE {schema}."{run.stage}"').fetchall()]
        for needed in ("_id", run.column):
            if needed not in columns:
                raise self.src.error(f"strategy {run.name}: table {run.stage} has no column {needed!r} "
                                     f"(columns: {', '.join(columns)})",
                                     ("strategies", run.name, "predict") if self.spec.strategies[run.name].predict
                                     else ("predict",))
        cells = con.execute(f'SELECT CAST("_id" AS VARCHAR), "{run.column}" FROM {schema}."{run.stage}"').fetchall()
        run.rows = len(cells)
        by_item: dict[str, list[tuple[str, Any]]] = {}
        for row_id, value in cells:
            item = str(row_id).split(".", 1)[0]
            if item not in item_ids and not item.isdigit():
                raise UserError(f"strategy {run.name}: rows of {run.stage} have _id {row_id!r}, which does not "
                                "start with a dataset row id; a SQL stage must carry `_id` from its source")
            by_item.setdefault(item, []).append((str(row_id), value))
        run.predictions = {item: majority(rows) for item, rows in by_item.items() if item in item_ids}
        tables = [r[0] for r in con.execute(
            "SELECT DISTINCT table_name FROM information_schema.columns WHERE table_schema = ? "
            "AND column_name = '_call'", [schema]).fetchall()]
        if tables:
            keys = " UNION ".join(f'SELECT "_call" AS k FROM {schema}."{t}"' for t in sorted(tables))
            total = con.execute(f"SELECT coalesce(sum(l), 0) FROM (SELECT key, min(latency_ms) AS l FROM calls "
                                f"WHERE key IN ({keys}) GROUP BY key)").fetchall()[0][0]
            run.wall_seconds = float(total or 0) / 1000

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


# --------------------------------------------------------------------------- scoring


def score(spec: ComparisonSpec, spec_path: str, items: list[dict[str, Any]], runs: list[StrategyRun],
          metrics: list[Metric], workspace: Any) -> Result:
    """Per-item scores, intervals for every metric, and the primary metric's paired comparison.

    `compare_items.score` is the primary metric per item; when that metric is corpus-level
    (macro-F1), it is accuracy per item instead (prediction equals reference).
    """
    ref = spec.reference
    rows = {run.name: [{**item, "prediction": run.predictions.get(item["_id"])} for item in items] for run in runs}
    scores: dict[str, dict[str, list[float]]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    used: dict[str, int] = {}
    comparison: Comparison | None = None
    for k, metric in enumerate(metrics):
        if metric.per_item:
            per = {run.name: [0.0 if r["prediction"] is None else metric.value([r], ref) for r in rows[run.name]]
                   for run in runs}
            scores[metric.name] = per
            c = compare_strategies(per, confidence=spec.confidence, resamples=spec.resamples, seed=spec.seed)
            used[metric.name] = spec.resamples
        else:
            c = _corpus_comparison(metric, rows, ref, spec, runs, items, pairs=k == 0)
            used[metric.name] = c.resamples
        intervals[metric.name] = {s.name: s.metric for s in c.strategies}
        if k == 0:
            comparison = c
    assert comparison is not None
    primary = metrics[0]
    if primary.name in scores:
        per_item = scores[primary.name]
    else:
        acc = resolve_metric(MetricSpec.model_validate({"name": "accuracy"}), workspace)
        per_item = {name: [0.0 if r["prediction"] is None else acc.value([r], ref) for r in column]
                    for name, column in rows.items()}
    return Result(spec, spec_path, items, runs, scores, intervals, used, comparison, per_item)


def _corpus_comparison(metric: Metric, rows: dict[str, list[dict[str, Any]]], ref: str, spec: ComparisonSpec,
                       runs: list[StrategyRun], items: list[dict[str, Any]], pairs: bool) -> Comparison:
    n = len(items)
    names = [run.name for run in runs]
    resamples = corpus_resamples(n, spec.resamples)

    def stat(name: str) -> Callable[[list[int]], float]:
        column = rows[name]
        return lambda idx: metric.value([column[i] for i in idx], ref)

    reps = bootstrap_statistic(n, [stat(name) for name in names], resamples=resamples, seed=spec.seed)
    points = [metric.value(rows[name], ref) for name in names]
    strategies = tuple(StrategyResult(name, n, interval(p, r, spec.confidence), False)
                       for name, p, r in zip(names, points, reps, strict=True))
    out: list[PairResult] = []
    if pairs:
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                replicates = [x - y for x, y in zip(reps[i], reps[j], strict=True)]
                diff = interval(points[i] - points[j], replicates, spec.confidence)
                a, b = runs[i].predictions, runs[j].predictions
                disagree = tuple(k for k, item in enumerate(items)
                                 if _differ(a.get(item["_id"]), b.get(item["_id"])))
                out.append(PairResult(names[i], names[j], diff, None, disagree, p_value=bootstrap_p(replicates),
                                      alpha=1 - spec.confidence))
    return Comparison(n, spec.confidence, resamples, spec.seed, strategies, adjust(out))


def _differ(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return bool(_vote_key(a) != _vote_key(b))


def disagreements(result: Result, a: str, b: str) -> list[dict[str, Any]]:
    """Items on which strategies `a` and `b` predict differently (a missing prediction differs from any)."""
    ra, rb = result.run(a), result.run(b)
    text = result.spec.text or ("text" if result.items and "text" in result.items[0] else None)
    out = []
    for item in result.items:
        pa_, pb = ra.predictions.get(item["_id"]), rb.predictions.get(item["_id"])
        if _differ(pa_, pb):
            out.append({"item_id": item["_id"], "text": item.get(text) if text else None, a: pa_, b: pb,
                        "reference": item[result.spec.reference]})
    return out


# --------------------------------------------------------------------------- records and reports


def _cell(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def record(result: Result, cache: Any) -> None:
    """One row per strategy and metric in `metrics`; this comparison's rows of `compare_items` replaced."""
    import pyarrow as pa

    con, name, spec = cache.con, result.spec.name, result.spec
    con.execute("CREATE TABLE IF NOT EXISTS main.compare_items (comparison VARCHAR, strategy VARCHAR, "
                "item_id VARCHAR, prediction VARCHAR, reference VARCHAR, score DOUBLE)")
    items: dict[str, list[Any]] = {k: [] for k in ("comparison", "strategy", "item_id", "prediction", "reference",
                                                   "score")}
    metrics: dict[str, list[Any]] = {k: [] for k in ("run_id", "pipeline", "stage", "name", "value", "data")}
    for run in result.runs:
        for item, s in zip(result.items, result.item_scores[run.name], strict=True):
            for k, v in (("comparison", name), ("strategy", run.name), ("item_id", str(item["_id"])),
                         ("prediction", _cell(run.predictions.get(item["_id"]))),
                         ("reference", _cell(item[spec.reference])), ("score", s)):
                items[k].append(v)
        for metric in spec.metrics:
            iv = result.intervals[metric.name][run.name]
            data = {"comparison": name, "strategy": run.name, "pipeline": run.pipeline.name,
                    "estimate": iv.estimate, "low": iv.low, "high": iv.high, "confidence": spec.confidence,
                    "resamples": result.resamples[metric.name], "seed": spec.seed, "n": len(result.items),
                    "missing": result.missing(run), "primary": metric.name == result.primary}
            for k, v in (("run_id", run.run_id), ("pipeline", run.name), ("stage", f"compare:{name}"),
                         ("name", metric.name), ("value", iv.estimate), ("data", json.dumps(data))):
                metrics[k].append(v)
    con.execute("BEGIN")
    try:
        con.execute("DELETE FROM main.compare_items WHERE comparison = ?", [name])
        for table, cols, types in (
                ("compare_items", items, [pa.string()] * 5 + [pa.float64()]),
                ("metrics", metrics, [pa.int32(), pa.string(), pa.string(), pa.string(), pa.float64(), pa.string()])):
            batch = pa.table({k: pa.array(v, t) for (k, v), t in zip(cols.items(), types, strict=True)})
            con.register("_compare_batch", batch)
            try:
                extra = ", now() AS created_at" if table == "metrics" else ""
                con.execute(f"INSERT INTO main.{table} BY NAME SELECT *{extra} FROM _compare_batch")
            finally:
                con.unregister("_compare_batch")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def cost_rows(result: Result) -> list[Any]:
    from retort.report import CostRow

    return [CostRow(run.name, calls=run.calls, prompt_tokens=run.prompt_tokens,
                    completion_tokens=run.completion_tokens, wall_seconds=run.wall_seconds, cost_usd=run.cost_usd)
            for run in result.runs]


def _details(result: Result) -> dict[str, Any]:
    """What the generic report does not know: strategies' runs, every metric, missing predictions."""
    spec = result.spec
    return {
        "name": spec.name, "description": spec.description, "dataset": spec.dataset.model_dump(exclude_none=True),
        "reference": spec.reference, "primary_metric": result.primary,
        "item_ids": [str(item["_id"]) for item in result.items],  # what the pairs' disagreement indices point at
        "metrics": [{"name": m.name, "resamples": result.resamples[m.name],
                     "per_item": m.name in result.scores} for m in spec.metrics],
        "strategies": [{
            "name": run.name, "pipeline": run.pipeline.name, "run_id": run.run_id,
            "set": spec.strategies[run.name].set_, "model": spec.strategies[run.name].model,
            "predict": f"{run.stage}.{run.column}", "rows": run.rows, "missing": result.missing(run),
            "calls_made": run.calls_made, "cache_hits": run.cache_hits, "failures": run.failures,
            "metrics": {m.name: result.intervals[m.name][run.name].to_dict() for m in spec.metrics}}
            for run in result.runs],
    }


def _missing(result: Result) -> dict[str, int]:
    return {run.name: result.missing(run) for run in result.runs}


def _fmt(iv: Interval) -> str:
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _detail_rows(result: Result) -> tuple[list[str], list[list[str]]]:
    level = f"{result.spec.confidence:.0%}"
    head = ["strategy", "pipeline", "run", "predict", "missing", *(f"{m.name} ({level} CI)"
                                                                   for m in result.spec.metrics)]
    body = [[run.name, str(run.pipeline.name), str(run.run_id), f"{run.stage}.{run.column}",
             f"{result.missing(run)} of {len(result.items)}",
             *(_fmt(result.intervals[m.name][run.name]) for m in result.spec.metrics)] for run in result.runs]
    return head, body


def markdown(result: Result) -> str:
    from retort.report import to_markdown

    text = to_markdown(result.comparison, cost_rows(result), spec=result.spec_path, title=_title(result),
                       missing=_missing(result), metric_name=result.primary)
    head, body = _detail_rows(result)

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = [text.rstrip("\n"), "", "## Strategies and all metrics", "",
           "| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
    out += ["", _method_note(result), ""]
    return "\n".join(out)


def _method_note(result: Result) -> str:
    corpus = [m.name for m in result.spec.metrics if m.name not in result.scores]
    note = ("Missing: items with no usable prediction (a failed call or an answer that did not parse); they "
            "score 0. Several predictions for one item are reduced to their majority.")
    if corpus:
        note += (f" {', '.join(corpus)} is corpus-level: its interval resamples items and recomputes it "
                 f"({', '.join(str(result.resamples[m]) for m in corpus)} resamples).")
    return note


def _title(result: Result) -> str:
    return f"Comparison: {result.spec.name}"


def to_json_text(result: Result) -> str:
    from retort.report import to_json

    data = json.loads(to_json(result.comparison, cost_rows(result), spec=result.spec_path, title=_title(result),
                              missing=_missing(result), metric_name=result.primary))
    data["compare"] = _details(result)
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def html_page(result: Result) -> str:
    import html

    from retort.report import to_html

    page = to_html(result.comparison, cost_rows(result), spec=result.spec_path, title=_title(result),
                   missing=_missing(result), metric_name=result.primary)
    head, body = _detail_rows(result)
    numeric = {2, 4, *range(5, len(head))}
    th = "".join(f'<th{" class=n" if i in numeric else ""}>{html.escape(h)}</th>' for i, h in enumerate(head))
    rows = "".join("<tr>" + "".join(
        f'<td class="{"n" if i in numeric else "name" if i == 0 else ""}">{html.escape(c)}</td>'
        for i, c in enumerate(row)) + "</tr>" for row in body)
    section = ('<section id="strategies"><h2>Strategies and all metrics</h2>'
               f'<p class="sub">{html.escape(_method_note(result))}</p>'
               f'<div class="table-wrap"><table id="table-metrics"><thead><tr>{th}</tr></thead>'
               f"<tbody>{rows}</tbody></table></div></section>")
    return page.replace("<footer>", section + _disagreements_html(result) + "<footer>", 1)


def _disagreements_html(result: Result, per_pair: int = DISAGREEMENTS_SHOWN) -> str:
    """For each pair, the items they answer differently: the text, each one's answer, the reference."""
    import html

    def e(value: Any) -> str:
        return "\u2014" if value is None else html.escape(str(value))

    parts = []
    names = [run.name for run in result.runs]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rows = disagreements(result, a, b)
            if not rows:
                continue
            body = "".join(f'<tr><td class="n">{e(r["item_id"])}</td><td>{e(r["text"])}</td><td>{e(r[a])}</td>'
                           f'<td>{e(r[b])}</td><td>{e(r["reference"])}</td></tr>' for r in rows[:per_pair])
            more = (f'<p class="sub">{len(rows) - per_pair} more: retort compare {e(result.spec.name)} '
                    f"--disagree {html.escape(a)} {html.escape(b)}</p>" if len(rows) > per_pair else "")
            parts.append(f"<h3>{e(a)} vs {e(b)}: {len(rows)} items</h3><div class=\"table-wrap\"><table>"
                         f'<thead><tr><th class="n">item</th><th>text</th><th>{e(a)}</th><th>{e(b)}</th>'
                         f"<th>reference</th></tr></thead><tbody>{body}</tbody></table></div>{more}")
    if not parts:
        return ""
    return '<section id="disagreements"><h2>Where strategies disagree</h2>' + "".join(parts) + "</section>"


def write_reports(result: Result, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "json": out / "report.json", "html": out / "report.html"}
    paths["md"].write_text(markdown(result), encoding="utf-8")
    paths["json"].write_text(to_json_text(result) + "\n", encoding="utf-8")
    paths["html"].write_text(html_page(result), encoding="utf-8")
    return paths


def render(result: Result, console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from retort.report import render_terminal

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 140  # a log or a pipe: wide enough that the tables do not fold
    render_terminal(result.comparison, cost_rows(result), spec=result.spec_path, title=_title(result),
                    missing=_missing(result), metric_name=result.primary, console=console)
    head, body = _detail_rows(result)
    keep = list(range(len(head)))
    if console.width < 110:  # narrow: drop pipeline, run and predict, keep the numbers readable
        keep = [0, *range(4, len(head))]
    table = Table(title="Strategies and all metrics", title_style="bold", box=box.SIMPLE_HEAD)
    for i in keep:
        table.add_column(escape(head[i]), justify="right" if i >= 4 or i == 2 else "left",
                         overflow="fold", no_wrap=i >= 4, min_width=min(18, max(len(r[0]) for r in body)) if not i
                         else None)
    for row in body:
        table.add_row(*(escape(row[i]) for i in keep))
    console.print(table)


def _print_disagreements(rows: list[dict[str, Any]], a: str, b: str, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False, default=str))
        return
    if fmt == "md":
        def cell(v: Any) -> str:
            return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")

        print(f"| item | text | {cell(a)} | {cell(b)} | reference |\n|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(cell(r[k]) for k in ("item_id", "text", a, b, "reference")) + " |")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(rows)} items on which {escape(a)} and {escape(b)} disagree", title_justify="left")
    for col in ("item", "text", a, b, "reference"):
        table.add_column(escape(col), overflow="fold", max_width=70 if col == "text" else 30)
    for r in rows:
        table.add_row(*("—" if r[k] is None else escape(str(r[k])) for k in ("item_id", "text", a, b, "reference")))
    Console().print(table)


# --------------------------------------------------------------------------- the command


def run_comparison(workspace: Any, spec_path: Path, cache: Any, *, limit: int | None = None,
                   model_targets: dict[str, str] | None = None, max_retries: int = 5, progress: bool = True,
                   log: Callable[[str], None] | None = None, **data: Any) -> Result:
    """`data`: input_path, columns, overrides, sample, seed (see Comparer)."""
    spec, src = load_comparison(spec_path)
    comparer = Comparer(workspace, spec, src, cache, limit=limit, model_targets=model_targets,
                        max_retries=max_retries, progress=progress, log=log, **data)
    result = comparer.run()
    result.spec_path = _short(spec_path)
    record(result, cache)
    return result


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
    from retort.cli import collector_for_runs, name_values

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
        _print_disagreements(disagreements(result, a, b), a, b, args.format)
    elif args.format == "md":
        print(paths["md"].read_text(encoding="utf-8"), end="")
    elif args.format == "json":
        print(paths["json"].read_text(encoding="utf-8"), end="")
    elif args.format == "html":
        print(paths["html"].read_text(encoding="utf-8"), end="")
    else:
        render(result)
    print(f"reports: {_short(paths['md'])}, {paths['json'].name}, {paths['html'].name}; per item: "
          f"retort show compare_items --where \"comparison = '{spec.name}'\"", file=sys.stderr)
    return 0
