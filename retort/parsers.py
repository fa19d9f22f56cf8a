"""Output parsers: turn a completion's text into the columns of a prompt stage's row.

A stage's `parse:` field takes short forms, checked into a `spec.ParseRule` when the pipeline loads
(the models and their errors live in spec.py) and compiled here by `build_parser`:

    parse: text                                    # default: <output> = the stripped text
    parse: {regex: "Label: (?P<label>\\w+)"}      # named groups -> columns
    parse: {regex: {pattern: "...", flags: is}}    # i, s, m, x
    parse: json                                    # <output> = the JSON text
    parse: {json: {schema: {...}}}                 # declared properties -> columns
    parse: {json: {model: "module:Class"}}         # a pydantic model, its schema
    parse: {choice: [positive, negative]}          # <output> = one option, as declared
    parse: {choice: {options: [...], default: other}}
    parse: answer                                  # <output> = a math final answer
    parse: {answer: {fallback_last_number: false}}
    parse: {answer: {rules: lbt}}                  # the LbT paper's extraction (first marker, else last line)
    parse: {function: "module:attr", columns: [a, b]}

Sibling keys are options of the kind: `{choice: [a, b], default: c}` is
`{choice: {options: [a, b], default: c}}`.

A malformed rule is a SpecError with its line when the pipeline loads (a rule given from
Python is checked by `rule_of`, with the same words). A completion that does
not parse raises ParseError, which the runner records on the row. Parsers run on
every row (hundreds of thousands), so everything that can be compiled is
compiled once, in `build_parser`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from retort.errors import NotFoundError, ParseError, SpecError, UserError
from retort.mathnorm import extract_answer, lbt_extract, math_equal, normalize_answer
from retort.spec import (
    AnswerOptions,
    ChoiceOptions,
    FunctionOptions,
    JsonOptions,
    ParseRule,
    RegexOptions,
    TextOptions,
    choice_key,
)

if TYPE_CHECKING:
    from retort.workspace import Workspace

__all__ = ["Parser", "build_parser", "extract_answer", "extract_json", "math_equal",
           "normalize_answer"]

ParseFn = Callable[[str], dict[str, Any]]


class Parser:
    """A compiled `parse:` rule: `parser(text) -> {column: value}`, or ParseError.

    `columns` are the columns it produces, in order; `schema` (JSON parsers) and
    `choices` (choice parsers) let a backend constrain its decoding; `identity`
    is a stable description of the rule for run manifests.
    """

    __slots__ = ("_fn", "choices", "columns", "identity", "kind", "schema")

    def __init__(self, kind: str, fn: ParseFn, *, columns: list[str], identity: str,
                 schema: dict[str, Any] | None = None, choices: list[str] | None = None) -> None:
        self.kind = kind
        self.columns = columns
        self.schema = schema
        self.choices = choices
        self.identity = identity
        self._fn = fn

    def __call__(self, text: str) -> dict[str, Any]:
        if text is None:  # an API can answer with no content (a refusal, a tool call)
            raise ParseError("empty completion")
        return self._fn(text)

    def __repr__(self) -> str:
        return f"Parser({self.identity})"


# --- the rule: a checked `spec.ParseRule` ---------------------------------------


def _spec_error(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}" if where else message, field="parse")


def rule_of(spec: ParseRule | str | dict[str, Any] | None, where: str = "") -> ParseRule:
    """The checked rule for a `parse:` value: a pipeline's stages hold one already; a value from Python
    (`ctx.prompt(parse=...)`, a test) is checked here, with the same words as in a pipeline file."""
    if isinstance(spec, ParseRule):
        return spec
    from pydantic import ValidationError

    from retort.spec import as_rule, rule_error

    try:
        return as_rule(spec)
    except ValidationError as exc:
        raise _spec_error(where, rule_error(exc, spec)) from None


def _identity(kind: str, payload: dict[str, Any]) -> str:
    body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return f"{kind} {body.decode()}"


def _import(name: Any, where: str, what: str, workspace: Workspace | None) -> Any:
    if not isinstance(name, str) or ":" not in name:
        raise _spec_error(where, f"{what} must be 'module:attr', got {name!r}")
    # The workspace resolves a module from its evaluators/ folder before sys.path.
    from retort.workspace import import_object

    try:
        return import_object(name, workspace)
    except NotFoundError as err:
        raise NotFoundError(f"{where}: {err}" if where else str(err)) from err
    except (ImportError, AttributeError) as err:
        message = f"cannot import {what} {name!r}: {err}"
        raise NotFoundError(f"{where}: {message}" if where else message) from err
    except UserError:
        raise
    except Exception as err:  # the user's module failed while importing
        raise _spec_error(where, f"importing {name!r} failed: {type(err).__name__}: {err}") from err


# --- text and regex -------------------------------------------------------------

def _build_text(options: TextOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    def parse(text: str) -> dict[str, Any]:
        return {output: text.strip()}

    return Parser("text", parse, columns=[output], identity=_identity("text", {"output": output}))


_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE}


def _short(s: str, limit: int = 60) -> str:
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _build_regex(options: RegexOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    pattern, letters = options.pattern, options.flags
    flags = 0
    for c in letters:
        flags |= _FLAGS[c]
    rx = re.compile(pattern, flags)  # the rule compiled when it was checked
    names = sorted(rx.groupindex, key=rx.groupindex.__getitem__)
    miss = f"regex {_short(pattern)!r} did not match"

    if names:
        def parse(text: str) -> dict[str, Any]:
            m = rx.search(text)
            if m is None:
                raise ParseError(miss)
            return {k: v.strip() if v is not None else None for k, v in m.groupdict().items()}
        columns = names
    else:
        group = 1 if rx.groups else 0

        def parse(text: str) -> dict[str, Any]:
            m = rx.search(text)
            if m is None:
                raise ParseError(miss)
            value = m.group(group)
            return {output: value.strip() if value is not None else None}
        columns = [output]
    identity = _identity("regex", {"pattern": pattern, "flags": "".join(sorted(set(letters))),
                                   "columns": columns})
    return Parser("regex", parse, columns=columns, identity=identity)


# --- json -----------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9]*[ \t]*\n?(.*?)```", re.DOTALL)
_OPENERS = {"{": re.compile(r"\{"), "[": re.compile(r"\[")}
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_DECODER = json.JSONDecoder()
_MISSING = object()
_MAX_STARTS = 64  # opening brackets tried per text: bounds the cost of long prose


def _loads(s: str) -> Any:
    try:
        return orjson.loads(s)
    except orjson.JSONDecodeError:
        try:  # orjson refuses what stdlib accepts: integers past 64 bits, NaN, and (strict=False)
            # raw newlines inside strings, which grammar-constrained llama.cpp output can contain
            return json.loads(s, strict=False)
        except ValueError:
            return _MISSING


def _first_value(text: str, openers: str) -> Any:
    """The first JSON value that starts at one of `openers` in `text`."""
    for opener in openers:
        pos, tries = 0, 0
        rx = _OPENERS[opener]
        while tries < _MAX_STARTS and (m := rx.search(text, pos)) is not None:
            try:
                return _DECODER.raw_decode(text, m.start())[0]
            except ValueError:
                pos, tries = m.start() + 1, tries + 1
    return _MISSING


def extract_json(text: str, *, want: str | None = None) -> Any:
    """The JSON value in a completion, tolerating ``` fences and surrounding prose.

    `want` is "object", "array" or None. Without it, an object is preferred to an
    array (prose often holds "[1]"-like brackets, rarely braces). Raises ParseError.
    """
    openers = {"object": "{", "array": "["}.get(want or "", "{[")
    s = text.strip()
    if s and s[0] in openers and (value := _loads(s)) is not _MISSING:
        return value
    if "```" in s:
        for m in _FENCE.finditer(s):
            inner = m.group(1).strip()
            if (value := _loads(inner)) is not _MISSING:
                return value
    if (value := _first_value(s, openers)) is not _MISSING:
        return value
    repaired = _TRAILING_COMMA.sub(r"\1", s)  # {"a": 1,} is the commonest slip
    if repaired != s and (value := _first_value(repaired, openers)) is not _MISSING:
        return value
    kind = {"{": "object", "[": "array"}.get(openers, "object or array")
    raise ParseError(f"no JSON {kind} found")


