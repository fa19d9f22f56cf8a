"""SQL written by users: rendered with every value quoted, and run only if it is one SELECT.

A SQL stage, a `where:` filter and `retort show/export --where` reach DuckDB through
here. The store's own tables (calls, runs, ...) live in the same database, so a
user's SQL must not be able to write: before anything runs, the text is split into
statements by DuckDB's own parser, and exactly one statement of type SELECT is
allowed (`WITH ... SELECT`, `FROM t`, `VALUES` are SELECTs too). External access
(files, URLs) is disabled on the connection itself (see cache.py).

Templates over `params` quote every value they print, so a `--set` value with a
quote cannot break out: `{{ params.label }}` prints `'it''s'`, a list prints a
DuckDB list literal. `{{ x | raw }}` prints text as it is, for the rare template
that builds SQL syntax (an identifier, an operator) from a param; `| sql` is kept
as an explicit spelling of the default.
"""

from __future__ import annotations

from typing import Any

import duckdb

from retort.errors import TemplateError


class RawSQL(str):
    """Text a SQL template prints as it is (`| raw`), or an already quoted literal (`| sql`)."""


def literal(value: Any) -> str:
    """A DuckDB literal for a Python value, safely quoted."""
    if isinstance(value, RawSQL):
        return str(value)
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(str(k))}: {literal(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("'", "''") + "'"


def render(sql: str, params: dict[str, Any]) -> str:
    """A SQL template over `params`, every printed value quoted (see the module docstring)."""
    if "{" not in sql:
        return sql.strip().rstrip(";")
    from retort.templates import ENV

    try:
        env = ENV.overlay(finalize=literal)
        env.filters["sql"] = lambda v: RawSQL(literal(v))
        env.filters["raw"] = lambda v: RawSQL(str(v))
        return env.from_string(sql).render(params=params).strip().rstrip(";")
    except Exception as exc:  # jinja2's errors: undefined param, syntax
        raise TemplateError(str(exc), template="sql") from None


class NotReadOnly(ValueError):
    """User SQL that is not exactly one SELECT."""


def check_select(sql: str) -> None:
    """Raise NotReadOnly unless `sql` is exactly one SELECT statement (parsed, not run)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise NotReadOnly(first_line(exc)) from None
    if len(statements) != 1:
        raise NotReadOnly(f"expected one SELECT statement, found {len(statements)} (SQL in a pipeline reads only)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind))
        raise NotReadOnly(f"only a SELECT may run here, not {name} (SQL in a pipeline reads only)")


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
