"""The wheel as a user installs it: built from this checkout, installed WITHOUT extras in a fresh
venv (dependencies from PyPI), and every built-in pipeline run through the installed `retort`.

The replies come from `retort.backends.scripted:parsable`, which answers whatever a stage's
parser accepts (a choice, a JSON value of the schema, a final number), so this test does not
depend on the built-in prompts' wording. Slow (a build and an install); it runs in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.wheel

PIPELINES = ["sse_cot", "cdmt", "lbt_m1", "lbt_m2", "lbt_m3", "bridge", "direct", "zero_shot_cot"]
MODELS = "*=scripted:retort.backends.scripted:parsable"
# Stage tables that generic replies leave empty by the pipeline's design, and why.
EMPTY = {
    ("cdmt", "retry"): "the rows to ask again, only with params.rationalize=true (off by default, as the reference)",
    ("cdmt", "rationalize"): "asks again only the rows of retry",
    ("lbt_m1", "problem_vec"): "embeds problems only with params.exam=knn",
    ("lbt_m2", "problem_vec"): "embeds problems only with params.exam=knn",
    ("lbt_m2", "pairs"): "pairs a better with a worse rationale; generic replies score every rationale alike",
}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) holding the wheel of this checkout and nothing else of ours."""
    base = tmp_path_factory.mktemp("wheel")
    built = _ok([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(base / "dist")])
    wheels = list((base / "dist").glob("retort-*.whl"))
    assert len(wheels) == 1, built
    wheel = wheels[0]
    _ok([sys.executable, "-m", "venv", str(base / "venv")])
    python = base / "venv" / "bin" / "python"
    _ok([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    return base / "venv"


def _ok(cmd: list[str], **kwargs: object) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=_env(), **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout  # type: ignore[no-any-return]


def _env() -> dict[str, str]:
    """The caller's environment without anything that would put this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "RETORT_ALLOWED_BACKENDS": "scripted", "COLUMNS": "200"}


def retort(venv: Path, *args: str, cwd: Path, allow: str = "scripted") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "retort"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**_env(), "RETORT_ALLOWED_BACKENDS": allow}, timeout=1200)


def test_the_wheel_holds_no_extra_and_runs_every_builtin_pipeline(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    where = _ok([python, "-c", "import retort; print(retort.__file__)"], cwd=tmp_path)
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout
    for optional in ("langchain_core", "llama_cpp", "vllm"):
        absent = subprocess.run([python, "-c", f"import {optional}"], capture_output=True, env=_env(), cwd=tmp_path)
        assert absent.returncode != 0, f"{optional} is installed: the test would not show it is optional"

    listed = retort(venv, "list", cwd=tmp_path)
    assert listed.returncode == 0 and all(name in listed.stdout for name in PIPELINES), listed.stdout

    for name in PIPELINES:
        workspace = tmp_path / name  # one workspace each: stage names repeat across pipelines
        workspace.mkdir()
        done = retort(venv, "run", name, "--model", MODELS, "--json", cwd=workspace)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        result = json.loads(done.stdout)
        assert result["status"] == "ok" and result["stages"], name
        for stage in result["stages"]:
            if (name, stage["name"]) in EMPTY:
                continue
            assert stage["rows_out"] > 0, f"{name}.{stage['name']} is empty: {stage}"
            assert not stage["error"], f"{name}.{stage['name']}: {stage['error']}"
        last = [s["name"] for s in result["stages"] if (name, s["name"]) not in EMPTY][-1]
        out = workspace / "last.jsonl"
        exported = retort(venv, "export", last, "--format", "jsonl", "--out", str(out), cwd=workspace)
        assert exported.returncode == 0, f"{name}: {exported.stderr}"
        assert out.read_text().strip(), f"{name}: export of {last} is empty"


def test_the_langchain_path_without_its_extra_says_which_extra(venv: Path, tmp_path: Path) -> None:
    hint = 'pip install "retort[langchain]"'
    done = retort(venv, "run", "direct", "--model", "default=langchain:mymodels:make", cwd=tmp_path,
                  allow="scripted,langchain")
    assert done.returncode == 2, done.stderr
    assert hint in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import retort.runnable"], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True)
    assert imported.returncode == 1 and hint in imported.stderr.splitlines()[-1], imported.stderr
