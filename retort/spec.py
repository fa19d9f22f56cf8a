"""Pipeline specs: YAML → pydantic models, with errors that name file, line and field.

The YAML is composed once into nodes so every value keeps its line; pydantic's
error locations are mapped back to those lines. `${VAR:-default}` is expanded
in every string before validation. `--set a.b=c` edits the raw data first, so
an override is validated exactly like the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from retort.errors import SpecError

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
RESERVED = frozenset({"calls", "runs", "failures", "metrics", "embeddings", "compare_items"})  # tables in main


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Strict):
    """A named model: which backend serves it and how. Unused keys for a backend are rejected there."""

    backend: Literal["local", "openai", "scripted", "vllm", "langchain"] = "local"
    model: str | None = Field(None, description="served model name (openai, vllm)")
    base_url: str | list[str] | None = Field(None, description="endpoint, or several replicas")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key")
    identity: str | None = Field(None, description="what enters the cache key; defaults per backend")
    max_concurrency: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    extra_body: dict[str, Any] | None = None
    transport: Literal["auto", "fast", "aiohttp", "sdk"] | None = Field(
        None, description="openai's HTTP client: fast (retort's; auto), aiohttp, sdk")
    max_response_mb: float | None = Field(None, gt=0, description="openai, fast transport: cap on a response body")
    structured_output: Literal["json_schema", "json_object"] | None = Field(
        None, description="how the server takes a JSON schema: OpenAI/vLLM json_schema, llama.cpp json_object")
    model_path: str | None = None
    replies: list[str] | None = None
    function: str | None = None
    cycle: bool | None = None
    delay: float | None = Field(None, ge=0, description="scripted: seconds each call takes")
    factory: str | None = Field(None, description="langchain: module:attr returning a BaseChatModel")
    engine_args: dict[str, Any] | None = Field(None, description="vllm: keyword arguments of vllm.LLM")
    chunk_size: int | None = Field(None, ge=1, description="vllm: requests per LLM.chat call")
    rpm: float | None = Field(None, gt=0, description="requests per minute budget")
    tpm: float | None = Field(None, gt=0, description="tokens per minute budget")
    max_retry_after: float | None = Field(None, ge=0, description="seconds; a longer Retry-After fails the call "
                                                                 "(default 120)")
    price_input: float | None = Field(None, ge=0, description="USD per million prompt tokens")
    price_output: float | None = Field(None, ge=0, description="USD per million completion tokens")


class InputSpec(_Strict):
    path: str = Field(description="JSONL, CSV, Parquet or a JSON list")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="pipeline column: source column or DuckDB expression")
    limit: int | None = Field(None, ge=1)


class SamplingParams(_Strict):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] | None = None
    extra_body: dict[str, Any] | None = None


class ModelColumn(_Strict):
    column: str


class _Stage(_Strict):
    name: str = Field(pattern=IDENT)
    description: str | None = None


class PromptStage(_Stage):
    kind: ClassVar[str] = "prompt"
    from_: str = Field("input", alias="from")
    where: str | None = Field(None, description="SQL filter over the `from` table")
    prompt: str | None = Field(None, description="template name in prompts/ (or inline `template`)")
    template: str | None = None
    model: str | ModelColumn = "default"
    samples: int = Field(1, ge=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    parse: str | dict[str, Any] = "text"
    output: str | None = Field(None, pattern=IDENT, description="output column; defaults to the stage name")
    reask: int = Field(0, ge=0, description="extra tries for a sample whose output does not parse")

    @field_validator("template")
    @classmethod
    def _one_template(cls, v: str | None, info: Any) -> str | None:
        if v is not None and info.data.get("prompt"):
            raise ValueError("give `prompt` or `template`, not both")
        return v

    @model_validator(mode="after")
    def _a_template(self) -> PromptStage:
        if self.prompt is None and self.template is None:
            raise ValueError("a prompt stage needs `prompt` (a template in prompts/) or an inline `template`")
        return self


class SqlStage(_Stage):
    kind: ClassVar[str] = "sql"
    sql: str


class PythonStage(_Stage):
    kind: ClassVar[str] = "python"
    python: str = Field(description="evaluator name in evaluators/")
    from_: str | None = Field(None, alias="from")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class EmbedStage(_Stage):
    kind: ClassVar[str] = "embed"
    embed: str = Field(description="the column to embed")
    from_: str = Field("input", alias="from")
    where: str | None = Field(None, description="SQL filter over the `from` table")
    model: str = "default"
    output: str = Field("embedding", pattern=IDENT)


def _stage_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        for kind in ("sql", "python", "embed"):
            if kind in value:
                return kind
        return "prompt"
    return getattr(value, "kind", None)


Stage = Annotated[
    Annotated[PromptStage, Tag("prompt")] | Annotated[SqlStage, Tag("sql")]
    | Annotated[PythonStage, Tag("python")] | Annotated[EmbedStage, Tag("embed")],
    Discriminator(_stage_kind),
]


class Pipeline(_Strict):
    name: str | None = None
    description: str | None = None
    input: InputSpec
    params: dict[str, Any] = Field(default_factory=dict, description="values templates see as `params`")
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    stages: list[Stage] = Field(min_length=1)
    strict: bool = Field(False, description="a run whose summary warns (a stage with many parse errors, an "
                                            "empty table) exits non-zero, as `retort run --strict` does")

    def model_for(self, name: str) -> ModelSpec:
        if name in self.models:
            return self.models[name]
        if name == "default":
            return ModelSpec(backend="local")
        raise KeyError(name)


# ---------------------------------------------------------------- loading

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class Source:
    """Where each value of a YAML document sits: path tuple → line (1-based)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[tuple[Any, ...], int] = {}

    def line(self, loc: tuple[Any, ...]) -> int | None:
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def error(self, message: str, loc: tuple[Any, ...] = ()) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(loc), field=_dotted(loc) or None)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _record(node: yaml.Node, path: tuple[Any, ...], src: Source) -> None:
    src.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            src.lines[(*path, key.value)] = key.start_mark.line + 1
            _record(value, (*path, key.value), src)
            src.lines[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, (*path, i), src)


