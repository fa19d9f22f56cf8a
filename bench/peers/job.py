"""What the peer scripts share: their command line, an offline environment, and the check and
report of their output. Standard library only: each peer's venv imports it from this folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn


def setup(offline_env: dict[str, str]) -> argparse.Namespace:
    """The arguments bench_peers.py passes, and an environment that keeps the peer on the stub."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the stub's base URL, ending in /v1")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--cache-dir", required=True)
    args = ap.parse_args()
    for key, value in offline_env.items():
        os.environ.setdefault(key, value)
    os.environ["OPENAI_API_KEY"] = "dummy"
    os.environ.pop("OPENAI_BASE_URL", None)
    return args


def report(peer: str, version: str, n: int, rows: list[dict[str, Any]], answer: str, seconds: float,
           cpu_seconds: float | None) -> NoReturn:
    """One JSON line for bench_peers.py: the time, and whether every row came back with the stub's
    answer to its own prompt (the stub echoes the prompt). Exits 1 when not."""
    answers = {r["i"]: r[answer] for r in rows}
    ok = len(rows) == n and len(answers) == n and all(
        isinstance(a, str) and a.endswith(f"What is {i} plus {i}?"[:24]) for i, a in answers.items())
    print(json.dumps({"peer": peer, "version": version, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "rows": len(rows), "distinct": len(answers), "ok": ok}), flush=True)
    sys.exit(0 if ok else 1)
