from __future__ import annotations

from pathlib import Path

import pytest

from retort.errors import TemplateError
from retort.templates import Template


def test_blocks_become_chat_messages_with_prefill() -> None:
    t = Template("{% block system %}Be brief.{% endblock %}\n{% block user %}Text: {{ text }}\n"
                 "Labels: {{ params.labels | join(', ') }}{% endblock %}\n{% block assistant %}Label:{% endblock %}",
                 "t.j2")
    assert t.render({"text": "hi"}, {"labels": ["a", "b"]}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Text: hi\nLabels: a, b"},
        {"role": "assistant", "content": "Label:"},
    ]


def test_plain_template_is_the_user_message() -> None:
    t = Template("{% for x in items %}{{ loop.index }}. {{ x }}\n{% endfor %}", "t.j2")
    assert t.render({"items": ["a", "b"]}, {}) == [{"role": "user", "content": "1. a\n2. b"}]


def test_missing_variable_names_template_and_line() -> None:
    t = Template("line one\n{{ text }}\n{{ missing_var }}", "prompts/x.j2")
    with pytest.raises(TemplateError, match=r"prompts/x.j2:3: variable 'missing_var' is not a column"):
        t.check_columns(["text"])
    with pytest.raises(TemplateError, match=r"prompts/x.j2:3: 'missing_var' is undefined"):
        t.render({"text": "a"}, {})


def test_syntax_error_and_unknown_block() -> None:
    with pytest.raises(TemplateError, match=r"t.j2:2: syntax error"):
        Template("ok\n{% if %}", "t.j2")
    with pytest.raises(TemplateError, match="unknown block 'tool'"):
        Template("{% block tool %}x{% endblock %}", "t.j2")


def test_sandbox_blocks_unsafe_attribute_access() -> None:
    t = Template("{{ text.__class__.__mro__ }}", "t.j2")
    with pytest.raises(TemplateError):
        t.render({"text": "x"}, {})


def test_include_and_import_resolve_in_prompt_folders(tmp_path: Path) -> None:
    from retort.templates import environment

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "labels.j2").write_text("Labels: {{ params.labels | join('/') }}")
    (tmp_path / "shared" / "macros.j2").write_text("{% macro shout(x) %}{{ x | upper }}{% endmacro %}")
    env = environment([tmp_path])
    t = Template('{% import "shared/macros.j2" as m %}{{ m.shout(text) }}\n{% include "shared/labels.j2" %}',
                 "t.j2", env)
    assert t.render({"text": "hi"}, {"labels": ["a", "b"]}) == [{"role": "user", "content": "HI\nLabels: a/b"}]
