from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from retort.errors import NotFoundError, ParseError, SpecError
from retort.parsers import Parser, build_parser, extract_json
from retort.workspace import Workspace


def parse(spec: Any, text: str, output: str = "out") -> dict[str, Any]:
    return build_parser(spec, output)(text)


# --- text -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [None, "text", {"text": None}, {"text": {}}])
def test_text_is_the_default_and_strips(spec: Any) -> None:
    parser = build_parser(spec, "rationale")
    assert parser.columns == ["rationale"]
    assert parser.schema is None and parser.choices is None
    assert parser("  Because it rains.\n") == {"rationale": "Because it rains."}


def test_none_completion_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="empty completion"):
        build_parser("text", "out")(None)  # type: ignore[arg-type]


# --- regex --------------------------------------------------------------------------

def test_regex_named_groups_become_columns_in_group_order() -> None:
    parser = build_parser({"regex": r"Label: (?P<label>\w+)(?: \((?P<confidence>[\d.]+)\))?"}, "out")
    assert parser.columns == ["label", "confidence"]
    assert parser("Thinking...\nLabel: positive (0.9)\nLabel: negative") == {
        "label": "positive", "confidence": "0.9"}  # first match
    assert parser("Label: neutral") == {"label": "neutral", "confidence": None}


def test_regex_without_named_groups_uses_group_one_or_the_whole_match() -> None:
    assert parse({"regex": {"pattern": r"answer:\s*(.+)", "flags": "i"}}, "ANSWER:  Yes ") == {"out": "Yes"}
    assert parse({"regex": r"\d+"}, "take 12 or 13") == {"out": "12"}


def test_regex_dotall_flag_and_sibling_option_form() -> None:
    text = "<r>line one\nline two</r>"
    assert parse({"regex": "<r>(?P<r>.*)</r>", "flags": "s"}, text) == {"r": "line one\nline two"}
    with pytest.raises(ParseError, match="did not match"):
        parse({"regex": "<r>(?P<r>.*)</r>"}, text)


@pytest.mark.parametrize(("spec", "message"), [
    ({"regex": "(?P<x"}, "invalid pattern"),
    ({"regex": {"pattern": "a", "flags": "q"}}, "flags"),
    ({"regex": ""}, "non-empty"),
    ("regex", "needs options"),
    ({"regex": {"flags": "i"}}, "needs 'pattern'"),
])
def test_regex_spec_errors(spec: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        build_parser(spec, "out", where="stage classify")
    assert info.value.field == "parse"
    assert "stage classify: " in str(info.value)


# --- json ---------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "number"}},
    "required": ["label"],
}


def test_json_in_a_code_fence_with_prose_around_it() -> None:
    parser = build_parser({"json": {"schema": SCHEMA}}, "out")
    assert parser.columns == ["label", "score"]
    assert parser.schema == SCHEMA
    text = 'Sure! Here it is:\n```json\n{"label": "positive", "score": 0.8}\n```\nHope that {helps}.'
    assert parser(text) == {"label": "positive", "score": 0.8}


def test_json_object_inside_prose_without_fence_and_missing_optional_property() -> None:
    parser = build_parser({"json": {"schema": SCHEMA}}, "out")
    text = r'We know \frac{1}{2} [see above]. Output: {"label": "negative", "note": "x"} -- end'
    assert parser(text) == {"label": "negative", "score": None}  # undeclared "note" is dropped


def test_json_schema_violation_names_the_field() -> None:
    parser = build_parser({"json": {"schema": SCHEMA}}, "out")
    with pytest.raises(ParseError, match=r"field 'label': 'neutral' is not one of"):
        parser('{"label": "neutral"}')
    with pytest.raises(ParseError, match=r"field 'score': .*not of type 'number'"):
        parser('{"label": "positive", "score": "high"}')
    with pytest.raises(ParseError, match=r"field 'label': required, missing"):
        parser('{"score": 1}')


def test_json_nested_field_path_in_error() -> None:
    schema = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"}}}}
    with pytest.raises(ParseError, match=r"field 'steps\.1'"):
        parse({"json": {"schema": schema}}, '{"steps": ["a", 2]}')


