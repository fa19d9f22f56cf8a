"""retort compare: strategies on the same items, end to end on the scripted backend.

The test workspace holds its own tiny pipelines and a reply function that
answers by prompt prefix and item number, so every accuracy is known exactly:

    item i (0..9): text "item i", label pos (even i) or neg (odd i)
    one    (prefix A)                    wrong on 8 and 9                      -> 0.8
    two    (reason R, then classify B)   wrong on 6 and 7, item 9's call fails -> 0.7, 1 missing
    vote   (one, prefix C, 3 samples)    item 0: unparsable / neg / pos, a tie -> lowest _id, neg (wrong)
                                         item 3: two of three wrong; 5 and 8: all wrong  -> 0.6
    best   (one, prefix D; added later)  always right                          -> 1.0
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import duckdb
import pytest
from conftest import ROOT, run_cli

from retort import stats
from retort.cache import Cache
from retort.comparison import choice_match, find_comparison, load_comparison, majority, run_comparison
from retort.comparison.scoring import corpus_resamples
from retort.errors import SpecError
from retort.stats import bootstrap_ci, bootstrap_statistic
from retort.workspace import Workspace

N = 10
M = N + 1  # rows run, with the unlabelled one (run and paid for, not scored)
SCRIPTED = "*=scripted:script:reply"

REPLY = '''
import re

from retort.errors import BackendError


def _gold(i):
    return "pos" if i % 2 == 0 else "neg"


def _flip(label):
    return "neg" if label == "pos" else "pos"


def reply(request):
    text = request.messages[-1]["content"]
    kind, i = re.match(r"^([A-Z]): .*?item (\\d+)", text).groups()
    i = int(i)
    gold = _gold(i)
    if kind == "A":
        return _flip(gold) if i in (8, 9) else gold
    if kind == "R":
        if i == 9:
            raise BackendError("scripted outage", status=400, retryable=False)
        return f"because item {i}"
    if kind == "B":
        return _flip(gold) if i in (6, 7) else gold
    if kind == "C":
        if i == 0:
            return ["no idea", _flip(gold), gold]
        if i == 3:
            return [_flip(gold), gold, _flip(gold)]
        if i in (5, 8):
            return [_flip(gold)] * 3
        return [gold, _flip(gold), gold]
    if kind == "D":
        return gold
    raise AssertionError(text)
'''

SCORING = '''
def pos_rate(rows, prediction="prediction", reference="label"):
    """A user evaluator: the share of items predicted pos."""
    return {"pos_rate": sum(r[prediction] == "pos" for r in rows) / len(rows)}
'''

ONE = """
input: {path: data/other.jsonl}
stages:
  - name: classify
    template: "A: {{ text }}"
    parse: {choice: [pos, neg]}
    output: prediction
"""

TWO = """
input: {path: data/other.jsonl, limit: 3}
stages:
  - name: reason
    template: "R: {{ text }}"
    output: reasoning
  - name: classify
    from: reason
    template: "B: {{ reasoning }}"
    parse: {choice: [pos, neg]}
    output: prediction
"""

SPEC = """
name: tiny
description: three strategies on ten items
dataset: {path: data/items.jsonl, columns: {text: sentence}}
reference: label
text: text
predict: classify.prediction
metrics: [accuracy, macro_f1, pos_rate]
resamples: 500
strategies:
  one: one
  two: {pipeline: two}
  vote:
    pipeline: one
    set: {stages.classify.samples: 3, stages.classify.template: "C: {{ text }}"}
"""

BEST = """
  best:
    pipeline: one
    set: {stages.classify.template: "D: {{ text }}"}
