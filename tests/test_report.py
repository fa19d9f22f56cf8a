"""retort.report: the HTML page is self-contained, draws every mark and escapes every name."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from typing import Any

import pytest
from rich.console import Console

from retort.report import (
    Column,
    CostRow,
    Disagreement,
    PairDisagreements,
    Table,
    build,
    html_page,
    json_doc,
    markdown,
    render_terminal,
    terminal,
    to_html,
    to_json,
    to_markdown,
)
from retort.stats import Comparison, compare_strategies

EVIL = "<script>alert(1)</script>"
NAMES = ["zero-shot", "chain-of-thought", EVIL, 'a & b "quoted" | piped']


def _comparison(names: list[str] = NAMES, n: int = 150) -> Comparison:
    """Right on a run of items; accuracy rises with the position of the name (0.5, 0.6, 0.7), and the
    fourth is as accurate as the third on other items: a clear difference from the first, none from the third."""
    runs = [range(0, n // 2), range(0, n * 6 // 10), range(0, n * 7 // 10), range(n // 10, n * 8 // 10)]
    items = {name: [i in runs[k] for i in range(n)] for k, name in enumerate(names)}
    return compare_strategies(items, resamples=300, seed=1)


def _costs(names: list[str] = NAMES) -> list[CostRow]:
    return [CostRow(name, calls=150 * (k + 1), prompt_tokens=20_000 * (k + 1) ** 2, completion_tokens=5_000 * (k + 1),
                    wall_seconds=12.5 * (k + 1), cost_usd=None if k == 2 else 0.01 * (k + 1))
            for k, name in enumerate(names)]


class _Page(HTMLParser):
    """Collects every element with its attributes and the id of the chart it sits in."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "source", "area", "base", "col", "embed", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text: list[str] = []
        self._stack: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        chart = a["id"] if tag == "svg" and "id" in a else (self._stack[-1][1] if self._stack else None)
        self.elements.append((tag, a, chart))
        if tag not in self.VOID:
            self._stack.append((tag, chart))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a, self._stack[-1][1] if self._stack else None))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a, _ in self.elements if "id" in a}

    def marks(self, chart: str, cls: str) -> list[dict[str, str]]:
        return [a for _, a, c in self.elements if c == chart and cls in a.get("class", "").split()]


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    return _comparison()


@pytest.fixture(scope="module")
def page(comparison: Comparison) -> str:
    return to_html(comparison, _costs(), spec="pipelines/<b>demo</b>.yaml", title="Strategies & co",
                   generated="2025-01-02 03:04 UTC")


# --------------------------------------------------------------------------- HTML


def test_html_has_the_three_charts_with_one_mark_per_strategy_or_pair(page: str, comparison: Comparison) -> None:
    doc = _parse(page)
    assert {"chart-metric", "chart-pareto", "chart-diffs"} <= doc.ids()
    assert len(doc.marks("chart-metric", "bar")) == len(comparison.strategies) == 4
    assert len(doc.marks("chart-pareto", "point")) == len(comparison.strategies)
    assert len(doc.marks("chart-diffs", "diff")) == len(comparison.pairs) == 6
    assert not doc.marks("chart-metric", "point") and not doc.marks("chart-pareto", "bar")


def test_html_marks_carry_the_numbers(page: str, comparison: Comparison) -> None:
    doc = _parse(page)
    bars = doc.marks("chart-metric", "bar")
    assert [float(b["data-value"]) for b in bars] == [s.metric.estimate for s in comparison.strategies]
    assert all(float(b["width"]) > 0 for b in bars)
    diffs = doc.marks("chart-diffs", "diff")
    assert [("significant" in d["class"].split()) for d in diffs] == [p.significant for p in comparison.pairs]
    assert any(p.significant for p in comparison.pairs) and not all(p.significant for p in comparison.pairs)


def test_html_highlights_the_pareto_front(page: str) -> None:
    doc = _parse(page)
    report = json.loads(to_json(_comparison(), _costs()))
    front_marks = [p for p in doc.marks("chart-pareto", "point") if "front" in p["class"].split()]
    assert len(front_marks) == len(report["pareto_front"]) >= 1
    assert doc.marks("chart-pareto", "front-line") or len(report["pareto_front"]) == 1


def test_html_is_self_contained(page: str) -> None:
    doc = _parse(page)
    assert "http://" not in page and "https://" not in page
    for tag, attrs, _ in doc.elements:
        assert not any(v.lstrip().startswith("//") for v in attrs.values()), attrs  # protocol-relative
        assert tag not in {"script", "link", "img", "iframe", "object", "embed"}, tag
        for name in ("src", "href", "xlink:href", "action", "srcset", "poster"):
            assert name not in attrs, (tag, name, attrs[name])
    assert "url(" not in page and "@import" not in page
    csp = [a["content"] for t, a, _ in doc.elements if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]


