"""Compare that meets real data: one significance rule with Holm's correction, a plain verdict,
warnings for strategies with missing predictions, and --input/--map/--set/--sample on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retort.report import to_markdown
from retort.stats import compare_strategies, holm
from tests.conftest import run_cli
from tests.test_compare import SCRIPTED, _write
from tests.test_compare import ws as ws


def test_holm_matches_the_textbook_steps() -> None:
    # p sorted 0.01, 0.03, 0.04 over m = 3: 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; 1 * 0.04 -> kept monotone at 0.06
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 2 * 0.5 caps at 1; monotone after it
    assert holm([0.001, 0.2, 0.01, 0.04]) == pytest.approx([0.004, 0.2, 0.03, 0.08])
    assert holm([]) == []


def test_significant_means_holm_adjusted_p_below_alpha() -> None:
    right = [True] * 40 + [False] * 10
    items = {"a": right, "b": [not x if i < 14 else x for i, x in enumerate(right)], "c": list(right)}
    c = compare_strategies(items, resamples=500)
    for p in c.pairs:
        assert p.significant == (p.p_holm < 0.05)  # the one rule, whatever the interval says
        assert p.p_holm >= p.p_value
        if p.mcnemar:
            assert p.p_value == p.mcnemar.p_value
    assert [p.p_holm for p in c.pairs] == pytest.approx(holm([p.p_value for p in c.pairs]))
    assert c.pair("a", "b").significant and not c.pair("a", "c").significant  # 14 flips vs none


def test_the_verdict_names_the_winner_and_warns_about_missing_predictions() -> None:
    right = [True] * 45 + [False] * 5
    items = {"good": right, "poor": [i % 2 == 0 for i in range(50)], "silent": [False] * 50}
    text = to_markdown(compare_strategies(items, resamples=500), missing={"silent": 50, "poor": 3})
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "warning: silent has no prediction for any of the 50 items" in verdict
    assert "warning: poor has no prediction for 3 of 50 items" in verdict
    assert "good beats poor by 40.0 points" in verdict and "significant after Holm correction" in verdict
    assert "silent beats" not in verdict
    assert "adjusted for the 3 pairs by Holm's method" in text


def test_compare_takes_input_map_set_and_a_seeded_sample(ws: Path) -> None:
    rows = [{"id": f"x{i}", "words": f"item {i}", "gold": "pos" if i % 2 == 0 else "neg"} for i in range(30)]
    _write(ws, "data/other_items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    args = ["compare", "tiny", "--model", SCRIPTED, "-q", "--format", "json", "--input", "data/other_items.jsonl",
            "--map", "text=words", "--map", "label=gold", "--sample", "6", "--seed", "3",
            "--set", "stages.classify.params.temperature=0"]
    out = run_cli(*args, cwd=ws)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["comparison"]["n_items"] == 6
    ids = report["compare"]["item_ids"]
    assert len(ids) == 6 and ids != [str(i) for i in range(6)]  # a random subset, by the rows' places
    assert report["verdict"] and report["significance"].startswith("A pair is significant")
    again = json.loads(run_cli(*args, cwd=ws).stdout)
    assert again["compare"]["item_ids"] == ids  # the same seed, the same items


def test_the_html_report_shows_disagreements_with_their_texts(ws: Path) -> None:
    out = run_cli("compare", "tiny", "--model", SCRIPTED, "-q", cwd=ws)
    assert out.returncode == 0, out.stderr
    page = (ws / "reports" / "tiny" / "report.html").read_text()
    section = page.split('<section id="disagreements">', 1)[1].split("</section>", 1)[0]
    # one vs two differ on items 6, 7, 8 and 9 (two has no answer for 9): texts, both answers, the reference
    assert "one vs two: 4 items" in section
    assert "<td>item 6</td><td>pos</td><td>neg</td><td>pos</td>" in section
    assert "<td>item 9</td><td>pos</td><td>\u2014</td><td>neg</td>" in section
    verdict = page.split('<section id="verdict">', 1)[1].split("</section>", 1)[0]
    assert "two has no prediction for 1 of 10 items" in verdict


@pytest.mark.http
def test_an_endpoint_named_without_a_model_uses_the_one_it_serves(workspace: Path) -> None:
    from tests.hostile_server import MODEL, Hostile

    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"q{i}"}) for i in range(3)))
    (workspace / "pipelines" / "p.yaml").write_text(
        "input: {path: data/rows.jsonl}\nstages:\n  - {name: ask, template: 'Q: {{ text }}'}\n")
    with Hostile(lifetime=120) as server:
        out = run_cli("run", "p", "-q", "--json", "--model", f"*={server.url}", cwd=workspace)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["calls_made"] == 3 and server.requests >= 3
    con = __import__("duckdb").connect(str(workspace / ".retort" / "retort.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT DISTINCT model FROM calls").fetchall() == [(f"openai:{MODEL}",)]
    finally:
        con.close()
