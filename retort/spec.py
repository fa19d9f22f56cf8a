"""Pipeline specs: YAML → pydantic models, with errors that name file, line and field.

The YAML is composed once into nodes so every value keeps its line; pydantic's
error locations are mapped back to those lines. `${VAR:-default}` is expanded
in every string before validation. `--set a.b=c` edits the raw data first, so
an override is validated exactly like the file.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from retort.errors import SpecError

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
RESERVED = frozenset({"calls", "runs", "failures", "metrics", "embeddings", "compare_items"})  # tables in main


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---------------------------------------------------------------- models
#
# A model entry is one of five kinds, chosen by `backend` (default: local). Each kind declares only
# the settings its backend reads, so a setting of another backend is refused when the pipeline loads
# (with its line), and the JSON Schema offers an editor each backend's own fields.

Concurrency = Annotated[int | None, Field(None, ge=1, description="calls in flight at once")]
StructuredOutput = Annotated[Literal["json_schema", "json_object"] | None, Field(
    None, description="how the model takes a JSON schema: json_schema (OpenAI, vLLM), json_object (llama.cpp)")]


class ModelSpec(_Strict):
    """What every model entry takes, whichever backend serves it: the runner reads these (rate limits,
    waits, prices, the cache identity), never the backend. `ModelSpec()` is the embedded default model."""

    backend: Literal["local", "openai", "vllm", "langchain", "scripted"] = "local"
    identity: str | None = Field(None, description="what enters the cache key; defaults per backend")
    rpm: float | None = Field(None, gt=0, description="requests per minute budget")
    tpm: float | None = Field(None, gt=0, description="tokens per minute budget")
    max_retry_after: float | None = Field(None, ge=0, description="seconds; a longer Retry-After fails the call "
                                                                 "(default 120)")
    price_input: float | None = Field(None, ge=0, description="USD per million prompt tokens")
    price_output: float | None = Field(None, ge=0, description="USD per million completion tokens")


class LocalModel(ModelSpec):
    """`backend: local`: the embedded llama.cpp model, one call at a time (docs/local.md)."""

    backend: Literal["local"] = "local"
    model_path: str | None = Field(None, description="a GGUF file; default: the packaged SmolLM2")


class OpenAIModel(ModelSpec):
    """`backend: openai`: any OpenAI-compatible endpoint (docs/http.md)."""

    backend: Literal["openai"]
    model: str | None = Field(None, description="the served model name (default: the one the endpoint serves)")
    base_url: str | list[str] | None = Field(None, description="endpoint, or several replicas "
                                                                "(default https://api.openai.com/v1)")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key")
    max_concurrency: Concurrency = None
    timeout: float | None = Field(None, gt=0, description="seconds per request (default 60)")
    extra_body: dict[str, Any] | None = Field(None, description="sent with every request")
    transport: Literal["auto", "fast", "aiohttp", "sdk"] | None = Field(
        None, description="the HTTP client: fast (retort's; auto), aiohttp, sdk")
    max_response_mb: float | None = Field(None, gt=0, description="fast transport: cap on a response body")
    structured_output: StructuredOutput = None


class VLLMModel(ModelSpec):
    """`backend: vllm`: vLLM in this process (docs/vllm.md)."""

    backend: Literal["vllm"]
    model: str | None = Field(None, description="a Hugging Face model id or a local path")
    engine_args: dict[str, Any] | None = Field(None, description="keyword arguments of vllm.LLM")
    max_concurrency: Concurrency = None
    chunk_size: int | None = Field(None, ge=1, description="requests per LLM.chat call")


class LangChainModel(ModelSpec):
    """`backend: langchain`: a langchain-core chat model (docs/langchain.md)."""

    backend: Literal["langchain"]
    factory: Any = Field(None, json_schema_extra={"type": "string"},
                         description="module:attr naming a chat model, or a function returning one")
    model: str | None = Field(None, description="passed to the factory when it takes `model`")
    max_concurrency: Concurrency = None
    structured_output: StructuredOutput = None
    extra_body: dict[str, Any] | None = Field(None, description="bound to the model's calls")

    @field_validator("factory")
    @classmethod
    def _module_attr(cls, v: Any) -> Any:
        if isinstance(v, str) and ":" not in v:
            raise ValueError(f"expected module:attr, got {v!r}")
        if isinstance(v, (int, float, bool, list, dict)):  # a chat model object is fine from Python
            raise ValueError(f"expected module:attr, got {v!r}")
        return v


class ScriptedModel(ModelSpec):
    """`backend: scripted`: replies from a list or a function, for tests and exact logic."""

    backend: Literal["scripted"]
    replies: list[str] | None = Field(None, description="the replies, in turn")
    function: str | None = Field(None, description="module:function taking a Request, returning the reply")
    cycle: bool | None = Field(None, description="start the replies again when they run out")
    delay: float | None = Field(None, ge=0, description="seconds each call takes")
    max_concurrency: Concurrency = None

    @model_validator(mode="after")
    def _one_source(self) -> ScriptedModel:
        if self.replies is not None and self.function is not None:
            raise ValueError("give `replies` or `function`, not both")
        return self


MODEL_KINDS: dict[str, type[ModelSpec]] = {"local": LocalModel, "openai": OpenAIModel, "vllm": VLLMModel,
                                          "langchain": LangChainModel, "scripted": ScriptedModel}


def _backend_of(value: Any) -> str | None:
    kind = value.get("backend", "local") if isinstance(value, dict) else getattr(value, "backend", None)
    return f"backend:{kind}" if isinstance(kind, str) and kind in MODEL_KINDS else None


AnyModel = Annotated[
    Annotated[LocalModel, Tag("backend:local")] | Annotated[OpenAIModel, Tag("backend:openai")]
    | Annotated[VLLMModel, Tag("backend:vllm")] | Annotated[LangChainModel, Tag("backend:langchain")]
    | Annotated[ScriptedModel, Tag("backend:scripted")],
    Discriminator(_backend_of, custom_error_type="unknown_backend",
                  custom_error_message=f"unknown backend; expected one of: {', '.join(MODEL_KINDS)}"),
]



def _target(value: Any) -> Any:
    """`teacher: openai:gpt-4o-mini`: a model entry may be written as a `--model` target."""
    if not isinstance(value, str):
        return value
    from retort.backends import parse_target
    from retort.errors import UserError

    try:
        return parse_target(value)
    except UserError as err:
        raise ValueError(str(err).removeprefix("--model target ")) from None


ModelEntry = Annotated[AnyModel, BeforeValidator(_target, json_schema_input_type=Union[str, AnyModel])]  # noqa: UP007

# ---------------------------------------------------------------- parse rules
#
# A prompt stage's `parse:` is one of six kinds, named by its one kind key (`{choice: [...]}`) or, for
# the kinds that need no options, by a bare word (`parse: json`). A short value stands for the kind's
# main option (`{regex: "..."}` is `{regex: {pattern: "..."}}`), and sibling keys are options too
# (`{choice: [a, b], default: c}`). Everything a rule can get wrong without running it is checked here,
# so a typo is an error with its line when the pipeline loads; parsers.py compiles the checked rule.

_NON_WORD = re.compile(r"[\W_]+")


def choice_key(option: str) -> str:
    """How a choice option is matched: case, punctuation and spacing do not count."""
    return _NON_WORD.sub(" ", option).strip().casefold()


class _Options(_Strict):
    pass


class TextOptions(_Options):
    pass


class RegexOptions(_Options):
    pattern: str = Field(description="a Python regex; named groups become columns, else group 1 (or the match)")
    flags: str = Field("", description="letters from imsx: ignore case, dot matches newline, multiline, verbose")

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v:
            raise ValueError(f"pattern must be a non-empty string, got {v!r}")
        return v

    @field_validator("flags", mode="before")
    @classmethod
    def _flags(cls, v: Any) -> Any:
        if v is None:
            return ""
        if not isinstance(v, str) or any(c not in "imsx" for c in v):
            raise ValueError(f"flags must be letters from 'imsx', got {v!r}")
        return v

    @model_validator(mode="after")
    def _compiles(self) -> RegexOptions:
        try:
            re.compile(self.pattern, sum(_REGEX_FLAGS[c] for c in set(self.flags)))
        except re.error as err:
            raise ValueError(f"invalid pattern {self.pattern!r}: {err}") from None
        return self


_REGEX_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE}


class JsonOptions(_Options):
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON Schema; its properties "
                                                                             "become columns")
    model: str | None = Field(None, description="module:Class, a pydantic model whose schema is used")

    @field_validator("schema_", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"schema must be a mapping (a JSON Schema), got {type(v).__name__}")
        return v

    @model_validator(mode="after")
    def _one(self) -> JsonOptions:
        if self.schema_ is not None and self.model is not None:
            raise ValueError("give a schema or a model, not both")
        return self


class ChoiceOptions(_Options):
    options: list[str] = Field(description="the labels; the output is one of them, as spelled here")
    default: str | None = Field(None, description="the output when no option is found (default: a parse error)")

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ValueError(f"options must be a non-empty list, got {v!r}")
        spelled: list[str] = []
        seen: dict[str, str] = {}
        for option in v:
            if isinstance(option, bool):  # YAML 1.1 reads yes/no/on/off as booleans
                raise ValueError(f"option {option!r} was read as a boolean; quote it, for example 'yes'")
            if not isinstance(option, str | int | float):
                raise ValueError(f"options must be strings, got {option!r}")
            text = str(option).strip()
            key = choice_key(text)
            if not key:
                raise ValueError(f"option {text!r} has no letters or digits")
            if key in seen:
                raise ValueError(f"options {seen[key]!r} and {text!r} read the same once case and punctuation "
                                 "are ignored")
            seen[key] = text
            spelled.append(text)
        return spelled

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            raise ValueError(f"default must be a string or null, got {v!r}")
        return v


class AnswerOptions(_Options):
    rules: Literal["lenient", "lbt"] = Field(
        "lenient", description="lenient: the last boxed answer or answer marker; lbt: the LbT paper's reading")
    fallback_last_number: bool | None = Field(None, description="rules lenient: else the last number "
                                                                "(default true)")

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v: Any) -> Any:
        if v not in ("lenient", "lbt"):
            raise ValueError(f"rules must be lenient or lbt, got {v!r}")
        return v

    @field_validator("fallback_last_number", mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"fallback_last_number must be true or false, got {v!r}")
        return v

    @model_validator(mode="after")
    def _lenient_only(self) -> AnswerOptions:
        if self.rules == "lbt" and self.fallback_last_number is not None:
            raise ValueError("fallback_last_number is an option of rules: lenient; rules: lbt falls back to the "
                             "last line, as the LbT reference does")
        return self


class FunctionOptions(_Options):
    name: str = Field(description="module:attr, a function from text to a dict of columns (or a string)")
    columns: list[str] | None = Field(None, description="the columns it returns (default: the stage's output)")

    @field_validator("name", mode="before")
    @classmethod
    def _module_attr(cls, v: Any) -> Any:
        if not isinstance(v, str) or ":" not in v:
            raise ValueError(f"function must be 'module:attr', got {v!r}")
        return v

    @field_validator("columns", mode="before")
    @classmethod
    def _distinct(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v)
                              or len(set(v)) != len(v)):
            raise ValueError(f"columns must be a list of distinct names, got {v!r}")
        return v


def _short(accepts: Any) -> BeforeValidator:
    """A rule's kind key as the JSON Schema shows it: its short forms too (`_fold` expands them)."""
    return BeforeValidator(lambda v: v, json_schema_input_type=accepts)