def test_html_escapes_user_strings(page: str) -> None:
    doc = _parse(page)
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>demo</b>" not in page and "&lt;b&gt;demo&lt;/b&gt;" in page
    assert "Strategies &amp; co" in page
    assert not any(tag in {"script", "b"} for tag, _, _ in doc.elements)
    text = "".join(doc.text)
    assert EVIL in text and 'a & b "quoted" | piped' in text and "pipelines/<b>demo</b>.yaml" in text
    # attributes round-trip too: the parser hands back the original name
    names = [a["data-strategy"] for t, a, _ in doc.elements if "data-strategy" in a]
    assert EVIL in names and 'a & b "quoted" | piped' in names


def test_html_shows_title_spec_date_and_the_numbers_table(page: str, comparison: Comparison) -> None:
    doc = _parse(page)
    text = " ".join(doc.text)
    assert "Strategies & co" in text and "2025-01-02 03:04 UTC" in text
    assert {"table-strategies", "table-pairs"} <= doc.ids()
    rows = [a for t, a, _ in doc.elements if t == "tr"]
    assert len(rows) == (1 + len(comparison.strategies)) + (1 + len(comparison.pairs))
    assert f"{comparison.strategies[0].metric.estimate:.3f}" in text


def test_html_is_deterministic(comparison: Comparison) -> None:
    kwargs = {"spec": "s.yaml", "generated": "2025-01-01"}
    assert to_html(comparison, _costs(), **kwargs) == to_html(comparison, _costs(), **kwargs)


def test_html_with_one_strategy_and_no_costs() -> None:
    c = _comparison(["only"])
    doc = _parse(to_html(c, generated="today"))
    assert {"chart-metric", "chart-pareto", "chart-diffs"} <= doc.ids()
    assert len(doc.marks("chart-metric", "bar")) == 1
    assert doc.marks("chart-pareto", "point") == []
    assert doc.marks("chart-diffs", "diff") == []
    text = " ".join(doc.text)
    assert "no pairs" in text and "No cost rows" in text


def test_html_with_scores_outside_zero_one_and_spread_out_costs() -> None:
    c = compare_strategies({"x": [3.0, 4.5, 5.0, 2.0], "y": [1.0, 4.0, 6.5, 2.5]}, resamples=100)
    # a CostRow and a plain mapping; 100 against 900,000 tokens calls for a log-scale x axis
    costs: list[CostRow | dict[str, Any]] = [CostRow("x", prompt_tokens=100),
                                             {"strategy": "y", "prompt_tokens": 900_000}]
    doc = _parse(to_html(c, costs, metric_name="judge score", generated="today"))
    assert len(doc.marks("chart-metric", "bar")) == 2 and len(doc.marks("chart-pareto", "point")) == 2
    assert len(doc.marks("chart-diffs", "diff")) == 1
    assert "log scale" in " ".join(doc.text)


# --------------------------------------------------------------------------- cost rows


def test_cost_rows_from_mappings_and_unknown_strategies() -> None:
    c = _comparison(["a", "b"])
    data = json.loads(to_json(c, [{"strategy": "a", "calls": 3, "prompt_tokens": 10, "completion_tokens": 5,
                                   "wall_seconds": 1.5, "cost_usd": None}]))
    (row,) = data["costs"]
    assert row["total_tokens"] == 15 and row["cost_usd"] is None
    assert row["metric"] == c.strategy("a").metric.estimate  # filled from the comparison
    with pytest.raises(ValueError, match="not a strategy"):
        to_html(c, [CostRow("missing")])


# --------------------------------------------------------------------------- Markdown, JSON, terminal


def test_markdown_tables_escape_pipes_and_html(comparison: Comparison) -> None:
    md = to_markdown(comparison, _costs(), spec="demo.yaml", generated="2025-01-02")
    assert md.startswith("# Strategy comparison\n")
    assert "spec `demo.yaml`" in md and "2025-01-02" in md
    assert EVIL not in md and "&lt;script&gt;" in md
    assert "a &amp; b \"quoted\" \\| piped" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == (1 + len(comparison.strategies)) + (1 + len(comparison.pairs))
    # every row of the strategies table has the same number of cells as its header
    header_cells = table_rows[0].count(" | ")
    assert all(row.replace("\\|", "").count(" | ") == header_cells for row in table_rows[1:5])


def test_json_is_complete_and_parses(comparison: Comparison) -> None:
    data = json.loads(to_json(comparison, _costs(), spec="demo.yaml", generated="2025-01-02"))
    assert data["spec"] == "demo.yaml" and data["metric"] == "accuracy"
    assert data["comparison"] == json.loads(json.dumps(comparison.to_dict()))
    assert [row["strategy"] for row in data["costs"]] == NAMES
    assert set(data["pareto_front"]) <= set(NAMES)