"""

PREDICTIONS = {  # what each strategy ends up predicting per item (None: missing)
    "one": ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "neg", "pos"],
    "two": ["pos", "neg", "pos", "neg", "pos", "neg", "neg", "pos", "pos", None],
    "vote": ["neg", "neg", "pos", "pos", "pos", "pos", "pos", "neg", "neg", "neg"],
    "best": ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"],
}
ACCURACY = {"one": 0.8, "two": 0.7, "vote": 0.6, "best": 1.0}


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


@pytest.fixture
def ws(workspace: Path) -> Path:
    rows = [{"id": f"r{i}", "sentence": f"item {i}", "label": "pos" if i % 2 == 0 else "neg"} for i in range(N)]
    rows.append({"id": "unlabelled", "sentence": "item 10", "label": None})  # not scored
    _write(workspace, "data/items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(workspace, "evaluators/script.py", REPLY)
    _write(workspace, "evaluators/scoring.py", SCORING)
    _write(workspace, "pipelines/one.yaml", ONE)
    _write(workspace, "pipelines/two.yaml", TWO)
    _write(workspace, "comparisons/tiny.yaml", SPEC)
    return workspace


def _compare(ws: Path, *args: str) -> str:
    proc = run_cli("compare", "tiny", "--model", SCRIPTED, "-q", *args, cwd=ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def _db(ws: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)


def _macro_f1(predictions: list[str | None]) -> float:
    f1 = Workspace(ROOT).evaluator("metrics.macro_f1")
    rows = [{"prediction": p, "label": "pos" if i % 2 == 0 else "neg"} for i, p in enumerate(predictions)]
    return float(f1(rows)["macro_f1"])


def test_three_strategies_then_a_fourth_calls_only_the_fourth(ws: Path) -> None:
    report = json.loads(_compare(ws, "--format", "json"))
    details = {s["name"]: s for s in report["compare"]["strategies"]}
    assert list(details) == ["one", "two", "vote"]
    for name, s in details.items():
        assert s["metrics"]["accuracy"]["estimate"] == pytest.approx(ACCURACY[name])
        assert s["metrics"]["macro_f1"]["estimate"] == pytest.approx(_macro_f1(PREDICTIONS[name]))
        expected_pos = sum(p == "pos" for p in PREDICTIONS[name]) / N
        assert s["metrics"]["pos_rate"]["estimate"] == pytest.approx(expected_pos)
        low, high = s["metrics"]["macro_f1"]["low"], s["metrics"]["macro_f1"]["high"]
        assert low <= s["metrics"]["macro_f1"]["estimate"] <= high
    assert {n: s["missing"] for n, s in details.items()} == {"one": 0, "two": 1, "vote": 0}
    assert details["vote"]["rows"] == 3 * M and details["two"]["failures"] == 1

    # the generic report part: the primary metric, its pairs, costs and the front
    strategies = {s["name"]: s for s in report["comparison"]["strategies"]}
    assert report["metric"] == "accuracy" and report["comparison"]["n_items"] == N
    assert strategies["one"]["metric"]["estimate"] == pytest.approx(0.8)
    pair = next(p for p in report["comparison"]["pairs"] if (p["a"], p["b"]) == ("one", "two"))
    assert pair["diff"]["estimate"] == pytest.approx(0.1)
    assert (pair["mcnemar"]["b01"], pair["mcnemar"]["b10"]) == (1, 2)  # 8: two right; 6, 7: one right
    costs = {c["strategy"]: c for c in report["costs"]}
    assert costs["one"]["calls"] == M and costs["two"]["calls"] == 2 * M - 1 and costs["vote"]["calls"] == 3 * M
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 for c in costs.values())
    assert costs["one"]["cost_usd"] is None  # the scripted model has no price
    assert report["pareto_front"][0] == "one"  # fewest tokens and the best accuracy

    out = ws / "reports" / "tiny"
    for name in ("report.md", "report.json", "report.html"):
        assert (out / name).stat().st_size > 500
    md = (out / "report.md").read_text()
    assert "| one | 0.800 |" in md and "## Strategies and all metrics" in md and "1 of 10" in md

    con = _db(ws)
    try:
        items = con.sql("SELECT strategy, item_id, prediction, reference, score FROM compare_items "
                        "WHERE comparison = 'tiny' ORDER BY strategy, CAST(item_id AS INTEGER)").fetchall()
        metrics = con.sql("SELECT pipeline, name, value, data FROM metrics WHERE stage = 'compare:tiny'").fetchall()
        calls_before = dict(con.sql("SELECT run_id, count(*) FROM calls GROUP BY run_id").fetchall())
        runs_before = con.sql("SELECT max(run_id) FROM runs").fetchall()[0][0]
    finally:
        con.close()
    assert len(items) == 3 * N
    vote = [r for r in items if r[0] == "vote"]
    assert [r[2] for r in vote] == PREDICTIONS["vote"] and [r[4] for r in vote] == [0, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    assert next(r for r in items if r[:2] == ("two", "9"))[2:] == (None, "neg", 0.0)
    assert len(metrics) == 9
    acc = {r[0]: (r[2], json.loads(r[3])) for r in metrics if r[1] == "accuracy"}
    assert acc["two"][0] == pytest.approx(0.7) and acc["two"][1]["missing"] == 1
    assert acc["two"][1]["low"] <= 0.7 <= acc["two"][1]["high"]
    assert sum(calls_before.values()) == M + (2 * M - 2) + 3 * M  # a failed call is not cached

    # add a fourth strategy: only its run calls the model
    spec = ws / "comparisons" / "tiny.yaml"
    spec.write_text(spec.read_text() + BEST.lstrip("\n"))
    report = json.loads(_compare(ws, "--format", "json"))
    details = {s["name"]: s for s in report["compare"]["strategies"]}
    assert list(details) == ["one", "two", "vote", "best"]
    assert {n: s["metrics"]["accuracy"]["estimate"] for n, s in details.items()} == pytest.approx(ACCURACY)
    assert {n: s["calls_made"] for n, s in details.items()} == {"one": 0, "two": 0, "vote": 0, "best": M}
    assert {n: s["cache_hits"] for n, s in details.items()} == {"one": M, "two": 2 * M - 2, "vote": 3 * M,
                                                                 "best": 0}
    con = _db(ws)
    try:
        calls_after = dict(con.sql("SELECT run_id, count(*) FROM calls GROUP BY run_id").fetchall())
        made = dict(con.sql(f"SELECT run_id, CAST(stats->>'calls_made' AS INTEGER) FROM runs "
                            f"WHERE run_id > {runs_before}").fetchall())
        items = con.sql("SELECT count(*) FROM compare_items WHERE comparison = 'tiny'").fetchall()[0][0]
    finally:
        con.close()
    new = {run: n for run, n in calls_after.items() if run not in calls_before}
    assert list(new.values()) == [M] and new.keys() == {details["best"]["run_id"]}
    # strategies whose latest run is complete and unchanged are up to date: no new run for them
    assert made == {details["two"]["run_id"]: 0, details["best"]["run_id"]: M}
    assert details["one"]["run_id"] < details["two"]["run_id"] and details["vote"]["run_id"] <= runs_before
    assert items == 4 * N  # the comparison's rows were replaced, not appended


def test_disagree_lists_exactly_the_constructed_items(ws: Path) -> None:
    rows = json.loads(_compare(ws, "--disagree", "one", "two", "--format", "json"))
    assert [(r["item_id"], r["one"], r["two"], r["reference"]) for r in rows] == [
        ("6", "pos", "neg", "pos"), ("7", "neg", "pos", "neg"), ("8", "neg", "pos", "pos"), ("9", "pos", None, "neg")]
    assert rows[0]["text"] == "item 6"

    table = _compare(ws, "--disagree", "one", "vote")
    agree = {i for i in range(N) if PREDICTIONS["one"][i] == PREDICTIONS["vote"][i]}
    assert f"{N - len(agree)} items on which one and vote disagree" in table
    assert all(f"item {i}" in table for i in set(range(N)) - agree)
    assert not any(f"item {i} " in table for i in agree)

    proc = run_cli("compare", "tiny", "--model", SCRIPTED, "--disagree", "one", "nobody", cwd=ws)
    assert proc.returncode == 2 and "no strategy 'nobody'" in proc.stderr


def test_terminal_table_and_limit(ws: Path) -> None:
    out = _compare(ws, "--limit", "4", "--out", "elsewhere")
    assert "Comparison: tiny" in out and "Paired differences" in out and "Strategies and all metrics" in out
    assert (ws / "elsewhere" / "report.html").is_file() and not (ws / "reports").exists()
    con = _db(ws)
    try:
        assert con.sql("SELECT count(*) FROM compare_items").fetchall()[0][0] == 3 * 4
    finally:
        con.close()


def test_spec_errors_name_file_line_and_field(ws: Path) -> None:
    bad = ws / "comparisons" / "bad.yaml"
    bad.write_text("dataset: {path: data/items.jsonl}\nreference: label\nstrategies:\n  one:\n"
                   "    pipeline: one\n    sampels: 3\n")
    with pytest.raises(SpecError) as err:
        load_comparison(bad)
    assert (err.value.line, err.value.field) == (6, "strategies.one.sampels")
    assert "unknown field" in str(err.value)

    bad.write_text("dataset: {path: data/items.jsonl}\nreference: label\nstrategies:\n  one: one\n")
    with pytest.raises(SpecError) as err:
        load_comparison(bad)
    assert err.value.line == 4 and "predict" in str(err.value)

    bad.write_text("dataset: {path: data/items.jsonl}\nreference: label\npredict: nope.prediction\n"
                   "strategies:\n  one: one\n")
    proc = run_cli("compare", "bad", "--model", SCRIPTED, cwd=ws)
    assert proc.returncode == 2 and "bad.yaml:3 predict:" in proc.stderr and "no stage 'nope'" in proc.stderr

    bad.write_text("dataset: {path: data/items.jsonl}\nreference: label\npredict: classify.prediction\n"
                   "strategies:\n  one:\n    pipeline: one\n    set: {stages.nothing.samples: 2}\n")
    proc = run_cli("compare", str(bad), "--model", SCRIPTED, cwd=ws)
    assert proc.returncode == 2 and "bad.yaml:7 strategies.one.set" in proc.stderr and "nothing" in proc.stderr

    proc = run_cli("compare", "missing", cwd=ws)
    assert proc.returncode == 2 and "no comparison named 'missing'" in proc.stderr and "tiny" in proc.stderr


def test_majority_ties_go_to_the_lowest_id() -> None:
    assert majority([("3.1", "b"), ("3.0", "a"), ("3.2", "b")]) == "b"
    assert majority([("3.10", "b"), ("3.2", "a")]) == "a"  # 2 < 10 as numbers
    assert majority([("3.0", None), ("3.1", "Pos "), ("3.2", "neg"), ("3.3", "pos")]) == "Pos "
    assert majority([("3.0", None)]) is None


def test_bootstrap_statistic_reproduces_the_stats_module() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    (reps,) = bootstrap_statistic(len(values), [lambda idx: sum(values[i] for i in idx) / len(idx)],
                                  resamples=300, seed=7)
    ordered = sorted(reps)
    ci = bootstrap_ci(values, resamples=300, seed=7)
    assert ordered[7] <= ci.low <= ordered[8] and ordered[291] <= ci.high <= ordered[292]
    assert corpus_resamples(10, 2000) == 2000 and corpus_resamples(100_000, 2000) == 200


def test_choice_match_reads_letters() -> None:
    rows = [{"prediction": "(B) Paris", "label": "B"}, {"prediction": "b.", "label": "B"},
            {"prediction": "A", "label": "B"}, {"prediction": None, "label": "C"}, {"prediction": "x", "label": None}]
    assert choice_match(rows) == {"choice_match": 0.5, "n": 4, "correct": 2}


def test_builtin_example_runs_on_scripted_replies(workspace: Path) -> None:
    _write(workspace, "evaluators/always.py", "def reply(request):\n    return 'positive'\n")
    proc = run_cli("compare", "sentiment", "--limit", "3", "--model", "*=scripted:always:reply", "-q",
                   "--format", "json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names = [s["name"] for s in report["compare"]["strategies"]]
    assert {"direct", "zero_shot_cot", "sse_cot"} <= set(names)
    data = [json.loads(line) for line in (ROOT / "data" / "sst2_sample.jsonl").read_text().splitlines()[:3]]
    expected = sum(r["label"] == "positive" for r in data) / 3
    assert all(s["metrics"]["accuracy"]["estimate"] == pytest.approx(expected)
               for s in report["compare"]["strategies"])


def test_a_corpus_level_primary_metric_gets_paired_intervals_too(ws: Path) -> None:
    spec = (ws / "comparisons" / "tiny.yaml").read_text().replace(
        "metrics: [accuracy, macro_f1, pos_rate]",
        "metrics: [macro_f1, choice, {name: positives, evaluator: scoring.pos_rate, key: pos_rate}]")
    (ws / "comparisons" / "f1.yaml").write_text(spec.replace("name: tiny", "name: f1"))
    proc = run_cli("compare", "f1", "--model", SCRIPTED, "-q", "--format", "json", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["metric"] == "macro_f1"
    for s in report["comparison"]["strategies"]:
        assert s["metric"]["estimate"] == pytest.approx(_macro_f1(PREDICTIONS[s["name"]]))
        assert s["metric"]["low"] <= s["metric"]["estimate"] <= s["metric"]["high"] and not s["binary"]
    pairs = report["comparison"]["pairs"]
    assert len(pairs) == 3 and all(p["mcnemar"] is None for p in pairs)
    one_two = pairs[0]
    assert one_two["diff"]["estimate"] == pytest.approx(_macro_f1(PREDICTIONS["one"]) - _macro_f1(PREDICTIONS["two"]))
    assert [report["compare"]["item_ids"][i] for i in one_two["disagreements"]] == ["6", "7", "8", "9"]
    details = {s["name"]: s["metrics"] for s in report["compare"]["strategies"]}
    assert {n: m["choice"]["estimate"] for n, m in details.items()} == pytest.approx(
        {n: ACCURACY[n] for n in details})
    assert details["vote"]["positives"]["estimate"] == pytest.approx(0.5)
    con = _db(ws)
    try:
        scores = con.sql("SELECT strategy, sum(score) FROM compare_items WHERE comparison = 'f1' "
                         "GROUP BY strategy").fetchall()
    finally:
        con.close()
    assert {s: v / N for s, v in scores} == pytest.approx({n: ACCURACY[n] for n in details})  # accuracy per item


def test_cost_in_dollars_from_the_model_prices(ws: Path) -> None:
    spec = (ws / "comparisons" / "tiny.yaml").read_text() + textwrap.dedent("""
      priced:
        pipeline: one
        set: {models.default: {backend: scripted, function: "script:reply", price_input: 2.5, price_output: 10}}
    """).replace("\n", "\n  ")
    (ws / "comparisons" / "tiny.yaml").write_text(spec)
    report = json.loads(_compare(ws, "--limit", "4", "--format", "json"))
    costs = {c["strategy"]: c for c in report["costs"]}
    priced = costs["priced"]
    assert priced["prompt_tokens"] == 3 * 4 and priced["completion_tokens"] == 4  # "A: item i" -> "pos"
    assert priced["cost_usd"] == pytest.approx((12 * 2.5 + 4 * 10) / 1e6)
    assert costs["one"]["cost_usd"] is None


def test_every_interval_of_a_comparison_comes_from_the_stats_resampling(ws: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare has no resampling of its own: each metric's intervals are one call of stats.bootstrap_statistic."""
    seen: list[tuple[int, int, int]] = []
    real = stats.bootstrap_statistic

    def spy(n: int, statistics: list, *, resamples: int = 2000, seed: int = 0) -> list[list[float]]:
        seen.append((n, len(statistics), resamples))
        return real(n, statistics, resamples=resamples, seed=seed)

    monkeypatch.setattr(stats, "bootstrap_statistic", spy)
    workspace = Workspace(ws)
    cache = Cache(ws / ".retort" / "retort.duckdb")
    try:
        result = run_comparison(workspace, find_comparison(workspace, "tiny"), cache, progress=False,
                                model_targets={"*": "scripted:script:reply"}, log=lambda _: None)
    finally:
        cache.close()
    # accuracy, macro_f1 (corpus-level: recomputed per draw) and pos_rate: three strategies on ten items each
    assert seen == [(N, 3, 500)] * 3
    assert {n: iv.estimate for n, iv in result.intervals["accuracy"].items()} == pytest.approx(
        {n: ACCURACY[n] for n in ("one", "two", "vote")})
    assert {n: iv.estimate for n, iv in result.intervals["macro_f1"].items()} == pytest.approx(
        {n: _macro_f1(PREDICTIONS[n]) for n in ("one", "two", "vote")})