def test_json_without_schema_returns_compact_json_text() -> None:
    parser = build_parser("json", "data")
    assert parser.schema is None
    assert parser('Result:\n{"a": {"b": [1, 2]}, "c": "}"}\nthanks') == {"data": '{"a":{"b":[1,2]},"c":"}"}'}
    # without a schema an object is preferred over an earlier bracketed aside
    assert parser('see [1]: {"k": 1}') == {"data": '{"k":1}'}
    assert parser("[1, 2, 3]") == {"data": "[1,2,3]"}


def test_json_trailing_comma_is_repaired() -> None:
    assert parse("json", '{"a": 1, "b": [1, 2,],}') == {"out": '{"a":1,"b":[1,2]}'}


def test_json_not_found() -> None:
    with pytest.raises(ParseError, match="no JSON object or array found"):
        parse("json", "I cannot answer that.")
    with pytest.raises(ParseError, match="no JSON object found"):
        parse({"json": {"schema": SCHEMA}}, '["positive"]')


def test_json_array_schema_keeps_output_column() -> None:
    parser = build_parser({"json": {"schema": {"type": "array", "items": {"type": "integer"}}}}, "ids")
    assert parser.columns == ["ids"]
    assert parser("ids: {not json} [3, 4]") == {"ids": "[3,4]"}
    with pytest.raises(ParseError, match="field '0'"):
        parser('["x"]')


def test_extract_json_wants_object() -> None:
    assert extract_json('[1] then {"a": 1}', want="object") == {"a": 1}
    assert extract_json('{"a": 1} then [1]', want="array") == [1]


