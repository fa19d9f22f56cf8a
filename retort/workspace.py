"""Name resolution: the user's workspace first, then the built-in library.

A workspace is a folder with `pipelines/`, `prompts/`, `evaluators/` and
`data/` (like a dbt project). The built-in library is the same four folders
shipped inside the wheel (`retort/_library/`), or, in a source checkout, the
repository root next to the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from retort.errors import NotFoundError

FOLDERS = ("pipelines", "prompts", "evaluators", "data")


def builtin_root() -> Path:
    packaged = Path(__file__).parent / "_library"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent


class Workspace:
    def __init__(self, root: Path | str = ".") -> None:
        self.root = Path(root).resolve()
        self.roots = [self.root] if self.root == builtin_root() else [self.root, builtin_root()]

    @property
    def db_path(self) -> Path:
        return self.root / ".retort" / "retort.duckdb"

    def _find(self, folder: str, name: str, suffixes: tuple[str, ...]) -> Path | None:
        for root in self.roots:
            for suffix in ("", *suffixes):
                candidate = root / folder / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
        return None

    def pipeline(self, name: str) -> Path:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if path.is_file():
                return path
            raise NotFoundError(f"pipeline file {name} does not exist")
        found = self._find("pipelines", name, (".yaml", ".yml"))
        if found is None:
            raise NotFoundError(f"no pipeline named {name!r}; `retort list` shows the available ones")
        return found

    def prompt(self, name: str) -> Path | None:
        return self._find("prompts", name, (".j2", ".jinja"))

    def data(self, path: str, base: Path | None = None) -> Path:
        """A dataset path: as given, then relative to the pipeline's workspace, then the library."""
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists():
            return p
        for root in ([base] if base else []) + self.roots:
            if (root / p).exists():
                return root / p
        return p  # reported as missing by the loader, with the path the user wrote

    def pipelines(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in reversed(self.roots):  # the workspace overrides the library
            for p in sorted((root / "pipelines").glob("*.y*ml")):
                found[p.stem] = p
        return dict(sorted(found.items()))

    def evaluator(self, name: str) -> Callable[..., Any]:
        """`module:attr`, `module.attr`, or a bare function name searched in every evaluators/ module."""
        if ":" in name:
            return import_object(name, self)
        module_name, _, attr = name.rpartition(".")
        for root in self.roots:
            folder = root / "evaluators"
            files = [folder / f"{module_name}.py"] if module_name else sorted(folder.glob("*.py"))
            for file in files:
                if file.is_file() and not file.name.startswith("_"):
                    fn = getattr(_load_file(str(file)), attr, None)
                    if callable(fn):
                        return fn  # type: ignore[no-any-return]
        raise NotFoundError(f"no evaluator named {name!r} in evaluators/ of {self.root} or the built-in library")


@cache
def _load_file(path: str) -> ModuleType:
    name = f"retort_user_{Path(path).stem}_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_object(ref: str, workspace: Workspace | None = None) -> Any:
    """Import `module:attr`. A module that is a file in an evaluators/ folder wins over sys.path."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise NotFoundError(f"{ref!r} is not of the form module:attribute")
    for root in (workspace or Workspace()).roots:
        file = root / "evaluators" / f"{module_name.replace('.', '/')}.py"
        if file.is_file():
            module = _load_file(str(file))
            break
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise NotFoundError(f"cannot import {module_name!r} (from {ref!r}): {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NotFoundError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
