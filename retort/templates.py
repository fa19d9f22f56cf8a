"""Prompt templates: Jinja2, sandboxed, `StrictUndefined`, rendering chat messages.

A template file renders the user message. To set other roles, define blocks:

    {% block system %}You are a careful annotator.{% endblock %}
    {% block user %}Text: {{ text }}{% endblock %}
    {% block assistant %}Concepts:{% endblock %}   {# optional prefill #}

Variables are the row's columns, plus `params` (the pipeline's params) and
`row` (the whole row as a mapping). A variable the row lacks is an error at
`retort validate`, not a blank in a prompt.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from retort.errors import TemplateError

ROLES = ("system", "user", "assistant")
BUILTIN_NAMES = {"params", "row", "loop", "range", "dict", "lipsum", "cycler", "joiner", "namespace"}


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                        trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["numbered"] = lambda items, start=1: "\n".join(f"{i}. {x}" for i, x in enumerate(items, start))
    return env


ENV = _env()


def environment(prompt_dirs: list[Path]) -> ImmutableSandboxedEnvironment:
    """The environment of a workspace: `{% include %}` and `{% import %}` resolve in its prompts/ folders."""
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(d)) for d in prompt_dirs if d.is_dir()])
    return ENV.overlay(loader=loader)  # type: ignore[no-any-return]


_BLOCK = re.compile(r"(\{%-?\s*block\s+(system|user|assistant)\s*-?%\})")
_MARK, _SEP = "\x1e", "\x1f"


class Template:
    """Compiled once per stage; `render` is on the hot path (~10 us a row).

    Role blocks are rendered in one pass: each block opens with a marker
    (RS role US) and the output is split on them, which is several times
    faster than rendering each block in a fresh Jinja context.
    """

    def __init__(self, source: str, name: str, env: ImmutableSandboxedEnvironment | None = None) -> None:
        self.name, self.source = name, source
        self.env = env = env or ENV
        try:
            self.ast = env.parse(source)
            blocks = [b.name for b in self.ast.find_all(nodes.Block)]
            unknown = set(blocks) - set(ROLES)
            if unknown:
                raise TemplateError(f"unknown block {sorted(unknown)[0]!r}; blocks are {', '.join(ROLES)}",
                                    template=name)
            self.has_roles = bool(blocks)
            marked = _BLOCK.sub(lambda m: f"{m.group(1)}{_MARK}{m.group(2)}{_SEP}", source)
            self._template = env.from_string(marked)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"syntax error: {exc.message}", template=name, line=exc.lineno) from None
        self._render = self._template.root_render_func
        self._globals = dict(env.globals)
        self._context = Context(self.env, {}, self.name, self._template.blocks)
        self._parts = _plain_parts(env.parse(marked))


    @classmethod
    def from_file(cls, path: Path, name: str | None = None,
                  env: ImmutableSandboxedEnvironment | None = None) -> Template:
        return cls(path.read_text(encoding="utf-8"), name or str(path), env)

    def digest(self) -> str | None:
        """SHA-256 of this template's source and of every template it includes or imports, or None
        when a reference is computed at render time (then what it renders cannot be known ahead)."""
        h = hashlib.sha256(self.source.encode())
        seen: set[str] = set()
        pending = [self.ast]
        while pending:
            for ref in meta.find_referenced_templates(pending.pop()):
                if ref is None or self.env.loader is None:
                    return None
                if ref in seen:
                    continue
                seen.add(ref)
                try:
                    source = self.env.loader.get_source(self.env, ref)[0]
                except jinja2.TemplateNotFound:
                    return None
                h.update(b"\0" + ref.encode() + b"\0" + source.encode())
                pending.append(self.env.parse(source))
        return h.hexdigest()

    def variables(self) -> set[str]:
        return set(meta.find_undeclared_variables(self.ast)) - BUILTIN_NAMES

    def check_columns(self, columns: Iterable[str]) -> None:
        """Every variable the template reads must be a column (or params/row)."""
        missing = self.variables() - set(columns)
        if missing:
            var = sorted(missing)[0]
            line = next((n.lineno for n in self.ast.find_all(nodes.Name) if n.name == var), None)
            raise TemplateError(f"variable {var!r} is not a column of the input "
                                f"(columns: {', '.join(sorted(columns)) or 'none'})", template=self.name, line=line)

    def render(self, row: Mapping[str, Any], params: Mapping[str, Any]) -> list[dict[str, str]]:
        parts = self._parts
        if parts is not None and all(name in row for name in parts[1::2]):
            # Only text and `{{ column }}`: what Jinja's code does (str() of each value), without a context.
            pieces = parts.copy()
            for i in range(1, len(pieces), 2):
                pieces[i] = str(row[pieces[i]])
            return self._messages("".join(pieces))
        context = {**self._globals, **row, "params": params, "row": row}
        try:
            # One Context per template, reset per row: new_context() copies the environment's globals
            # and the block table on every call, which costs more than the rendering itself.
            ctx = self._context
            ctx.parent, ctx.vars, ctx.exported_vars = context, {}, set()
            text = "".join(self._render(ctx))
        except jinja2.UndefinedError as exc:
            raise TemplateError(exc.message or "undefined variable", template=self.name,
                                line=self._line(exc)) from None
        except RecursionError as exc:  # a macro that calls itself without end
            raise TemplateError("recursion too deep (a macro or include that calls itself?)", template=self.name,
                                line=self._line(exc)) from None
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
            # ZeroDivisionError in {{ 1/0 }}, OverflowError from the sandbox's range() cap, a bad index
            raise TemplateError(f"{type(exc).__name__}: {exc}" if not isinstance(exc, jinja2.TemplateError)
                                else str(exc), template=self.name, line=self._line(exc)) from None
        return self._messages(text)

    def _messages(self, text: str) -> list[dict[str, str]]:
        if not self.has_roles:
            return [{"role": "user", "content": text.strip()}]
        messages = []
        for part in text.split(_MARK)[1:]:
            role, _, content = part.partition(_SEP)
            content = content.strip()
            if content or role == "user":
                messages.append({"role": role, "content": content})
        return messages

    def _line(self, exc: BaseException) -> int | None:
        tb, line = exc.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = self._template.get_corresponding_lineno(tb.tb_lineno)
            tb = tb.tb_next
        return line


def _plain_parts(ast: nodes.Template) -> list[str] | None:
    """A template that is only text and `{{ name }}` outputs (in role blocks or not) as [text, name, text,
    name, ..., text]: rendered by joining, 5-10 times faster than through Jinja's context. None for
    anything else (a filter, a tag, an expression), and for `params` and `row`, which are not columns."""
    parts = [""]
    for top in ast.body:
        for node in top.body if isinstance(top, nodes.Block) else [top]:
            if not isinstance(node, nodes.Output):
                return None
            for item in node.nodes:
                if isinstance(item, nodes.TemplateData):
                    parts[-1] += item.data
                elif isinstance(item, nodes.Name) and item.ctx == "load" and item.name not in ("params", "row"):
                    parts += [item.name, ""]
                else:
                    return None
    return parts