def _interpolate(value: Any, path: tuple[Any, ...], src: Source) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise src.error(f"environment variable {name} is not set (write ${{{name}:-default}})", path)
            return default
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, k), src) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, i), src) for i, v in enumerate(value)]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected key.path=value")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"--set {text!r}: the value is not valid YAML ({problem}); quote it to pass text") from None


def apply_override(data: dict[str, Any], keys: list[str], value: Any, src: Source) -> None:
    """`stages.NAME.x` addresses a stage by name as well as by index."""
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = next((j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == key), None)
            if index is None and key.isdigit() and int(key) < len(node):
                index = int(key)
            if index is None:
                raise SpecError(f"--set {'.'.join(keys)}: no item {key!r} in {'.'.join(keys[:i]) or 'spec'}",
                                file=src.file)
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise SpecError(f"--set {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping", file=src.file)


def read_yaml(path: Path, expected: str = "a mapping with `input` and `stages`") -> tuple[dict[str, Any], Source]:
    """A user's YAML file as data, with every value's line recorded and `${VAR:-default}` expanded."""
    src = Source(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f" ({context} at line {start.line + 1})"
        raise SpecError(f"malformed YAML: {problem}", file=str(path),
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise SpecError(f"expected {expected}", file=str(path), line=1)
    _no_duplicate_keys(node, str(path))
    _record(node, (), src)
    return _interpolate(data, (), src), src


def _no_duplicate_keys(node: Any, file: str) -> None:
    """YAML lets a later key silently replace an earlier one; a spec must not lose a setting that way."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = getattr(key, "value", None)
            if name in seen:
                raise SpecError(f"duplicate key {name!r} (first at line {seen[name]})", file=file,
                                line=key.start_mark.line + 1)
            seen[name] = key.start_mark.line + 1
            _no_duplicate_keys(value, file)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, file)


def load_pipeline(path: Path | str, overrides: list[str] = ()) -> tuple[Pipeline, Source]:  # type: ignore[assignment]
    path = Path(path)
    data, src = read_yaml(path)
    for override in overrides:
        keys, value = parse_override(override)
        apply_override(data, keys, value, src)
    data.setdefault("name", path.stem)
    if isinstance(data.get("stages"), list):
        params = data.get("params") or {}
        data["stages"] = [{k: v if k in ("template", "sql", "prompt") else with_params(v, params)
                           for k, v in stage.items()} if isinstance(stage, dict) else stage
                          for stage in data["stages"]]
    return validate(data, src), src


_PARAM_REF = re.compile(r"^\{\{\s*params\.([A-Za-z_][\w.]*)\s*\}\}$")


def with_params(value: Any, params: dict[str, Any]) -> Any:
    """A stage value that is exactly `{{ params.x }}` becomes that param, keeping its type.

    So `samples: "{{ params.k }}"`, `parse: {choice: "{{ params.labels }}"}` and
    `with: {margin: "{{ params.min_margin }}"}` follow one `--set params.x=...`.
    """
    if isinstance(value, str):
        m = _PARAM_REF.match(value.strip())
        if m:
            node: Any = params
            for part in m.group(1).split("."):
                node = node[part] if isinstance(node, dict) and part in node else None
            return node if node is not None else value
        return value
    if isinstance(value, dict):
        return {k: with_params(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [with_params(v, params) for v in value]
    return value


def validate(data: dict[str, Any], src: Source) -> Pipeline:
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data, src) from None
    names = [s.name for s in pipeline.stages]
    for i, name in enumerate(names):
        if name in RESERVED:
            raise src.error(f"stage name {name!r} is taken by retort's own table of that name; choose another",
                            ("stages", i, "name"))
        if name in names[:i] or name == "input":
            raise src.error(f"stage name {name!r} is used twice (`input` is the dataset)", ("stages", i, "name"))
    return pipeline


def validation_error(exc: ValidationError, data: dict[str, Any], src: Source) -> SpecError:
    """Pydantic's first error as one SpecError: file, line, field path (stages by name too), what was expected."""
    err = exc.errors()[0]
    loc = _real_loc(tuple(err["loc"]), data)
    label = _dotted(loc)
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = data.get("stages") or []
        if loc[1] < len(stages) and isinstance(stages[loc[1]], dict) and stages[loc[1]].get("name"):
            label = label.replace(f"stages[{loc[1]}]", f"stages[{loc[1]}] ({stages[loc[1]]['name']})", 1)
    message = _message(err)
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more error{'s' * (more > 1)})"
    return SpecError(message, file=src.file, line=src.line(loc), field=label or None)


def _real_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union tags (`prompt`, `function-after[...]`) that are not keys of the data."""
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in ("prompt", "sql", "python", "embed"):
        loc = loc[:2] + loc[3:]  # the union's tag, not a key
    out: list[Any] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in ("from_", "with_"):
            key = part.rstrip("_")
            out.append(key)
            node = node.get(key)
        elif not isinstance(node, (dict, list)):
            break
        elif isinstance(part, str) and ("[" in part or part in ("str", "dict[str,any]")):
            continue
        else:
            out.append(part)  # a missing key: name it
            break
    return tuple(out)


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown field (not allowed here; `retort schema` lists the fields)"
    if kind == "missing":
        return "field required"
    if kind == "value_error":  # our own validators' words, without pydantic's "Value error, "
        return str(msg).removeprefix("Value error, ")
    inp = err.get("input")
    shown = f" (got {inp!r})" if isinstance(inp, (str, int, float, bool)) and len(repr(inp)) < 60 else ""
    return f"{msg[0].lower()}{msg[1:]}{shown}" if msg else kind


def json_schema() -> dict[str, Any]:
    schema = Pipeline.model_json_schema(by_alias=True)
    schema["title"] = "retort pipeline"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
