"""The report as one self-contained HTML page.

The page must open offline and never reach another host: CSS is inline, the
charts are SVG drawn in Python (charts.py), there is no script, and a
Content-Security-Policy of `default-src 'none'` makes the browser refuse any
request a future edit might add by mistake. Every user string goes through
`esc`. What a caller adds (more tables, the items strategies disagree on) comes
in the `Report` as data and is drawn here like the rest.
"""

from __future__ import annotations

from retort.report.charts import color, diffs_chart, esc, metric_chart, pareto_chart
from retort.report.formats import ci, disagreement_text, grouped, num, pval, seconds, signed, usd
from retort.report.model import PairDisagreements, Report, Table, best_strategy, rule, verdict


def _verdict_html(r: Report) -> str:
    items = "".join(f'<li class="{"warn" if line.startswith("warning") else ""}">{esc(line)}</li>'
                    for line in verdict(r))
    return (f'<section id="verdict"><h2>Verdict</h2><ul>{items}</ul>'
            f'<p class="sub">{esc(rule(r.comparison))}</p></section>')


# --------------------------------------------------------------------------- the page

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--faint:#8b949e;--bg:#ffffff;--panel:#f6f8fa;--line:#d1d9e0;
--grid:#eaeef2;--accent:#0969da;--good:#1a7f37;--band:#f6f8fa}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--faint:#6e7681;--bg:#0d1117;
--panel:#151b23;--line:#3d444d;--grid:#21262d;--accent:#4493f8;--good:#3fb950;--band:#151b23}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue","Noto Sans","Liberation Sans",Arial,sans-serif;font-feature-settings:"tnum"}
main{max-width:960px;margin:0 auto;padding:40px 24px 56px}
header{border-bottom:1px solid var(--line);padding-bottom:16px;margin-bottom:24px}
h1{font-size:28px;line-height:1.25;margin:0 0 6px;font-weight:650;letter-spacing:-0.01em}
h2{font-size:18px;margin:0 0 4px;font-weight:620}
.meta{color:var(--muted);margin:0;font-size:14px}
.meta span+span::before{content:"\\00b7";margin:0 8px;color:var(--faint)}
code{font:13px/1.4 ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Liberation Mono",monospace;
background:var(--panel);border:1px solid var(--line);border-radius:4px;padding:1px 5px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:0 0 28px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:20px;font-weight:600;margin-top:2px;overflow-wrap:anywhere}
.card .s{color:var(--muted);font-size:13px}
section{margin:0 0 36px}
.sub{color:var(--muted);margin:0 0 10px;font-size:14px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:12px 8px 4px;background:var(--bg)}
svg.chart{display:block;height:auto;font-size:12.5px;overflow:visible}
svg text{fill:var(--fg)}
.grid{stroke:var(--grid);stroke-width:1}
.domain,.tick{stroke:var(--faint);stroke-width:1}
.tick-label{fill:var(--muted);font-size:11.5px}
.axis-label{fill:var(--muted);font-size:12px}
.row-label{font-size:13px}
.value-label{font-weight:600}
.ci line,line.ci{stroke:var(--fg);stroke-width:1.5;stroke-linecap:round}
.bar{opacity:.9}
.bar:hover,.point:hover{opacity:1;stroke:var(--fg);stroke-width:1.5}
.point{stroke:var(--bg);stroke-width:1.5}
.point.front{stroke:var(--fg);stroke-width:2}
g.point-group line.ci{stroke-width:2;opacity:.45}
.front-line{fill:none;stroke:var(--fg);stroke-width:1.5;stroke-dasharray:5 4;opacity:.6}
.point-label{font-size:12.5px;fill:var(--muted);paint-order:stroke;stroke:var(--bg);stroke-width:3px;stroke-linejoin:round}
.point-label.front{fill:var(--fg);font-weight:600}
.zero{stroke:var(--fg);stroke-width:1.5;stroke-dasharray:4 3}
.row-band{fill:var(--band)}
.diff-ci{stroke:var(--faint);stroke-width:2;stroke-linecap:round}
.diff-mark{fill:var(--bg);stroke:var(--faint);stroke-width:2}
.diff.significant .diff-ci{stroke:var(--accent)}
.diff.significant .diff-mark{fill:var(--accent);stroke:var(--accent)}
.diff-note{font-size:12.5px;font-weight:600}
.diff-verdict{font-size:11.5px;fill:var(--muted)}
.diff.significant .diff-verdict{fill:var(--accent);font-weight:600}
.empty{fill:var(--muted)}
figcaption{color:var(--muted);font-size:13px;padding:6px 8px 8px;border-top:1px solid var(--grid);margin-top:6px}
.legend{display:inline-flex;gap:14px;flex-wrap:wrap}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.table-wrap{overflow-x:auto;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{padding:7px 10px;border-bottom:1px solid var(--grid);text-align:left;vertical-align:top;white-space:nowrap}
th{white-space:normal;vertical-align:bottom}
th{background:var(--panel);font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
tr:last-child td{border-bottom:0}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-weight:600;white-space:normal;overflow-wrap:anywhere;min-width:120px;max-width:260px}
.yes{color:var(--good);font-weight:600}
.no{color:var(--faint)}
.star{color:var(--accent)}
#verdict li.warn{color:#b45309;font-weight:600}
details summary{cursor:pointer;color:var(--accent)}
details div{white-space:normal;max-width:280px;color:var(--muted);font-size:12.5px;margin-top:4px}
footer{color:var(--faint);font-size:12.5px;border-top:1px solid var(--line);padding-top:12px}
@media print{main{padding:0}figure,.table-wrap{break-inside:avoid}}
"""


def _cards(r: Report) -> str:
    c = r.comparison
    best = best_strategy(r)
    sig = sum(p.significant for p in c.pairs)
    cheapest = r.front[0] if r.front else None
    cards = [("best " + r.metric_name, best.name if best else "none",
              f"{num(best.metric.estimate)} {ci(best.metric)}" if best else "no strategy has predictions"),
             ("significant pairs", f"{sig} of {len(c.pairs)}", f"Holm-adjusted p < {1 - c.confidence:.2g}")]
    if cheapest is not None:
        row = r.costs[cheapest]
        cards.append(("cheapest on the front", cheapest,
                      f"{grouped(row.total_tokens)} tokens \u00b7 {usd(row.cost_usd)}"))
    cards.append(("items", grouped(c.n_items), f"{len(c.strategies)} strategies \u00b7 seed {c.seed}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="s">{esc(s)}</div></div>'
        for k, v, s in cards) + "</div>"


def _legend(r: Report) -> str:
    return '<span class="legend">' + "".join(
        f'<span><i class="swatch" style="background:{color(i)}"></i>{esc(s.name)}</span>'
        for i, s in enumerate(r.comparison.strategies)) + "</span>"


def _tables(r: Report) -> str:
    c = r.comparison
    level = f"{c.confidence:.0%}"
    head = ("<tr><th>strategy</th>" f'<th class="n">{esc(r.metric_name)}</th><th class="n">{level} CI</th>'
            '<th class="n">calls</th><th class="n">prompt tokens</th>'
            '<th class="n">completion tokens</th><th class="n">wall</th><th class="n">cost</th><th>Pareto</th></tr>')
    rows = []
    for s in c.strategies:
        row = r.costs.get(s.name)
        money = ([grouped(row.calls), grouped(row.prompt_tokens), grouped(row.completion_tokens),
                  seconds(row.wall_seconds), usd(row.cost_usd)] if row else ["\u2014"] * 5)
        front = '<span class="star" title="on the Pareto front">\u2605</span>' if s.name in r.front else ""
        rows.append(f'<tr><td class="name">{esc(s.name)}</td><td class="n">{num(s.metric.estimate)}</td>'
                    f'<td class="n">{ci(s.metric)}</td>'
                    + "".join(f'<td class="n">{esc(m)}</td>' for m in money) + f"<td>{front}</td></tr>")
    out = [f'<section id="numbers"><h2>Numbers</h2><p class="sub">Per strategy, over {grouped(c.n_items)} items.</p>',
           f'<div class="table-wrap"><table id="table-strategies"><thead>{head}</thead>'
           f'<tbody>{"".join(rows)}</tbody></table></div>']
    if c.pairs:
        head = ('<tr><th>A</th><th>B</th><th class="n">A \u2212 B</th>'
                f'<th class="n">{level} CI</th><th>significant</th><th class="n">b01 / b10</th>'
                '<th class="n">McNemar p</th><th>disagreements</th></tr>')
        rows = []
        for p in c.pairs:
            mc = ([f"{p.mcnemar.b01} / {p.mcnemar.b10}", pval(p.mcnemar.p_value)] if p.mcnemar
                  else ["\u2014", "\u2014"])
            sig = '<span class="yes">yes</span>' if p.significant else '<span class="no">no</span>'
            dis = (f"<details><summary>{grouped(len(p.disagreements))} items</summary>"
                   f"<div>{esc(disagreement_text(p, 200))}</div></details>" if p.disagreements else "0")
            rows.append(f'<tr><td class="name">{esc(p.a)}</td><td class="name">{esc(p.b)}</td>'
                        f'<td class="n">{signed(p.diff.estimate)}</td><td class="n">{ci(p.diff, signed=True)}</td>'
                        f'<td>{sig}</td><td class="n">{mc[0]}</td><td class="n">{mc[1]}</td><td>{dis}</td></tr>')
        out.append('<p class="sub" style="margin-top:18px">Paired differences. b01: items A got wrong and B got '
                   "right; b10: the reverse. Disagreements list item indices.</p>"
                   f'<div class="table-wrap"><table id="table-pairs"><thead>{head}</thead>'
                   f'<tbody>{"".join(rows)}</tbody></table></div>')
    out.append("</section>")
    return "".join(out)


def render(r: Report) -> str:
    """One self-contained HTML page: inline CSS, inline SVG, no script, no request to any host."""
    c = r.comparison
    level = f"{c.confidence:.0%}"
    method = f"{level} percentile bootstrap intervals over items ({grouped(c.resamples)} resamples, seed {c.seed})"
    meta = ([f"<span>spec <code>{esc(r.spec)}</code></span>"] if r.spec else []) + [
        f"<span><time>{esc(r.generated)}</time></span>", f"<span>{grouped(c.n_items)} items</span>",
        f"<span>{len(c.strategies)} strategies</span>"]
    no_cost = [s.name for s in c.strategies if s.name not in r.costs]
    missing_note = (f" Not shown, no cost row: {esc(', '.join(no_cost))}." if no_cost and r.costs else "")
    page_title = f"{r.title} \u00b7 {r.spec}" if r.spec else r.title
    return "".join([
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="generator" content="retort">',
        f"<title>{esc(page_title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header><h1>{esc(r.title)}</h1><p class="meta">{"".join(meta)}</p></header>',
        _verdict_html(r),
        _cards(r),
        f'<section id="metric"><h2>{esc(r.metric_name.capitalize())} by strategy</h2>',
        f'<p class="sub">Mean over items; whiskers are {esc(method)}.</p>',
        f"<figure>{metric_chart(r)}<figcaption>{_legend(r)}</figcaption></figure></section>",
        f'<section id="pareto"><h2>{esc(r.metric_name.capitalize())} versus tokens</h2>',
        ('<p class="sub">Up and to the left is better. Ringed points joined by the dashed line are the Pareto '
        f"front: no other strategy is both cheaper and better.{missing_note}</p>"),
        (f"<figure>{pareto_chart(r)}<figcaption>Front, cheapest first: "
        f"{esc(', '.join(r.front)) if r.front else 'none'}</figcaption></figure></section>"),
        '<section id="diffs"><h2>Paired differences</h2>',
        (f'<p class="sub">Mean of A \u2212 B over the same items, with {level} paired bootstrap intervals. '
        f"Filled marks are significant. {esc(rule(c))}</p>"),
        f"<figure>{diffs_chart(r)}</figure></section>",
        _tables(r),
        *(_extra_table(t) for t in r.tables),
        _disagreements(r.disagreements),
        f"<footer>Generated by retort compare \u00b7 {esc(method)}.</footer>",
        "</main></body></html>\n",
    ])


def _extra_table(t: Table) -> str:
    th = "".join(f'<th{" class=n" if col.numeric else ""}>{esc(col.name)}</th>' for col in t.columns)
    rows = "".join("<tr>" + "".join(
        f'<td class="{"n" if col.numeric else "name" if i == 0 else ""}">{esc(value)}</td>'
        for i, (col, value) in enumerate(zip(t.columns, row, strict=True))) + "</tr>" for row in t.rows)
    note = f'<p class="sub">{esc(t.note)}</p>' if t.note else ""
    return (f'<section id="{esc(t.section_id)}"><h2>{esc(t.title)}</h2>{note}'
            f'<div class="table-wrap"><table id="{esc(t.table_id)}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div></section>")


def _disagreements(pairs: tuple[PairDisagreements, ...]) -> str:
    """For each pair, the items they answer differently: the text, each one's answer, the reference."""

    def e(value: object) -> str:
        return "\u2014" if value is None else esc(value)

    parts = []
    for pair in pairs:
        if not pair.items:
            continue
        a, b = e(pair.a), e(pair.b)
        body = "".join(f'<tr><td class="n">{e(d.item_id)}</td><td>{e(d.text)}</td><td>{e(d.a)}</td>'
                       f"<td>{e(d.b)}</td><td>{e(d.reference)}</td></tr>" for d in pair.items)
        more = (f'<p class="sub">{pair.total - len(pair.items)} more: {esc(pair.command)}</p>'
                if pair.total > len(pair.items) else "")
        parts.append(f"<h3>{a} vs {b}: {pair.total} items</h3><div class=\"table-wrap\"><table>"
                     f'<thead><tr><th class="n">item</th><th>text</th><th>{a}</th><th>{b}</th>'
                     f"<th>reference</th></tr></thead><tbody>{body}</tbody></table></div>{more}")
    if not parts:
        return ""
    return '<section id="disagreements"><h2>Where strategies disagree</h2>' + "".join(parts) + "</section>"
