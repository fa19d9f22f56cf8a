"""The report as Markdown, for a README or a pull request's comment."""

from __future__ import annotations

import html
from collections.abc import Sequence

from retort.report.formats import ci, grouped, num, pval, seconds, signed, usd
from retort.report.model import Disagreement, Report, rule, verdict


def cell(s: str) -> str:
    """A table cell of the report's own tables: HTML and pipes escaped, on one line."""
    return html.escape(s, quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def plain(value: object) -> str:
    """A cell of a caller's table or of a disagreement list: pipes escaped, on one line, nothing else touched."""
    return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")


def render(r: Report) -> str:
    c = r.comparison
    level = f"{c.confidence:.0%}"

    out = [f"# {cell(r.title)}", ""]
    meta = [f"spec `{cell(r.spec)}`"] if r.spec else []
    meta += [r.generated, f"{c.n_items:,} items",
             f"{level} percentile bootstrap CI, {c.resamples:,} resamples, seed {c.seed}"]
    out += [" \u00b7 ".join(meta), "", "## Verdict", ""]
    out += [f"- {cell(line)}" for line in verdict(r)] + [""]

    out += ["| strategy | " + cell(r.metric_name) + f" | {level} CI | calls | prompt tokens "
            "| completion tokens | wall | cost | Pareto |",
            "|---|--:|---|--:|--:|--:|--:|--:|:-:|"]
    for s in c.strategies:
        row = r.costs.get(s.name)
        money = ([grouped(row.calls), grouped(row.prompt_tokens), grouped(row.completion_tokens),
                  seconds(row.wall_seconds), usd(row.cost_usd)] if row else ["\u2014"] * 5)
        front = "\u2605" if s.name in r.front else ""
        out.append("| " + " | ".join([cell(s.name), num(s.metric.estimate), ci(s.metric), *money, front]) + " |")

    if c.pairs:
        out += ["", f"## Paired differences ({cell(r.metric_name)}, A \u2212 B)", "",
                f"| A | B | difference | {level} CI | significant | McNemar b01 / b10 | p | p (Holm) | disagreements |",
                "|---|---|--:|---|:-:|--:|--:|--:|--:|"]
        for p in c.pairs:
            mc = f"{p.mcnemar.b01} / {p.mcnemar.b10}" if p.mcnemar else "\u2014"
            out.append("| " + " | ".join([cell(p.a), cell(p.b), signed(p.diff.estimate), ci(p.diff, signed=True),
                                          "yes" if p.significant else "no", mc, pval(p.p_value), pval(p.p_holm),
                                          grouped(len(p.disagreements))]) + " |")
    out += ["", "b01: items A got wrong and B got right; b10: the reverse. " + rule(c)]
    for table in r.tables:
        out += ["", f"## {table.title}", "", "| " + " | ".join(plain(col.name) for col in table.columns) + " |",
                "|" + "---|" * len(table.columns)]
        out += ["| " + " | ".join(map(plain, row)) + " |" for row in table.rows]
        if table.note:
            out += ["", table.note]
    out.append("")
    return "\n".join(out)


def disagreement_table(items: Sequence[Disagreement], a: str, b: str) -> str:
    """`retort compare --disagree A B --format md`: every item the two answer differently."""
    out = [f"| item | text | {plain(a)} | {plain(b)} | reference |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(plain(v) for v in (d.item_id, d.text, d.a, d.b, d.reference)) + " |" for d in items]
    return "\n".join(out) + "\n"
