"""The code that runs is the code the fingerprint names.

A workspace module (a file in evaluators/) is loaded again when its bytes, or those of a
workspace module it imports, change; a parse function's digest covers those imports; a
scripted model's identity names its function and that function's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from retort.workspace import Workspace, code_digest, import_object
from tests.conftest import run_cli

ROWS = [{"text": f"item {i}"} for i in range(6)]
PIPELINE = """\
name: p
models: {default: {backend: scripted, function: "answers:first"}}
input: {path: data/rows.jsonl}
stages:
  - {name: ask, template: 'Tell me about {{ text }}', parse: {function: "parsing:parse"}}
"""
ANSWERS = "def first(request):\n    return 'alpha'\n\n\ndef second(request):\n    return 'beta'\n"


def setup(workspace: Path, parsing: str) -> None:
    (workspace / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (workspace / "pipelines" / "p.yaml").write_text(PIPELINE)
    (workspace / "evaluators" / "answers.py").write_text(ANSWERS)
    (workspace / "evaluators" / "helper.py").write_text("def tag(text):\n    return text + '-v1'\n")
    (workspace / "evaluators" / "parsing.py").write_text(parsing)


def run(workspace: Path, *args: str) -> dict[str, Any]:
    done = run_cli("run", "p", "--json", *args, cwd=workspace)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def values(workspace: Path) -> list[str]:
    out = workspace / "ask.jsonl"
    done = run_cli("export", "ask", "--format", "jsonl", "--out", str(out), cwd=workspace)
    assert done.returncode == 0, done.stderr
    return sorted(json.loads(line)["ask"] for line in out.read_text().splitlines())


def calls(result: dict[str, Any]) -> tuple[int, int, int | None]:
    ask = result["stages"][0]
    return ask["calls_made"], ask["cache_hits"], ask["reused_from"]


# --- through the CLI -----------------------------------------------------------------------

TOP_LEVEL = "from helper import tag\n\n\ndef parse(text):\n    return tag(text)\n"
IN_BODY = "def parse(text):\n    import helper\n\n    return helper.tag(text)\n"
BY_NAME = ("from pathlib import Path\n\nfrom retort.workspace import Workspace, import_object\n\n"  # as the library's
           "tag = import_object('helper:tag', Workspace(Path(__file__).parent.parent))\n\n\n"  # classification.py
           "def parse(text):\n    return tag(text)\n")


@pytest.mark.parametrize("parsing", [TOP_LEVEL, IN_BODY, BY_NAME], ids=["from-import", "in-body", "import_object"])
def test_an_edited_helper_module_rebuilds_the_stage_with_new_values_and_no_call(workspace: Path, parsing: str) -> None:
    setup(workspace, parsing)
    first = run(workspace)
    assert calls(first) == (6, 0, None) and values(workspace) == ["alpha-v1"] * 6
    unchanged = run(workspace)
    assert unchanged["up_to_date"] and calls(unchanged) == (0, 6, first["run_id"])

    (workspace / "evaluators" / "helper.py").write_text("def tag(text):\n    return text + '-v2'\n")
    edited = run(workspace)
    assert not edited["up_to_date"]
    assert calls(edited) == (0, 6, None)  # rebuilt from the cache: the replies did not change
    assert values(workspace) == ["alpha-v2"] * 6
    assert run(workspace)["up_to_date"]


def test_another_scripted_function_is_another_model(workspace: Path) -> None:
    setup(workspace, BY_NAME)
    first = run(workspace)
    swapped = run(workspace, "--model", "default=scripted:answers:second")
    assert not swapped["up_to_date"] and calls(swapped) == (6, 0, None)
    assert values(workspace) == ["beta-v1"] * 6
    assert calls(run(workspace, "--model", "default=scripted:answers:second")) == (0, 6, swapped["run_id"])

    # The same function with other code is another model too; back to the first code, the first run.
    (workspace / "evaluators" / "answers.py").write_text(ANSWERS.replace("'alpha'", "'gamma'"))
    edited = run(workspace)
    assert calls(edited) == (6, 0, None) and values(workspace) == ["gamma-v1"] * 6
    (workspace / "evaluators" / "answers.py").write_text(ANSWERS)
    again = run(workspace)  # not the latest run's tables, so not "up to date": run 1's, linked
    assert calls(again) == (0, 6, first["run_id"])
    assert values(workspace) == ["alpha-v1"] * 6


# --- in one process: the loaded module follows the file ------------------------------------

def test_a_module_loads_again_when_its_bytes_or_an_import_change(workspace: Path) -> None:
    ws = Workspace(workspace)
    evaluators = workspace / "evaluators"
    (evaluators / "helper.py").write_text("N = 1\n")
    (evaluators / "user.py").write_text("from helper import N\n\n\ndef f():\n    return N\n")
    f1 = import_object("user:f", ws)
    assert f1() == 1 and import_object("user:f", ws) is f1  # unchanged: the same function, not run again

    (evaluators / "helper.py").write_text("N = 2\n")  # same size, same second: no stale bytecode either
    f2 = import_object("user:f", ws)
    assert f2() == 2 and f1() == 1  # a function loaded before keeps the code its digest named
    assert code_digest(f1) != code_digest(f2)
    (evaluators / "helper.py").write_text("N = 1\n")
    assert code_digest(import_object("user:f", ws)) == code_digest(f1)


def test_a_module_that_fails_to_load_keeps_the_last_good_version(workspace: Path) -> None:
    ws = Workspace(workspace)
    (workspace / "evaluators" / "m.py").write_text("def f():\n    return 'good'\n")
    good = import_object("m:f", ws)
    (workspace / "evaluators" / "m.py").write_text("raise RuntimeError('half-saved')\n")
    try:
        import_object("m:f", ws)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a module that raises while loading must not load")
    (workspace / "evaluators" / "m.py").write_text("def f():\n    return 'good'\n")
    assert import_object("m:f", ws) is good  # its bytes and the loaded version agree again