class ParseRule(_Strict):
    """One `parse:` kind. `kind` names its key; `primary` is the option a short value stands for."""

    kind: ClassVar[str]
    primary: ClassVar[str | None] = None
    example: ClassVar[str] = ""

    @classmethod
    def field(cls) -> str:
        return next(name for name, f in cls.model_fields.items() if (f.alias or name) == cls.kind)

    @property
    def options(self) -> Any:
        """The kind's options model (RegexOptions for a RegexRule, ...)."""
        return getattr(self, self.field())

    @model_validator(mode="before")
    @classmethod
    def _fold(cls, data: Any) -> Any:
        """`{kind: short, option: x}` → `{kind: {primary: short, option: x}}`."""
        if not isinstance(data, dict) or cls.kind not in data:
            return data
        options_type = cls.model_fields[cls.field()].annotation
        assert isinstance(options_type, type)
        allowed = {f.alias or name for name, f in options_type.model_fields.items()}
        value = data[cls.kind]
        if value is None:
            options = {}
        elif isinstance(value, dict):
            options = dict(value)
        elif isinstance(value, _Options):  # built in Python: TextRule(text=TextOptions())
            options = value.model_dump(exclude_unset=True)
        elif cls.primary is not None:
            options = {cls.primary: value}
        else:
            raise ValueError(f"{cls.kind} takes a mapping of options ({', '.join(sorted(allowed)) or 'none'}), "
                             f"got {value!r}")
        rest = {}
        for key, extra in data.items():
            if key == cls.kind:
                continue
            if key not in allowed:
                rest[key] = extra  # refused as an unknown field, with its own line
            elif key in options:
                raise ValueError(f"{cls.kind}: option {key!r} given twice")
            else:
                options[key] = extra
        if cls.primary is not None and cls.primary not in options:
            raise ValueError(f"{cls.kind} needs {cls.primary!r}, for example {cls.example}")
        return {cls.kind: options, **rest}


