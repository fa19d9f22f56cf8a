"""Bridge (pipelines/bridge.yaml): decisions per condition, seeded random decisions, the judge's order swap.

The scripted tutor echoes the decisions it was given ("Decisions error/strategy/
intention.") followed by a second sentence that stage (C) must trim away; the
scripted model decides careless / provide_hint / hint_mistake for every item.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import ROOT, SHARED, run_cli
from conftest import db_rows as _sql

SCRIPT = '''
import re


def _text(request):
    return "\\n".join(m["content"] for m in request.messages)


def _reply(text):
    if "What kind of error" in text:
        return "careless"
    if "Reply with JSON only" in text:
        return 'Sure: {"strategy": "provide_hint", "intention": "hint_mistake"}'
    if "Write the tutor's next message" in text:
        found = [re.search(p + r": (\\S+)", text) for p in ("The student's error", "Strategy", "Intention")]
        return "Tutor: Decisions " + "/".join(m.group(1) if m else "-" for m in found) + ". Let's look again."
    raise AssertionError(text)


def always_a(request):
    text = _text(request)
    return "A" if "Response A:" in text else _reply(text)


def prefers_hint(request):
    """Prefers whichever response used provide_hint (the model condition's strategy here)."""
    text = _text(request)
    if "Response A:" not in text:
        return _reply(text)
    a = re.search(r"Response A: (.*)", text).group(1)
    b = re.search(r"Response B: (.*)", text).group(1)
    if ("provide_hint" in a) == ("provide_hint" in b):
        return "It is a tie."
    return "A" if "provide_hint" in a else "Response B is better."
'''

SPEC = yaml.safe_load((ROOT / "pipelines" / "bridge.yaml").read_text())
PARAMS = SPEC["params"]
SAMPLE = json.loads((ROOT / "data" / "bridge_sample.json").read_text())


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "evaluators" / "bridgefake.py").write_text(SCRIPT)
    return workspace


def _run(ws: Path, judge: str = "always_a", *extra: str) -> dict[str, Any]:
    proc = run_cli("run", "bridge", "--model", f"*=scripted:bridgefake:{judge}", *extra, "--json", "-q", cwd=ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _in(value: str, labels: list[str]) -> str:
    return value if value in labels else "other"


def _random(item_id: str, seed: int, kind: str, labels: list[str]) -> str:
    digest = hashlib.md5(f"{item_id}:{seed}:{kind}".encode()).hexdigest()
    return labels[int(digest[:8], 16) % len(labels)]


def _expected_decisions(seed: int = 0) -> dict[tuple[str, str], str]:
    out = {}
    for i, conv in enumerate(SAMPLE):
        item, cid = str(i), conv["c_id"]
        out[(item, "none")] = "Decisions -/-/-."
        expert = (_in(conv["e"], PARAMS["errors"]), _in(conv["z_what"], PARAMS["strategies"]),
                  _in(conv["z_why"], PARAMS["intentions"]))
        out[(item, "expert")] = "Decisions " + "/".join(expert) + "."
        rand = (_random(cid, seed, "error", PARAMS["errors"]), _random(cid, seed, "strategy", PARAMS["strategies"]),
                _random(cid, seed, "intention", PARAMS["intentions"]))
        out[(item, "random")] = "Decisions " + "/".join(rand) + "."
        out[(item, "model")] = "Decisions careless/provide_hint/hint_mistake."
    return out


def test_each_condition_feeds_its_decisions_into_the_response(ws: Path) -> None:
    _run(ws)
    responses = {(item, cond): resp for item, cond, resp in _sql(ws, "SELECT item, condition, response FROM "
                                                                     "main.respond WHERE _error IS NULL")}
    assert responses == _expected_decisions()  # and each reply is trimmed to its first sentence
    # a free-text expert label (the data has some) becomes `other`
    assert responses[("12", "expert")] == "Decisions other/other/other."
    assert _sql(ws, "SELECT count(*), count(DISTINCT condition) FROM main.conditions") == [(4 * len(SAMPLE), 4)]
    assert _sql(ws, "SELECT DISTINCT error, strategy, intention FROM main.conditions WHERE condition = 'none'") == [
        (None, None, None)]


def test_random_decisions_are_seeded_and_stable_across_runs(ws: Path, tmp_path_factory: pytest.TempPathFactory
                                                            ) -> None:
    query = "SELECT item_id, random_error, random_strategy, random_intention FROM main.items ORDER BY item_id"
    _run(ws)
    first = _sql(ws, query)
    other = tmp_path_factory.mktemp("again")
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (other / folder).mkdir()
    (other / "evaluators" / "bridgefake.py").write_text(SCRIPT)
    _run(other)
    assert _sql(other, query) == first  # a fresh database, the same decisions
    _run(other, "always_a", "--set", "params.seed=1")
    assert _sql(other, query) != first
    reseeded = {(i, c): r for (i, c), r in _expected_decisions(seed=1).items() if c == "random"}
    got = {(item, "random"): resp for item, resp in
           _sql(other, "SELECT item, response FROM main.respond WHERE condition = 'random'")}
    assert got == reseeded


def test_an_always_a_judge_splits_evenly_after_the_swap(ws: Path) -> None:
    _run(ws)
    n = len(SAMPLE)
    rows = _sql(ws, "SELECT comparison, n, items, wins, losses, ties, win_rate, tie_rate, ci_low, ci_high, "
                    "consistency, a_rate FROM main.win_rates__comparisons ORDER BY comparison")
    assert rows == [(c, 2 * n, n, n, n, 0, 0.5, 0.0, 0.5, 0.5, 0.0, 1.0)
                    for c in ("model vs none", "model vs reference", "none vs reference")]
    metrics = _sql(ws, "SELECT model_vs_none_win_rate, model_vs_none_tie_rate, comparisons FROM main.win_rates")
    assert metrics == [(0.5, 0.0, 3)]
    # every pair is judged in both orders, and each verdict maps back to the condition shown there
    assert _sql(ws, "SELECT swapped, cond_a, winner, outcome, count(*) FROM main.judgments "
                    "WHERE comparison = 'model vs none' GROUP BY ALL ORDER BY swapped") == [
        (False, "model", "model", "a", n), (True, "none", "none", "b", n)]
    recorded = dict(_sql(ws, "SELECT name, value FROM main.metrics WHERE stage = 'win_rates'"))
    assert recorded["model_vs_none_win_rate"] == 0.5


def test_a_judge_preferring_one_condition_gives_it_every_win(ws: Path) -> None:
    _run(ws, "prefers_hint")
    rows = {r[0]: r[1:] for r in _sql(ws, "SELECT comparison, win_rate, tie_rate, ci_low, ci_high, consistency "
                                          "FROM main.win_rates__comparisons")}
    assert rows["model vs none"] == (1.0, 0.0, 1.0, 1.0, 1.0)
    assert rows["model vs reference"] == (1.0, 0.0, 1.0, 1.0, 1.0)
    assert rows["none vs reference"] == (0.5, 1.0, 0.5, 0.5, 1.0)
    assert _sql(ws, "SELECT DISTINCT winner FROM main.judgments WHERE comparison = 'model vs none'") == [("model",)]


def test_conditions_and_comparisons_are_params(ws: Path) -> None:
    _run(ws, "always_a", "--set", "params.conditions=[none, expert, random]",
         "--set", "params.compare=[expert, random]", "--set", "params.against_reference=[]")
    assert _sql(ws, "SELECT count(*) FROM main.error_type") == [(0,)]  # no model condition: (A) and (B) idle
    assert _sql(ws, "SELECT count(*) FROM main.decisions") == [(0,)]
    assert _sql(ws, "SELECT DISTINCT condition FROM main.conditions ORDER BY 1") == [("expert",), ("none",),
                                                                                      ("random",)]
    assert _sql(ws, "SELECT DISTINCT comparison FROM main.judgments") == [("expert vs random",)]
    assert _sql(ws, "SELECT count(*) FROM main.judge") == [(2 * len(SAMPLE),)]


def test_rerun_makes_no_calls(ws: Path) -> None:
    assert _run(ws)["calls_made"] > 0
    assert _run(ws)["calls_made"] == 0


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retort_test_bridge", ROOT / "evaluators" / "bridge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_first_sentence() -> None:
    first = _module().first_sentence
    assert first("Tutor: Close! A hexagon has 6 sides.") == "Close!"
    assert first('"What is 3.5 times 2?" she asks. More.') == "What is 3.5 times 2?"
    assert first("\n\nLet's count the sides together\nSecond line.") == "Let's count the sides together"
    assert first("**Tutor:** Try 1/2. Then 1/3.") == "Try 1/2."
    from retort.errors import ParseError

    with pytest.raises(ParseError):
        first("  \n ...")


@pytest.mark.skipif(not (SHARED / "bridge" / "test.json").exists(), reason="../shared/datasets is absent")
def test_the_real_bridge_file_loads_with_just_input(ws: Path) -> None:
    path = SHARED / "bridge" / "test.json"
    proc = run_cli("validate", "bridge", "--input", str(path), "--model", "*=scripted:bridgefake:always_a", cwd=ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    _run(ws, "always_a", "--input", str(path), "--limit", "2")
    real = json.loads(path.read_text())[:2]
    items = _sql(ws, "SELECT item_id, topic, conversation, student_turn, expert_response, expert_error "
                     "FROM main.items ORDER BY item")
    assert [r[0] for r in items] == [c["c_id"] for c in real]
    for (_, topic, conversation, turn, expert, error), conv in zip(items, real, strict=True):
        assert topic == conv["lesson_topic"]
        assert conversation == "\n".join(f"{t['user']}: {t['text']}" for t in conv["c_h"])
        assert turn == conv["c_h"][-1]["text"]
        assert expert == " ".join(t["text"] for t in conv["c_r_"])
        assert error == _in(conv["e"], PARAMS["errors"])
    assert _sql(ws, "SELECT count(*) FROM main.respond") == [(8,)]
    assert _sql(ws, "SELECT count(*) FROM main.judgments") == [(2 * 2 * 3,)]


@pytest.mark.local_model
def test_end_to_end_on_the_embedded_model(workspace: Path) -> None:
    begun = time.monotonic()
    proc = run_cli("run", "bridge", "--limit", "2", "--set", "params.conditions=[none, expert, model]",
                   "--set", "params.compare=[expert, none]", "--set", "params.against_reference=[]",
                   "--json", "-q", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads(proc.stdout)["status"] == "ok"
    assert _sql(workspace, "SELECT count(*) FROM main.items") == [(2,)]
    assert _sql(workspace, "SELECT count(*) FROM main.error_type") == [(2,)]
    ((decided,),) = _sql(workspace, "SELECT count(*) FROM main.decisions WHERE _error IS NULL")
    assert _sql(workspace, "SELECT count(*) FROM main.conditions") == [(4 + decided,)]
    assert _sql(workspace, "SELECT count(*) FROM main.respond") == [(4 + decided,)]
    ((judged,),) = _sql(workspace, "SELECT count(*) FROM main.judge")
    assert judged == 4  # expert vs none, 2 items x 2 orders
    assert _sql(workspace, "SELECT count(*) FROM main.judgments") == \
        _sql(workspace, "SELECT count(*) FROM main.judge WHERE _error IS NULL")
    assert _sql(workspace, "SELECT count(*) FROM main.win_rates") == [(1,)]
    print(f"bridge on the embedded model: {time.monotonic() - begun:.1f}s")
