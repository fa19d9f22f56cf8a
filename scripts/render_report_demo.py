"""Write a demo `retort compare` report from a constructed comparison, to open in a browser.

    python scripts/render_report_demo.py /tmp/report.html            # HTML (default)
    python scripts/render_report_demo.py /tmp/report.md --format md   # or md, json; 'terminal' prints

No model is called: per-item outcomes are drawn from a seeded generator with a
shared per-item difficulty, so strategies agree on easy items as real ones do.
One strategy is named `<script>alert(1)</script>` to show that names are escaped.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retort.report import CostRow, render_terminal, to_html, to_json, to_markdown
from retort.stats import Comparison, compare_strategies

# name: (skill, calls per item, prompt tokens per call, completion tokens per call, seconds per call, $ per 1M tokens)
STRATEGIES: dict[str, tuple[float, int, int, int, float, float | None]] = {
    "zero-shot": (0.0, 1, 140, 6, 0.08, 0.6),
    "few-shot (8 demos)": (0.35, 1, 1100, 6, 0.12, 0.6),
    "chain-of-thought": (0.55, 1, 160, 210, 0.9, 0.6),
    "<script>alert(1)</script>": (0.45, 2, 900, 260, 1.1, None),
    "self-consistency k=8": (0.8, 8, 160, 210, 0.9, 0.6),
    "sse-cot (4 stages)": (0.9, 4, 420, 120, 0.6, 0.6),
}


def demo(n_items: int = 300, seed: int = 7) -> tuple[Comparison, list[CostRow]]:
    rng = random.Random(seed)
    difficulty = [rng.gauss(0.0, 1.2) for _ in range(n_items)]
    items: dict[str, list[bool]] = {}
    costs: list[CostRow] = []
    for name, (skill, calls, p_tok, c_tok, secs, price) in STRATEGIES.items():
        # a logistic item-response model: P(right) rises with skill, falls with difficulty
        items[name] = [rng.random() < 1 / (1 + 2.718281828 ** (d - skill - 0.4)) for d in difficulty]
        total_calls = calls * n_items
        prompt, completion = total_calls * p_tok, total_calls * c_tok
        cost = None if price is None else round((prompt + completion) * price / 1e6, 4)
        costs.append(CostRow(name, total_calls, prompt, completion, round(total_calls * secs / 16, 1), cost))
    return compare_strategies(items, seed=seed), costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="where to write the report")
    parser.add_argument("--format", choices=("html", "md", "json", "terminal"), default="html")
    parser.add_argument("--items", type=int, default=300)
    args = parser.parse_args(argv)

    comparison, costs = demo(args.items)
    spec, title = "pipelines/demo_strategies.yaml", "Prompting strategies on a demo task"
    if args.format == "terminal":
        render_terminal(comparison, costs, spec=spec, title=title)
        return 0
    render = {"html": to_html, "md": to_markdown, "json": to_json}[args.format]
    args.path.write_text(render(comparison, costs, spec=spec, title=title), encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