class TextRule(ParseRule):
    """`parse: text` (the default): the output column is the stripped completion."""

    kind: ClassVar[str] = "text"
    text: Annotated[TextOptions, _short(TextOptions | None)]


class RegexRule(ParseRule):
    """`{regex: PATTERN}`: named groups become columns."""

    kind: ClassVar[str] = "regex"
    primary: ClassVar[str | None] = "pattern"
    example: ClassVar[str] = '{regex: "Label: (?P<label>\\w+)"}'
    regex: Annotated[RegexOptions, _short(str | RegexOptions)]
    flags: Any = Field(None, exclude=True, description="the same as regex.flags")


class JsonRule(ParseRule):
    """`parse: json`, `{json: {schema: ...}}` or `{json: {model: module:Class}}`."""

    kind: ClassVar[str] = "json"
    json_: Annotated[JsonOptions, _short(JsonOptions | None)] = Field(alias="json")


class ChoiceRule(ParseRule):
    """`{choice: [a, b]}`: the output is one of the options."""

    kind: ClassVar[str] = "choice"
    primary: ClassVar[str | None] = "options"
    example: ClassVar[str] = "{choice: [positive, negative]}"
    choice: Annotated[ChoiceOptions, _short(list[str | int | float] | ChoiceOptions)]
    default: Any = Field(None, exclude=True, description="the same as choice.default")