def test_terminal_prints_names_literally() -> None:
    names = ["plain", "[red]not markup[/red]", EVIL]
    c = _comparison(names)
    for width in (80, 140):
        out = io.StringIO()
        console = Console(file=out, width=width, record=True, color_system=None)
        render_terminal(c, _costs(names), spec="demo.yaml", console=console)
        text = console.export_text()
        assert "Paired differences" in text and "demo.yaml" in text
        assert "[red]not" in text.replace("\n", " ") or "[red]not markup[/red]" in text
        assert "plain" in text


# --------------------------------------------------------------------------- what a caller adds, as data


def _with_extras(comparison: Comparison) -> Any:
    """A report with a caller's table and the items two strategies disagree on, built as `retort compare` does."""
    table = Table("strategies", "table-metrics", "Strategies and all metrics",
                  (Column("strategy"), Column("run", numeric=True, detail=True), Column("f1 <95% CI>", numeric=True)),
                  tuple((name, str(k), f"0.{k}00 [0.{k}00, 0.{k}50]") for k, name in enumerate(NAMES, 1)),
                  note="Missing items <score> 0.")
    items = tuple(Disagreement(str(i), f"text {i} & <i>", "pos", None if i == 3 else "neg", "pos") for i in range(5))
    pairs = (PairDisagreements(NAMES[0], EVIL, items, 42, f"retort compare demo --disagree {NAMES[0]} x"),
             PairDisagreements(NAMES[1], NAMES[2], (), 0, "unused"))
    return build(comparison, _costs(), spec="demo.yaml", generated="2025-01-02", tables=[table],
                 disagreements=pairs, details={"compare": {"item_ids": ["a", "b"]}})


def test_html_draws_the_callers_sections_from_the_report_data(comparison: Comparison) -> None:
    r = _with_extras(comparison)
    page = html_page.render(r)
    doc = _parse(page)
    assert {"strategies", "table-metrics", "disagreements"} <= doc.ids()
    # in order, after the report's own tables and before the footer, each once
    order = [page.index(mark) for mark in ('id="table-pairs"', '<section id="strategies">',
                                           '<section id="disagreements">', "<footer>")]
    assert order == sorted(order) and page.count("<footer>") == 1 and page.count('id="strategies"') == 1
    strategies = page.split('<section id="strategies">', 1)[1].split("</section>", 1)[0]
    assert strategies.count("<tr>") == 1 + len(NAMES) and strategies.count('<td class="n">') == 2 * len(NAMES)
    assert "Missing items &lt;score&gt; 0." in strategies and "f1 &lt;95% CI&gt;" in strategies
    section = page.split('<section id="disagreements">', 1)[1].split("</section>", 1)[0]
    assert section.count("<h3>") == 1  # a pair without disagreements gets no table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: 42 items" in section and EVIL not in page
    assert section.count("<tr>") == 1 + 5 and "text 0 &amp; &lt;i&gt;" in section and "\u2014" in section
    assert "37 more: retort compare demo --disagree zero-shot x" in section
    # the same comparison without extras has none of it: the page is drawn from data, not patched
    plain = html_page.render(build(comparison, _costs(), spec="demo.yaml", generated="2025-01-02"))
    assert 'id="strategies"' not in plain and 'id="disagreements"' not in plain
    assert plain.split("<footer>")[1] == page.split("<footer>")[1]


def test_markdown_json_and_terminal_show_the_callers_table(comparison: Comparison) -> None:
    r = _with_extras(comparison)
    md = markdown.render(r)
    plain = markdown.render(build(comparison, _costs(), spec="demo.yaml", generated="2025-01-02"))
    assert md.startswith(plain.rstrip("\n") + "\n\n## Strategies and all metrics\n\n| strategy | run | f1 <95% CI> |")
    assert md.endswith("\n\nMissing items <score> 0.\n") and md.count("\n| ") - plain.count("\n| ") == 1 + len(NAMES)
    data = json.loads(json_doc.render(r))
    assert data["compare"] == {"item_ids": ["a", "b"]} and list(data)[:-1] == list(json.loads(json_doc.render(
        build(comparison, _costs(), spec="demo.yaml", generated="2025-01-02"))))
    for width, shown in ((140, True), (80, False)):
        out = io.StringIO()
        console = Console(file=out, width=width, record=True, color_system=None)
        terminal.render(r, console)
        text = console.export_text()
        assert "Strategies and all metrics" in text and "0.400 [0.400, 0.450]" in text
        assert (" run " in text) is shown  # a detail column, dropped in a narrow terminal
