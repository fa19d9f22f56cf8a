"""The comparison spec: `comparisons/NAME.yaml` as pydantic models, checked with the file, line and field.

A comparison names a dataset, the strategies (a pipeline, or a variant of one
through `set:` overrides and `model:` targets, exactly like `retort run
--set/--model`), the column each strategy predicts, the reference column and
the metrics (the first is primary). What can be checked without the pipelines
is checked here; that a strategy's pipeline has the stage it predicts from is
checked when the run is planned (run.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retort.errors import NotFoundError
from retort.spec import IDENT, InputSpec, Source, read_yaml, validation_error

__all__ = ["ComparisonSpec", "MetricSpec", "StrategySpec", "find_comparison", "json_schema", "load_comparison",
           "split_predict"]

FOLDER = "comparisons"
STRATEGY_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"


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
        if not split_predict(predict):
            raise src.error(f"expected STAGE.COLUMN (got {predict!r})", where)
    names = [m.name for m in spec.metrics]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise src.error(f"metric {n!r} is listed twice", ("metrics", i))
    return spec, src


def split_predict(value: str) -> tuple[str, str] | None:
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