class AnswerRule(ParseRule):
    """`parse: answer`: a math final answer."""

    kind: ClassVar[str] = "answer"
    answer: Annotated[AnswerOptions, _short(AnswerOptions | None)]


class FunctionRule(ParseRule):
    """`{function: module:attr}`: a Python function parses the text."""

    kind: ClassVar[str] = "function"
    primary: ClassVar[str | None] = "name"
    example: ClassVar[str] = '{function: "module:attr"}'
    function: Annotated[FunctionOptions, _short(str | FunctionOptions)]
    columns: Any = Field(None, exclude=True, description="the same as function.columns")


PARSE_KINDS: dict[str, type[ParseRule]] = {rule.kind: rule for rule in (
    TextRule, RegexRule, JsonRule, ChoiceRule, AnswerRule, FunctionRule)}


def _parse_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = next((key for key in value if key in PARSE_KINDS), None)
    else:
        kind = getattr(value, "kind", None)
    return f"parse:{kind}" if kind else None


def _named_kind(value: Any) -> Any:
    """A bare kind word as its mapping (`json` → `{json: null}`), and a clear word for what is not a rule."""
    kinds = ", ".join(PARSE_KINDS)
    if value is None:
        return {"text": None}
    if isinstance(value, ParseRule):
        return value
    if isinstance(value, str):
        kind = value.strip()
        if kind not in PARSE_KINDS:
            raise ValueError(f"unknown parse kind {kind!r}{_did_you_mean(kind)}; expected one of: {kinds}")
        if PARSE_KINDS[kind].primary is not None:
            raise ValueError(f"{kind!r} needs options, for example {PARSE_KINDS[kind].example}")
        return {kind: None}
    if not isinstance(value, dict):
        raise ValueError(f"expected a parse kind ({kinds}) or a mapping, got {type(value).__name__}")
    named = [key for key in value if key in PARSE_KINDS]
    if len(named) != 1:
        found = ", ".join(map(str, value)) or "nothing"
        hint = _did_you_mean(str(next(iter(value)))) if len(value) == 1 else ""
        raise ValueError(f"expected exactly one parse kind ({kinds}), found: {found}{hint}")
    return value


