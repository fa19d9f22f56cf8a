"""Shared fixtures. Tests cannot reach a model by accident: only the scripted
backend is allowed unless a test asks for more with a marker (local_model, server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pytest

from retort.backends.base import Backend

B = TypeVar("B", bound=Backend)
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _guard_real_models(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = {"scripted"}
    if request.node.get_closest_marker("local_model"):
        allowed.add("local")
    if request.node.get_closest_marker("server"):
        allowed.add("openai")
    if request.node.get_closest_marker("http"):
        allowed.add("openai")
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", ",".join(sorted(allowed)))


def run_cli(*args: str, cwd: Path | str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python cli.py ARGS` in `cwd` as a user would; returns the finished process."""
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace folder with the four folders."""
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (tmp_path / folder).mkdir()
    return tmp_path


def db_rows(workspace: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` over the workspace's DuckDB file, opened read-only after the CLI has exited."""
    con = duckdb.connect(str(Path(workspace) / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def use(backend: B, call: Callable[[B], Awaitable[T]]) -> T:
    """Run one call on a backend in a fresh event loop, as the CLI does, closing it afterwards."""
    async def go() -> T:
        try:
            return await call(backend)
        finally:
            await backend.aclose()
    return asyncio.run(go())