def test_compare_reaches_the_store_through_cache_methods_only() -> None:
    """No `.con`, no import of the command line (the import circle it had with cli.py) and nothing private of
    retort.stats in retort/comparison/."""
    for path in sorted((ROOT / "retort" / "comparison").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "con"], path
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "retort.cli" not in imported, path
        from_stats = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "retort.stats"
                      for a in n.names]
        assert not [name for name in from_stats if name.startswith("_")], path  # public functions only


def test_the_python_api_compares_like_the_cli(ws: Path) -> None:
    """`retort.compare` returns the scored result in process; a second call is answered from the cache."""
    import retort

    before = _db_calls(ws)
    result = retort.compare("tiny", models={"*": "scripted:script:reply"}, workspace=ws)
    made = _db_calls(ws) - before
    assert made > 0
    accuracy = {name: interval.estimate for name, interval in result.intervals["accuracy"].items()}
    assert accuracy == pytest.approx({n: ACCURACY[n] for n in ("one", "two", "vote")})
    assert result.missing(result.run("two")) == 1  # item 9 has no prediction from "two"
    again = retort.compare("tiny", models={"*": "scripted:script:reply"}, workspace=ws)
    assert _db_calls(ws) - before == made  # nothing called twice
    assert {n: i.estimate for n, i in again.intervals["accuracy"].items()} == accuracy


def _db_calls(ws: Path) -> int:
    if not (ws / ".retort" / "retort.duckdb").exists():
        return 0
    con = _db(ws)
    try:
        return int(con.execute("SELECT count(*) FROM calls").fetchall()[0][0])
    finally:
        con.close()