@pytest.mark.parametrize(("spec", "message"), [
    ({"json": {"schema": {"type": "nope"}}}, "invalid schema"),
    ({"json": {"schema": [1]}}, "must be a mapping"),
    ({"json": {"schema": {}, "model": "m:C"}}, "not both"),
    ({"json": {"strict": True}}, "unknown option 'strict'"),
    ({"json": "yes"}, "takes a mapping"),
])
def test_json_spec_errors(spec: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_parser(spec, "out")


# --- json with a pydantic model, and function parsers (user modules) -----------------

USER_MODULE = '''
from pydantic import BaseModel, Field


class Verdict(BaseModel):
    label: str = Field(pattern="^(yes|no)$")
    reason: str


def split(text):
    head, _, tail = text.partition("|")
    if not tail:
        raise ValueError("no '|' separator")
    return {"label": head.strip(), "reason": tail.strip()}


def upper(text):
    return text.upper()


def wrong(text):
    return {"surprise": 1}
'''


@pytest.fixture
def user_ws(tmp_path: Path) -> Workspace:
    (tmp_path / "evaluators").mkdir()
    (tmp_path / "evaluators" / "myparsers.py").write_text(textwrap.dedent(USER_MODULE))
    return Workspace(tmp_path)


def test_json_model_from_the_workspace(user_ws: Workspace) -> None:
    parser = build_parser({"json": {"model": "myparsers:Verdict"}}, "out", workspace=user_ws)
    assert parser.columns == ["label", "reason"]
    assert parser.schema is not None and parser.schema["required"] == ["label", "reason"]
    assert parser('```\n{"label": "yes", "reason": "clear"}\n```') == {"label": "yes", "reason": "clear"}
    with pytest.raises(ParseError, match="field 'label': String should match pattern"):
        parser('{"label": "maybe", "reason": "?"}')
    with pytest.raises(ParseError, match="field 'reason': Field required"):
        parser('{"label": "no"}')


def test_json_model_must_be_a_pydantic_model(user_ws: Workspace) -> None:
    with pytest.raises(SpecError, match="not a pydantic BaseModel"):
        build_parser({"json": {"model": "myparsers:split"}}, "out", workspace=user_ws)


def test_function_parser_with_declared_columns(user_ws: Workspace) -> None:
    parser = build_parser({"function": "myparsers:split", "columns": ["label", "reason"]}, "out",
                          workspace=user_ws)
    assert parser.columns == ["label", "reason"]
    assert parser("yes | it rains") == {"label": "yes", "reason": "it rains"}
    with pytest.raises(ParseError, match=re.escape("no '|' separator")):
        parser("no separator here")


def test_function_parser_returning_a_string_and_undeclared_columns(user_ws: Workspace) -> None:
    parser = build_parser({"function": {"name": "myparsers:upper"}}, "shout", workspace=user_ws)
    assert parser.columns == ["shout"]
    assert parser("hi") == {"shout": "HI"}
    with pytest.raises(ParseError, match=r"undeclared columns \['surprise'\]"):
        build_parser({"function": "myparsers:wrong"}, "out", workspace=user_ws)("x")


def test_function_parser_identity_tracks_the_source(user_ws: Workspace) -> None:
    first = build_parser({"function": "myparsers:split"}, "out", workspace=user_ws).identity
    other = build_parser({"function": "myparsers:upper"}, "out", workspace=user_ws).identity
    assert first.startswith("function ") and "myparsers:split" in first
    assert first != other


def test_function_from_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pathparser_mod.py").write_text("def f(text):\n    return {'out': text[::-1]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert parse({"function": "pathparser_mod:f"}, "abc") == {"out": "cba"}
    finally:
        sys.modules.pop("pathparser_mod", None)


def test_function_missing_is_not_found(user_ws: Workspace) -> None:
    with pytest.raises(NotFoundError, match="stage s: "):
        build_parser({"function": "myparsers:absent"}, "out", where="stage s", workspace=user_ws)
    with pytest.raises(SpecError, match="module:attr"):
        build_parser({"function": "no_colon"}, "out")


# --- choice -------------------------------------------------------------------------

SENTIMENT = {"choice": ["Positive", "Negative", "Neutral"]}
TOPICS = {"choice": ["World", "Sports", "Business", "sci_tech", "tech"]}


@pytest.mark.parametrize(("text", "expected"), [
    ("positive", "Positive"),
    ("  NEGATIVE. ", "Negative"),
    ("The answer is: Positive.", "Positive"),
    ("**Neutral**", "Neutral"),
    # both mentioned, no cue: the last mention wins (models conclude at the end)
    ("It starts negative but overall it is positive", "Positive"),
    # an explicit cue beats a later mention
    ("Sentiment: negative. Some might read it as positive.", "Negative"),
    ("Answer: positive\nWait, re-reading... Final answer: negative. Not positive at all", "Negative"),
])
def test_choice_sentiment(text: str, expected: str) -> None:
    assert parse(SENTIMENT, text) == {"out": expected}


@pytest.mark.parametrize(("text", "expected"), [
    ("Sci/Tech", "sci_tech"),             # punctuation-insensitive, declared spelling returned
    ("category: sci-tech", "sci_tech"),
    ("This is a tech story", "tech"),
    ("It's sci tech, not just tech", "tech"),  # both are options: the last mention wins
    ("Label: Sci Tech.", "sci_tech"),      # longest option first: "tech" inside it does not count
    ("About sports and technology", "Sports"),  # "technology" is not the word "tech"
])
def test_choice_overlapping_options(text: str, expected: str) -> None:
    assert parse(TOPICS, text) == {"out": expected}


def test_choice_single_letter_options_ignore_the_article_a() -> None:
    letters = {"choice": ["A", "B", "C", "D"]}
    assert parse(letters, "B is right, as a result of the premise") == {"out": "B"}
    assert parse(letters, "I think a good answer is (C).") == {"out": "C"}
    assert parse(letters, "d") == {"out": "D"}
    assert parse(letters, "answer: b") == {"out": "B"}


def test_choice_none_found_lists_options_or_uses_default() -> None:
    with pytest.raises(ParseError, match="expected one of: Positive, Negative, Neutral"):
        parse(SENTIMENT, "I cannot tell.")
    parser = build_parser({"choice": {"options": ["yes", "no"], "default": "unknown"}}, "out")
    assert parser("hmm") == {"out": "unknown"}
    assert parser.choices == ["yes", "no"]


def test_choice_numbers_are_options() -> None:
    # "rating" is a cue, so the scale's "5" mentioned after it does not win
    assert parse({"choice": [1, 2, 3, 4, 5]}, "Rating: 4 (on a scale of 1 to 5)") == {"out": "4"}
    assert parse({"choice": [1, 2, 3, 4, 5]}, "Between 3 and 4, I pick 4") == {"out": "4"}


@pytest.mark.parametrize(("spec", "message"), [
    ({"choice": "positive"}, "non-empty list"),
    ({"choice": []}, "non-empty list"),
    ({"choice": [True, False]}, "quote it"),
    ({"choice": ["Sci/Tech", "sci_tech"]}, "read the same"),
    ({"choice": ["?!"]}, "no letters or digits"),
    ({"choice": {"options": ["a"], "default": 3}}, "default must be a string"),
    ({"choice": ["a"], "regex": "x"}, "exactly one parse kind"),
    ("classify", "unknown parse kind 'classify'"),
    (42, "got int"),
])
def test_choice_and_general_spec_errors(spec: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_parser(spec, "out")


# --- answer -------------------------------------------------------------------------

def test_answer_parser() -> None:
    parser = build_parser("answer", "answer")
    assert parser.columns == ["answer"]
    assert parser(r"... so $\boxed{\dfrac{1}{2}}$.") == {"answer": r"\dfrac{1}{2}"}
    assert parser("She pays 3 + 4 = 7 dollars.\n#### $1,007") == {"answer": "1007"}
    assert parser("I got 12 and then 15") == {"answer": "15"}


def test_answer_parser_without_fallback() -> None:
    parser = build_parser({"answer": {"fallback_last_number": False}}, "answer")
    with pytest.raises(ParseError, match="no final answer"):
        parser("I got 12 and then 15")
    with pytest.raises(SpecError, match="true or false"):
        build_parser({"answer": {"fallback_last_number": "no"}}, "answer")


def test_answer_parser_with_the_lbt_reference_rules() -> None:
    parser = build_parser({"answer": {"rules": "lbt"}}, "answer")
    assert parser.columns == ["answer"]
    # the line after the FIRST marker, normalised the reference's way (spaces and "$" dropped)
    assert parser("Work.\n\n[[Final Answer]]:\n$1,000$\n\n[[Final Answer]]:\n$7$\n") == {"answer": "1000"}
    # no marker: the last line, never the last number, and never a parse error
    assert parser("I got 12 and then 15.\nNot sure.") == {"answer": "Notsure."}
    assert parser("[[Final Answer]]: 16") == {"answer": "[[FinalAnswer]]:16"}
    assert parser.identity != build_parser("answer", "answer").identity
    with pytest.raises(SpecError, match="lenient or lbt"):
        build_parser({"answer": {"rules": "strict"}}, "answer")
    with pytest.raises(SpecError, match="fallback_last_number is an option of rules: lenient"):
        build_parser({"answer": {"rules": "lbt", "fallback_last_number": False}}, "answer")


# --- identity and the public surface --------------------------------------------------

def test_identity_is_stable_and_distinguishes_rules() -> None:
    a = build_parser({"choice": ["x", "y"]}, "out")
    b = build_parser({"choice": {"options": ["x", "y"]}}, "out")
    c = build_parser({"choice": ["y", "x"]}, "out")
    assert a.identity == b.identity
    assert a.identity != c.identity
    assert build_parser({"json": {"schema": SCHEMA}}, "out").identity.startswith("json ")
    assert isinstance(a, Parser) and "choice" in repr(a)


def test_output_column_is_required() -> None:
    with pytest.raises(SpecError, match="output column"):
        build_parser("text", "")


def test_math_helpers_are_reexported() -> None:
    from retort import parsers

    assert parsers.math_equal("0.5", "1/2")
    assert parsers.normalize_answer("1,000") == "1000"
    assert parsers.extract_answer("#### 3") == "3"
