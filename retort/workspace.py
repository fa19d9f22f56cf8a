"""Name resolution: the user's workspace first, then the built-in library.

A workspace is a folder with `pipelines/`, `prompts/`, `evaluators/` and
`data/` (like a dbt project). The built-in library is the same four folders
shipped inside the wheel (`retort/_library/`), or, in a source checkout, the
repository root next to the package.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
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
                    fn = getattr(load_module(file), attr, None)
                    if callable(fn):
                        return fn  # type: ignore[no-any-return]
        raise NotFoundError(f"no evaluator named {name!r} in evaluators/ of {self.root} or the built-in library")


# --- workspace modules ---------------------------------------------------------------
#
# A file in an evaluators/ folder is loaded by path, not through sys.path, and loaded again
# whenever its bytes, or the bytes of a workspace module it imports, change: a fingerprint
# names the code that runs, so the code that runs must be the code the fingerprint read.
# Inside such a module `import helper` / `from helper import f` finds helper.py in the same
# folder first, then in the built-in library's evaluators/ (a per-module `__import__`, so
# nothing process-wide changes); any other name imports as usual.


@dataclass(eq=False, slots=True)
class _Loaded:
    module: ModuleType
    digest: str  # of exactly the bytes executed
    deps: dict[str, _Loaded] = field(default_factory=dict)  # the workspace modules it imports, as it bound them


_LOADED: dict[str, _Loaded] = {}  # path -> the version loaded last
_EXECUTING: list[_Loaded] = []  # modules executing now (innermost last): what they load are their deps
_VERSIONS: dict[int, _Loaded] = {}  # id(module globals) -> its version, old ones too (functions outlive a reload)
_LOCK = threading.RLock()


def load_module(path: Path | str) -> ModuleType:
    """The module in file `path` as its bytes are now (and those of the workspace modules it imports)."""
    file = str(Path(path).resolve())
    with _LOCK:
        loaded = _current(file, {})
        if _EXECUTING and _EXECUTING[-1] is not loaded:  # `import_object` while another workspace
            _EXECUTING[-1].deps[file] = loaded  # module executes: that one depends on this one
        return loaded.module


def _current(path: str, seen: dict[str, _Loaded]) -> _Loaded:
    """The loaded version of `path`, executed again when its bytes or any of its deps changed.
    `seen` holds what this check has settled (and breaks import cycles)."""
    if path in seen:
        return seen[path]
    old = _LOADED.get(path)
    if old is not None and old in _EXECUTING:
        return old  # an import cycle: the partly executed module, as Python's import gives it
    source = Path(path).read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    if old is not None and old.digest == digest:
        seen[path] = old
        if all(_current(dep, seen) is bound for dep, bound in list(old.deps.items())):
            return old
    fresh = _execute(path, source, digest)
    seen[path] = fresh
    return fresh


def _execute(path: str, source: bytes, digest: str) -> _Loaded:
    name = f"retort_user_{Path(path).stem}_{hashlib.blake2b(path.encode(), digest_size=6).hexdigest()}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    folders = _import_folders(Path(path).parent)
    loaded = _Loaded(module, digest)
    module.__dict__["__builtins__"] = {**vars(builtins), "__import__": _importer(folders, loaded)}
    _VERSIONS[id(module.__dict__)] = loaded
    # Compiled from the bytes hashed above, never from a __pycache__ file that may predate an edit.
    code = compile(source, path, "exec", dont_inherit=True)
    previous = _LOADED.get(path)
    _LOADED[path] = loaded
    sys.modules[name] = module  # dataclasses and pickle look a class's module up by name
    _EXECUTING.append(loaded)
    try:
        exec(code, module.__dict__)
        # Imports inside function bodies run later: load them now so that the digest covers them.
        for dep in _imported_files(source, path, folders):
            if dep not in loaded.deps:
                loaded.deps[dep] = _current(dep, {})
    except BaseException:
        if previous is None:
            _LOADED.pop(path, None)
            sys.modules.pop(name, None)
        else:
            _LOADED[path] = previous
            sys.modules[name] = previous.module
        raise
    finally:
        _EXECUTING.pop()
    return loaded


def _import_folders(folder: Path) -> tuple[Path, ...]:
    library = builtin_root() / "evaluators"
    return (folder,) if folder == library else (folder, library)


def _find_module(name: str, folders: tuple[Path, ...]) -> str | None:
    for folder in folders:
        file = folder / f"{name}.py"
        if file.is_file():
            return str(file.resolve())
    return None


def _imported_files(source: bytes, path: str, folders: tuple[Path, ...]) -> list[str]:
    """The workspace modules that `import x` / `from x import y` statements anywhere in `source` name."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if "." not in alias.name]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and "." not in node.module:
            names.append(node.module)
    found = (_find_module(name, folders) for name in dict.fromkeys(names))
    return [file for file in found if file is not None and file != path]


def _importer(folders: tuple[Path, ...], owner: _Loaded) -> Callable[..., ModuleType]:
    real = builtins.__import__

    def __import__(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                   level: int = 0) -> ModuleType:
        file = _find_module(name, folders) if level == 0 and "." not in name else None
        if file is None:
            return real(name, globals, locals, fromlist, level)
        with _LOCK:
            # While `owner` executes, the version is settled now; later (an import inside a function,
            # at call time) it is the version that was settled then, which its digest covers.
            loaded = None if owner in _EXECUTING else owner.deps.get(file)
            if loaded is None:
                loaded = owner.deps[file] = _current(file, {})
            return loaded.module

    return __import__


def code_digest(obj: Any) -> str:
    """A digest of the code behind a function or class: its module's bytes as executed, and for a
    workspace module those of every workspace module it imports, transitively."""
    module_vars = getattr(obj, "__globals__", None)
    if module_vars is None:
        module_vars = vars(sys.modules[obj.__module__]) if getattr(obj, "__module__", None) in sys.modules else {}
    loaded = _VERSIONS.get(id(module_vars))
    if loaded is None:
        return _module_digest(obj)
    closure: dict[int, str] = {}
    stack = [loaded]
    while stack:
        item = stack.pop()
        if id(item) not in closure:
            closure[id(item)] = item.digest
            stack.extend(item.deps.values())
    body = loaded.digest + "\0" + "\0".join(sorted(closure.values()))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


_MODULE_DIGESTS: dict[str, str] = {}


def _module_digest(obj: Any) -> str:
    """A module on sys.path: Python imports it once, so its file as first seen is the closest to what runs."""
    try:
        file = inspect.getsourcefile(obj)
        if file and file in _MODULE_DIGESTS:
            return _MODULE_DIGESTS[file]
        source = Path(file).read_bytes() if file else inspect.getsource(obj).encode()
    except (OSError, TypeError):  # a builtin, or defined in a REPL
        return hashlib.sha256(getattr(obj, "__qualname__", repr(obj)).encode()).hexdigest()[:16]
    digest = hashlib.sha256(source).hexdigest()[:16]
    if file:
        _MODULE_DIGESTS[file] = digest
    return digest


def import_object(ref: str, workspace: Workspace | None = None) -> Any:
    """Import `module:attr`. A module that is a file in an evaluators/ folder wins over sys.path."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise NotFoundError(f"{ref!r} is not of the form module:attribute")
    for root in (workspace or Workspace()).roots:
        file = root / "evaluators" / f"{module_name.replace('.', '/')}.py"
        if file.is_file():
            module = load_module(file)
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
