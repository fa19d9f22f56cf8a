"""Bridge (decision-model remediation): the parsers of (A), (B), (C) and the judge's win rates.

    error_answer(text)              parse function for (A): the error's option number and the reason
    decision_answer(text)           parse function for (B): the strategy's and intention's numbers, the reason
    tutor_reply(text)               parse function for (C): the reply, whole, without a "tutor:" echo
    first_sentence(text)            a reply's first sentence (params.first_sentence)
    replies(rows, first_sentence)   the texts the judge compares, both sides cut alike
    win_rates(rows, ...)            metrics per comparison from the `judgments` table

Every pair of responses is judged twice, once in each order, and `judgments`
maps each verdict back to the condition it chose, so a judge that always picks
the same position splits evenly and position bias cancels out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from retort.errors import ParseError
from retort.parsers import extract_json
from retort.stats import bootstrap_ci, win_rate

Row = dict[str, Any]

_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}

_PREFIX = re.compile(r"^[\s*]*(?:tutor|teacher|response|reply|answer)[\s*]*(?:\(maximum one sentence\))?[\s*]*:[\s*]*",
                     re.IGNORECASE)
# A sentence ends at . ! or ? followed by a space or the end (so "3.5" and "1/2." stay whole).
_SENTENCE = re.compile(r"^(.+?[.!?]+)[\"')\]]*(?=\s|$)", re.DOTALL)


def _numbered(text: str, fields: dict[str, str]) -> Row:
    """The reference's answer format, `[{"answer": #, "reason": "..."}]`: the first JSON object in
    the reply (with or without the list around it), its option numbers as ints."""
    value = extract_json(text, want="object")
    if not isinstance(value, dict):
        raise ParseError("expected a JSON object")
    out: Row = {}
    for key, column in fields.items():
        number = value.get(key)
        if isinstance(number, str) and number.strip().isdigit():  # "3" as well as 3
            number = int(number)
        if key == "reason":
            out[column] = None if number is None else str(number)
        elif isinstance(number, bool) or not isinstance(number, int):
            raise ParseError(f"field {key!r}: expected an option number, got {number!r}")
        else:
            out[column] = number
    return out


def error_answer(text: str) -> Row:
    """(A): `{"answer": #, "reason": ...}` -> error_number, error_reason."""
    return _numbered(text, {"answer": "error_number", "reason": "error_reason"})


def decision_answer(text: str) -> Row:
    """(B): `{"strategy": #, "intention": #, "reason": ...}` -> strategy_number, intention_number, decision_reason."""
    return _numbered(text, {"strategy": "strategy_number", "intention": "intention_number",
                            "reason": "decision_reason"})


def tutor_reply(text: str) -> str:
    """The tutor's reply as written, every sentence kept: surrounding space, a "tutor:" or "tutor
    (maximum one sentence):" echo of the cue and enclosing quotes dropped. No words: a parse error."""
    reply = _PREFIX.sub("", text.strip()).strip()
    if len(reply) >= 2 and reply[0] in "\"“" and reply[-1] in "\"”":
        reply = reply[1:-1].strip()
    if not re.search(r"\w", reply):
        raise ParseError("empty reply")
    return reply


_REPLY_COLUMNS = ("_id", "_parent", "item", "item_id", "condition", "topic", "conversation", "response",
                  "expert_response")


def replies(rows: Sequence[Row], first_sentence: bool = False) -> pa.Table:
    """The texts the judge compares, one row per parsed reply. Both sides are treated alike: with
    `first_sentence`, the condition's reply AND the expert's response are cut to their first
    sentence; without it (the reference), both stay whole."""
    out = []
    for row in rows:
        if row.get("_error") is not None or row.get("response") is None:
            continue
        expert = row.get("expert_response")
        out.append({"_id": row["_id"], "_parent": row.get("_parent"), "item": row["item"],
                    "item_id": row["item_id"], "condition": row["condition"], "topic": row["topic"],
                    "conversation": row["conversation"], "response": _cut(row["response"], first_sentence),
                    "expert_response": _cut(expert, first_sentence) if expert and expert.strip() else None})
    # a fixed schema, so `pairs` finds its columns even when no reply parsed
    return pa.table({c: pa.array([str(r[c]) if r[c] is not None else None for r in out], pa.string())
                     for c in _REPLY_COLUMNS})


def _cut(text: str, on: bool) -> str:
    if not on:
        return text
    try:
        return first_sentence(text)
    except ParseError:  # a first line with no words: the judge sees the text as it is
        return text.strip()


def first_sentence(text: str) -> str:
    """The tutor's reply trimmed to its first sentence: a name prefix, quotes and
    later lines dropped. A reply with no words is a parse error."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    if not re.search(r"\w", line):
        raise ParseError("empty reply")
    m = _SENTENCE.match(line)
    return (m.group(1) if m else line).strip()


def win_rates(rows: Sequence[Row], ctx: Any = None, confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Win rate of each comparison's first condition over its second (a tie is half a win).

    Counts and the rate come from `retort.stats.win_rate` over all verdicts; the
    bootstrap interval resamples items, each item's score being the mean of its
    (usually two) verdicts, because the two orders of one pair are not independent.

    Returns one flat metrics dict (`<first>_vs_<second>_win_rate`, `_tie_rate`,
    `_ci_low`, `_ci_high`, `_n`, `_consistency`); with a `ctx`, also keeps a
    `win_rates__comparisons` table with one row per comparison. `consistency`
    is the share of items whose two orders picked the same winner; `a_rate`
    the share of verdicts naming position A (0.5 for a judge without position bias).
    """
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.get("outcome") is not None:
            groups.setdefault(str(row["comparison"]), []).append(row)
    metrics: dict[str, Any] = {"comparisons": len(groups)}
    table: list[Row] = []
    for comparison, judged in groups.items():
        first, second = judged[0]["first"], judged[0]["second"]
        result = win_rate([r["outcome"] for r in judged], confidence=confidence, resamples=resamples, seed=seed)
        winners: dict[Any, list[Any]] = {}
        scores: dict[Any, list[float]] = {}
        for r in judged:
            winners.setdefault(r["item"], []).append(r["winner"])
            scores.setdefault(r["item"], []).append(_SCORE[r["outcome"]])
        # The two orders of one item are not independent judgments: resample items, not verdicts.
        interval = bootstrap_ci([sum(s) / len(s) for s in scores.values()], confidence=confidence,
                                resamples=resamples, seed=seed)
        paired = [w for w in winners.values() if len(w) == 2]
        consistency = sum(1 for w in paired if w[0] == w[1]) / len(paired) if paired else None
        a_rate = sum(1 for r in judged if r.get("verdict") == "A") / len(judged)
        entry = {"comparison": comparison, "first": first, "second": second, "n": result.n,
                 "items": len(winners), "wins": result.wins, "losses": result.losses, "ties": result.ties,
                 "win_rate": result.win_rate, "tie_rate": result.tie_rate,
                 "ci_low": interval.low, "ci_high": interval.high,
                 "consistency": consistency, "a_rate": a_rate}
        table.append(entry)
        key = f"{first}_vs_{second}"
        for name in ("win_rate", "tie_rate", "ci_low", "ci_high", "n", "consistency", "a_rate"):
            metrics[f"{key}_{name}"] = entry[name]
    if ctx is not None:
        ctx.write_table("comparisons", table)
    return metrics
