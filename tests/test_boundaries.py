"""The layers stay where issue 11 put them, read from the source (AST), not by convention:

- the store owns every table and every SQL string: no module but retort/cache.py reaches into its
  DuckDB connection (`cache.con`) or takes a raw `DuckDBPyConnection` to run SQL on;
- export does not import the CLI (the CLI imports export: the other way round made a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "retort"
STORE = "retort/cache.py"
NOT_YET: tuple[str, ...] = ()  # every module reads through the store now; nothing may join this


def _reaches_into_the_connection(path: Path) -> list[str]:
    """`line: code` for each use of an object's `.con` or of the `DuckDBPyConnection` type in a file."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if (isinstance(node, ast.Attribute) and node.attr in ("con", "DuckDBPyConnection")) or \
                (isinstance(node, ast.Name) and node.id == "DuckDBPyConnection"):
            found.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_only_the_store_touches_its_connection() -> None:
    checked, offenders = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name == STORE or name.startswith(NOT_YET):
            continue
        checked.append(name)
        uses = _reaches_into_the_connection(path)
        if uses:
            offenders[name] = uses
    assert offenders == {}, "outside the store, use (or add) a read method of Cache in retort/cache.py"
    # the readers this rule was written for are among the files checked (a renamed package would pass emptily)
    assert {"retort/api.py", "retort/cli.py", "retort/export.py", "retort/lineage.py", "retort/view.py",
            "retort/runnable.py"} <= set(checked)
    # and the check sees what it looks for: the store itself reaches into its connection
    assert _reaches_into_the_connection(ROOT / STORE)


def test_export_does_not_import_the_cli() -> None:
    tree = ast.parse((PACKAGE / "export.py").read_text(encoding="utf-8"))
    names = set()  # every module and `module.name` export imports, at its top or inside a function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    assert "retort.errors.UserError" in names  # the walk sees export's imports
    assert not [n for n in names if n == "retort.cli" or n.startswith("retort.cli.")]