def _schema_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if kind in ("object", "array"):
        return str(kind)
    return "object" if "properties" in schema else None


def _columns_of(schema: dict[str, Any] | None) -> list[str] | None:
    if schema is None:
        return None
    properties = schema.get("properties")
    if isinstance(properties, dict) and properties:
        return [str(key) for key in properties]
    return None


def _as_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _build_json(options: JsonOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    if options.model is not None:
        return _build_json_model(options.model, output, where, workspace)
    schema = options.schema_
    if schema is None:
        def parse_any(text: str) -> dict[str, Any]:
            return {output: _as_text(extract_json(text))}
        return Parser("json", parse_any, columns=[output],
                      identity=_identity("json", {"output": output}))
    import jsonschema  # imported here: only JSON parsers with a schema need it

    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise _spec_error(where, f"json: invalid schema: {err.message}") from err
    validator = cls(schema)
    best_match = jsonschema.exceptions.best_match
    want = _schema_type(schema)
    columns = _columns_of(schema)

    def check(value: Any) -> None:
        err = best_match(validator.iter_errors(value))
        if err is not None:
            path = ".".join(map(str, err.absolute_path))
            message = _short(err.message, 160)
            if err.validator == "required" and isinstance(err.instance, dict):
                absent = [k for k in err.validator_value if k not in err.instance]
                if absent:  # name the field itself, not its parent object
                    path, message = ".".join(filter(None, (path, str(absent[0])))), "required, missing"
            raise ParseError(f"field {path!r}: {message}" if path else message)

    identity = _identity("json", {"output": output, "schema": schema})
    if columns is None:
        def parse_value(text: str) -> dict[str, Any]:
            value = extract_json(text, want=want)
            check(value)
            return {output: _as_text(value)}
        return Parser("json", parse_value, columns=[output], schema=schema, identity=identity)

    def parse_object(text: str) -> dict[str, Any]:
        value = extract_json(text, want="object")
        check(value)
        if not isinstance(value, dict):
            raise ParseError(f"expected a JSON object, got {type(value).__name__}")
        return {column: value.get(column) for column in columns}
    return Parser("json", parse_object, columns=columns, schema=schema, identity=identity)


def _build_json_model(name: Any, output: str, where: str, workspace: Workspace | None) -> Parser:
    from pydantic import BaseModel, ValidationError

    model = _import(name, where, "json model", workspace)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise _spec_error(where, f"json: model {name!r} is not a pydantic BaseModel class")
    schema = model.model_json_schema()
    columns = _columns_of(schema) or []
    if not columns:
        raise _spec_error(where, f"json: model {name!r} declares no fields")

    def parse(text: str) -> dict[str, Any]:
        value = extract_json(text, want="object")
        try:
            instance = model.model_validate(value)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            path = ".".join(map(str, first["loc"]))
            message = _short(str(first["msg"]), 160)
            raise ParseError(f"field {path!r}: {message}" if path else message) from None
        dumped = instance.model_dump(mode="json", by_alias=True)
        return {column: dumped.get(column) for column in columns}

    identity = _identity("json", {"model": name, "schema": schema, "source": _source_digest(model)})
    return Parser("json", parse, columns=columns, schema=schema, identity=identity)


# --- choice -----------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")  # the same as spec.choice_key's
_CUES = (r"(?:final )?(?:answer|label|category|class|classification|prediction|sentiment"
         r"|rating|score|verdict)")


def _last(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    last = None
    for match in matches:  # only the last one counts
        last = match
    return last


def _build_choice(options: ChoiceOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    choices, default = list(options.options), options.default  # checked: distinct, each with a letter or digit
    by_key = {choice_key(option): option for option in choices}
    # Longest first, so "sci tech" wins over "tech" where both would match.
    ordered = sorted(by_key, key=len, reverse=True)
    anywhere = "|".join(re.escape(k) for k in ordered)
    # While scanning prose, a one-letter option counts only in capitals: "a" is an article.
    scanned = "|".join(f"(?-i:{re.escape(k.upper())})" if len(k) == 1 and k.isalpha()
                       else re.escape(k) for k in ordered)
    mention = re.compile(f"(?<= )(?:{scanned})(?= )", re.IGNORECASE)
    cued = re.compile(f"(?<= ){_CUES}(?: is| would be| should be)? (?P<opt>{anywhere})(?= )",
                      re.IGNORECASE)
    listing = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    missing = f"no option found; expected one of: {listing}"

    def spelled_as(matched: str) -> str:
        hit = by_key.get(matched.casefold())
        if hit is None:  # IGNORECASE and casefold disagree on a few scripts
            hit = next(v for k, v in by_key.items() if re.fullmatch(re.escape(k), matched, re.IGNORECASE))
        return hit

    def parse(text: str) -> dict[str, Any]:
        words = _NON_WORD.sub(" ", text)
        hit = by_key.get(words.strip().casefold())
        if hit is not None:  # the whole text is one option
            return {output: hit}
        padded = f" {words} "
        last = _last(cued.finditer(padded))  # the last cue wins
        if last is not None:
            return {output: spelled_as(last.group("opt"))}
        last = _last(mention.finditer(padded))  # models conclude at the end
        if last is not None:
            return {output: spelled_as(last.group())}
        if default is not None:
            return {output: default}
        raise ParseError(missing)

    identity = _identity("choice", {"output": output, "options": choices, "default": default})
    return Parser("choice", parse, columns=[output], choices=choices, identity=identity)


# --- answer and function ------------------------------------------------------------

def _build_answer(options: AnswerOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    """`rules: lenient` (default): `mathnorm.extract_answer`, the last boxed answer or marker, else (with
    `fallback_last_number`) the last number. `rules: lbt`: `mathnorm.lbt_extract`, the LbT reference's
    reading (the line after the first "[[Final Answer]]:" line, else the last line, normalised its way);
    it always finds an answer, as the reference does."""
    rules = options.rules
    fallback = options.fallback_last_number is not False
    if rules == "lbt":
        def parse_lbt(text: str) -> dict[str, Any]:
            return {output: lbt_extract(text)}

        return Parser("answer", parse_lbt, columns=[output],
                      identity=_identity("answer", {"output": output, "rules": "lbt"}))
    missing = "no final answer found" + ("" if fallback else " (no boxed answer or answer marker)")

    def parse(text: str) -> dict[str, Any]:
        answer = extract_answer(text, fallback_last_number=fallback)
        if answer is None:
            raise ParseError(missing)
        return {output: answer}

    identity = _identity("answer", {"output": output, "fallback_last_number": fallback})
    return Parser("answer", parse, columns=[output], identity=identity)


def _source_digest(obj: Any) -> str:
    """The code behind a parse function or model, as it was executed: its module, and the workspace
    modules that one imports, since helpers it calls count too."""
    from retort.workspace import code_digest

    return code_digest(obj)


def _build_function(options: FunctionOptions, output: str, where: str, workspace: Workspace | None) -> Parser:
    name = options.name
    fn = _import(name, where, "parse function", workspace)
    if not callable(fn):
        raise _spec_error(where, f"function: {name!r} is not callable")
    columns = list(options.columns) if options.columns else [output]
    allowed = frozenset(columns)

    def parse(text: str) -> dict[str, Any]:
        try:
            result = fn(text)
        except ParseError:
            raise
        except Exception as err:  # a user's parser failing on one row fails that row only
            raise ParseError(str(err) or type(err).__name__) from err
        if isinstance(result, dict):
            extra = result.keys() - allowed
            if extra:
                raise ParseError(f"{name} returned undeclared columns {sorted(map(str, extra))}; "
                                 f"declare them under columns:")
            return {column: result.get(column) for column in columns}
        if isinstance(result, str):
            if len(columns) != 1:
                raise ParseError(f"{name} returned a string but declares columns {columns}")
            return {columns[0]: result}
        raise ParseError(f"{name} must return a dict or a str, got {type(result).__name__}")

    identity = _identity("function", {"name": name, "columns": columns,
                                      "source": _source_digest(fn)})
    return Parser("function", parse, columns=columns, identity=identity)


_BUILDERS: dict[str, Callable[[Any, str, str, Workspace | None], Parser]] = {
    "text": _build_text,
    "regex": _build_regex,
    "json": _build_json,
    "choice": _build_choice,
    "answer": _build_answer,
    "function": _build_function,
}


def build_parser(spec: ParseRule | str | dict[str, Any] | None, output: str, *, where: str = "",
                 workspace: Workspace | None = None) -> Parser:
    """Compile a stage's `parse:` rule. `output` names the column of single-column
    parsers; `where` (for example "stage classify") prefixes errors; `workspace`
    resolves `module:attr` names (its evaluators/ first; default: the current folder).

    Raises SpecError for a malformed rule, NotFoundError for a missing function or model.
    """
    if not isinstance(output, str) or not output:
        raise _spec_error(where, f"the output column must be a non-empty name, got {output!r}")
    rule = rule_of(spec, where)
    return _BUILDERS[rule.kind](rule.options, output, where, workspace)