def _did_you_mean(word: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(PARSE_KINDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_ParseUnion = Annotated[
    Annotated[TextRule, Tag("parse:text")] | Annotated[RegexRule, Tag("parse:regex")]
    | Annotated[JsonRule, Tag("parse:json")] | Annotated[ChoiceRule, Tag("parse:choice")]
    | Annotated[AnswerRule, Tag("parse:answer")] | Annotated[FunctionRule, Tag("parse:function")],
    Discriminator(_parse_kind),
]
ParseSpec = Annotated[_ParseUnion, BeforeValidator(
    _named_kind, json_schema_input_type=Union[Literal["text", "json", "answer"], _ParseUnion])]  # noqa: UP007


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def as_model(value: dict[str, Any]) -> ModelSpec:
    """Model settings given as a mapping (a pipeline entry merged with a `--model` target) as the typed
    model of their backend; raises pydantic's ValidationError (`model_error` words it)."""
    return _adapter(AnyModel).validate_python(value)  # type: ignore[no-any-return]


def as_rule(value: Any) -> ParseRule:
    """A `parse:` value given from Python as its typed rule; raises ValidationError (`rule_error` words it)."""
    return _adapter(ParseSpec).validate_python(value)  # type: ignore[no-any-return]


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
    parse: ParseSpec = Field(default_factory=lambda: TextRule(text=TextOptions()),
                             description="how the completion becomes columns")
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
    models: dict[str, ModelEntry] = Field(default_factory=dict, description="settings, or a target as "
                                          "--model takes it: local, URL[#model], openai:MODEL, vllm:MODEL, ...")
    stages: list[Stage] = Field(min_length=1)
    strict: bool = Field(False, description="a run whose summary warns (a stage with many parse errors, an "
                                            "empty table) exits non-zero, as `retort run --strict` does")

    def model_for(self, name: str) -> ModelSpec:
        if name in self.models:
            return self.models[name]
        if name == "default":
            return LocalModel()
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


def validation_error(exc: ValidationError, data: dict[str, Any], src: Source,
                     at: tuple[Any, ...] = ()) -> SpecError:
    """Pydantic's first error as one SpecError: file, line, field path (stages by name too), what was expected.
    `at` is where in `data` the validated value sits."""
    err = exc.errors()[0]
    loc = _real_loc((*at, *err["loc"]), data)
    label = _dotted(loc)
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = data.get("stages") or []
        if loc[1] < len(stages) and isinstance(stages[loc[1]], dict) and stages[loc[1]].get("name"):
            label = label.replace(f"stages[{loc[1]}]", f"stages[{loc[1]}] ({stages[loc[1]]['name']})", 1)
    message = _message(err)
    if err["type"] == "unknown_backend" and isinstance(err.get("input"), dict):
        loc, label, message = (*loc, "backend"), f"{label}.backend", \
            f"unknown backend {err['input'].get('backend')!r}; expected one of: {', '.join(MODEL_KINDS)}"
    elif err["type"] == "unknown_backend":
        message = f"expected a mapping of model settings (`backend:` one of {', '.join(MODEL_KINDS)}, and its own)"
    elif err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "models":
        message = _not_a_setting(str(loc[2]), data["models"][loc[1]])
    else:
        message = _option_message(err, loc) or message
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more error{'s' * (more > 1)})"
    return SpecError(message, file=src.file, line=src.line(loc), field=label or None)


def model_error(exc: ValidationError, name: str, entry: dict[str, Any]) -> SpecError:
    """A model's settings as built (its pipeline entry and a `--model` target) that its backend refuses."""
    return validation_error(exc, {"models": {name: entry}}, Source(""), ("models", name))


def rule_error(exc: ValidationError, value: Any) -> str:
    """A `parse:` value's first error as words (for a rule given from Python, with no file to point at)."""
    err = exc.errors()[0]
    loc = _real_loc(tuple(err["loc"]), value)
    option = _option_message(err, loc)
    if option:
        return option
    return f"{_dotted(loc)}: {_message(err)}" if loc else _message(err)


def _real_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union tags (`prompt`, `backend:openai`, `parse:choice`, `function-after[...]`) that
    are not keys of the data."""
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in ("prompt", "sql", "python", "embed"):
        loc = loc[:2] + loc[3:]  # the union's tag, not a key
    out: list[Any] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in ("from_", "with_", "schema_", "json_"):
            key = part.rstrip("_")
            out.append(key)
            node = node.get(key)
        elif not isinstance(node, (dict, list)):
            break
        elif isinstance(part, str) and ("[" in part or part.startswith(_TAGS) or part in ("str", "dict[str,any]")):
            continue
        else:
            out.append(part)  # a missing key: name it
            break
    return tuple(out)


_TAGS = ("backend:", "parse:")  # the prefixes of the model and parse unions' tags


def _not_a_setting(key: str, entry: dict[str, Any]) -> str:
    """A model entry's key its backend does not take: say which backends take it, and what this one takes."""
    kind = entry.get("backend", "local")
    own = [name for name in MODEL_KINDS[kind].model_fields if name not in ModelSpec.model_fields]
    elsewhere = [name for name, cls in MODEL_KINDS.items() if key in cls.model_fields]
    which = f"a setting of backend {', '.join(elsewhere)}, not {kind}" if elsewhere else f"not a setting of {kind}"
    return f"{which} (backend {kind} takes {', '.join(own) or 'no settings'} of its own)"


def _option_message(err: Any, loc: tuple[Any, ...]) -> str | None:
    """An unknown option of a `parse:` rule, named with the options its kind takes."""
    kind = next((str(p)[6:] for p in err["loc"] if str(p).startswith("parse:")), None)
    if err["type"] != "extra_forbidden" or kind is None or not loc:
        return None
    options = PARSE_KINDS[kind].model_fields[PARSE_KINDS[kind].field()].annotation
    assert isinstance(options, type) and issubclass(options, BaseModel)
    names = sorted(f.alias or name for name, f in options.model_fields.items())
    return f"{kind}: unknown option {loc[-1]!r}; expected: {', '.join(names) or 'none'}"


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
    _params_allowed(schema)
    return schema


# A stage value that is exactly `{{ params.x }}` is replaced by the param before validation (with_params).
_PARAM_SCHEMA = {"type": "string", "pattern": _PARAM_REF.pattern.replace("^", r"^\s*").replace("$", r"\s*$"),
                 "description": "a param of the pipeline, `{{ params.NAME }}`, taking its value"}
_META = ("title", "description", "default")


def _params_allowed(schema: dict[str, Any]) -> None:
    """Let the schema take `{{ params.x }}` wherever with_params puts a param's value (a stage's values, but
    not its name or its template, SQL or prompt), so an editor does not flag `{choice: "{{ params.labels }}"}`."""
    stages = {"PromptStage", "EmbedStage", "PythonStage", "SamplingParams", "ModelColumn"}
    for name, definition in schema["$defs"].items():
        if name not in stages and not name.endswith(("Rule", "Options")):
            continue
        for key, prop in definition.get("properties", {}).items():
            if key in ("name", "template", "sql", "prompt", "python", "embed", "description") or "$ref" in prop:
                continue  # a $ref (a nested model) gets the same treatment in its own definition
            meta = {k: prop.pop(k) for k in _META if k in prop}
            definition["properties"][key] = {"anyOf": [prop, _PARAM_SCHEMA], **meta}
