"""The replay path's shortcuts give exactly what the general code gives: a template of text and
`{{ column }}` outputs rendered without Jinja's context, stage rows of one shape turned into Arrow
column by column. Keys hash what the messages say, so a changed character would be a new call."""

from __future__ import annotations

from typing import Any

import pytest

from retort.datasets import table_from_rows
from retort.templates import Template

TEMPLATES = [
    "Key concepts of: {{ text }}",
    "{{ text }}",
    "Knowledge about {{ s1 }} for {{ label }}\n",
    "  {{ text }}  \n\n",
    "{% block system %}Rewrite.{% endblock %}{% block user %}{{ text }}{% endblock %}",
    "{% block system %}\n  You judge {{ label }}.\n{% endblock %}\n{% block user %}Text: {{ text }}\n{% endblock %}\n"
    "{% block assistant %}Answer:{% endblock %}",
    "{#- a comment -#}\n{{ text -}}   and {{- label }}",
]
ROWS: list[dict[str, Any]] = [
    {"text": "a short text", "label": "positive", "s1": "x"},
    {"text": None, "label": 3, "s1": 2.5},
    {"text": ["a", 1], "label": {"k": True}, "s1": "ünï\ncode"},
    {"text": "", "label": False, "s1": 10**20},
]


@pytest.mark.parametrize("source", TEMPLATES)
def test_a_plain_template_renders_as_jinja_does(source: str) -> None:
    fast = Template(source, "t")
    slow = Template(source, "t")
    slow._parts = None  # the general path: Jinja's compiled template
    assert fast._parts is not None
    for row in ROWS:
        assert fast.render(row, {}) == slow.render(row, {})


@pytest.mark.parametrize("source", ["{{ text | upper }}", "{% if text %}{{ text }}{% endif %}", "{{ params.x }}",
                                    "{{ row.text }}", "{{ text ~ label }}", "{% extends 'base' %}"])
def test_other_templates_take_jinjas_path(source: str) -> None:
    assert Template(source, "t")._parts is None


def test_a_missing_column_still_fails_as_before() -> None:
    from retort.errors import TemplateError

    with pytest.raises(TemplateError, match="text"):
        Template("Say {{ text }}", "t").render({"label": "x"}, {})


def test_rows_of_one_shape_make_the_same_table() -> None:
    rows = [{"a": i, "b": f"t{i}", "c": None if i % 2 else [i]} for i in range(50)]
    mixed = [{"a": 1, "b": "x"}, {"a": "two", "b": "y", "c": 3.5}]
    assert table_from_rows(rows, lenient=True).to_pylist() == rows
    assert table_from_rows(rows[1::2], lenient=True).column_names == ["a", "b", "c"]
    assert table_from_rows(mixed, lenient=True).to_pylist() == [{"a": "1", "b": "x", "c": None},
                                                                {"a": "two", "b": "y", "c": 3.5}]
