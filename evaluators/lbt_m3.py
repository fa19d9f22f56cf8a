"""Learning by teaching, M3: refine in-context examples from the students' failures.

    refine(rows, ctx, text="text", label="label", split="split")   the pipeline's one stage
    parse_examples(reply, labels, limit=None)                       "Text: / Label:" blocks

The loop, for a binary (or small multi-class) classification task:

    examples <- n training rows, half per label (seeded), or written by the teacher
    beam <- [examples]
    each round:
        minibatch <- `minibatch` pool rows (seeded by seed and round)
        the students classify the minibatch with every beam member; their failures are pooled
        the teacher explains each member's failures, then rewrites it `candidates` times
        the scorers classify the minibatch with every member and rewrite; score = mean accuracy
        beam <- the best `beam` of (members and) rewrites; ties keep the earlier one
    final <- beam[0]; the evaluators classify the held-out rows with the initial and final examples;
    accuracy and the F1 of `f1_label` (default: the minority class of the held-out rows)

Three roles, as in the reference (imagination-research/lbt, lbt/patch/lmops-lbtm3.patch, main.py):
the students only find failures (`expand_candidates(..., student_evaluators, ...)`), the teacher
scores the candidates (`score_candidates(..., teacher_evaluator, ...)`) and the teacher is evaluated
on the test set (`task.evaluate(teacher_evaluator, ...)`). `scorers` and `evaluators` are model
lists; null (the default) means [teacher]. Setting them to the students gives retort's earlier
variant, where the students' accuracy is also the score.

Each round's prompts depend on the parsed answers of the round before, which a
static list of stages cannot express, so this is one Python stage: every prompt
goes through `ctx.prompt`, with the runner's cache, concurrency and retries, so
a rerun with the same seed makes no call and yields the same tables. Sampling
uses `random.Random` seeded from `seed` only; ties break by position, never by
hash or time.

Tables (`refine__<suffix>`): candidates, failures, feedback, rounds, heldout.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from retort.errors import DatasetError

Row = dict[str, Any]
Example = dict[str, str]

PROMPTS = {"classify": "lbt_m3/classify", "reasons": "lbt_m3/reasons", "rewrite": "lbt_m3/rewrite",
           "write": "lbt_m3/write"}
SPLITS = ("train", "pool", "heldout")
DEFAULTS: dict[str, Any] = {
    "labels": ["positive", "negative"], "init": "sample", "n_examples": 4, "rounds": 2, "beam": 2,
    "candidates": 2, "minibatch": 6, "keep_parents": True, "max_failures_shown": 6, "max_heldout": None,
    "seed": 0, "students": ["default"], "teacher": "default", "scorers": None, "evaluators": None,
    "f1_label": "minority",
    "student_params": {"temperature": 0, "max_tokens": 8},
    "teacher_params": {"temperature": 0, "max_tokens": 96},
    "rewrite_params": {"temperature": 0.8, "max_tokens": 160},
}

_BLOCK = re.compile(r"Text\s*:\s*(?P<text>(?:(?!Text\s*:).)+?)\s*Label\s*:\s*(?P<label>[^\n]*)",
                    re.IGNORECASE | re.DOTALL)


@dataclass
class Candidate:
    id: str
    parent: str | None
    examples: list[Example]


# --------------------------------------------------------------------------- parsing


def parse_examples(reply: str, labels: Sequence[str], limit: int | None = None) -> list[Example]:
    """The "Text: ... / Label: ..." blocks of a teacher's reply, in order.

    A label matches ignoring case and punctuation ("Positive." is positive); a
    block whose label is not one of `labels` is dropped. At most `limit` kept.
    """
    by_key = {_key(label): label for label in labels}
    out: list[Example] = []
    for m in _BLOCK.finditer(reply or ""):
        text = " ".join(m.group("text").split()).strip("\"'<> ")
        words = re.sub(r"[^\w\s-]", " ", m.group("label")).split()
        label = by_key.get(_key(words[0])) if words else None
        if text and label is not None:
            out.append({"text": text, "label": label})
    return out[:limit] if limit else out


def _key(label: str) -> str:
    return re.sub(r"[^\w-]", "", str(label)).casefold()


def _valid(examples: list[Example], labels: Sequence[str]) -> str:
    """'ok', or why the examples cannot teach the task (every label needs an example)."""
    if not examples:
        return "unparsed"
    missing = [label for label in labels if not any(ex["label"] == label for ex in examples)]
    return f"no {missing[0]} example" if missing else "ok"


def render_examples(examples: list[Example]) -> str:
    return "\n\n".join(f"Text: {ex['text']}\nLabel: {ex['label']}" for ex in examples)


# --------------------------------------------------------------------------- data


def _natural(value: Any) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in str(value).split("."))


def _items(rows: Sequence[Row], text: str, label: str, split: str, labels: Sequence[str]) -> list[Row]:
    if rows and split not in rows[0]:
        raise DatasetError(f"no column {split!r} (train | pool | heldout) in the input; map one, e.g. "
                           f"--map \"split=CASE hash(id) % 5 WHEN 0 THEN 'train' WHEN 1 THEN 'pool' "
                           f"ELSE 'heldout' END\"")
    by_key = {_key(x): x for x in labels}
    items = []
    for row in sorted(rows, key=lambda r: _natural(r.get("_id"))):
        gold = by_key.get(_key(row.get(label) or ""))
        if gold is None or row.get(text) is None:
            continue  # a label outside the task's labels cannot be learned or scored
        items.append({"item": str(row["_id"]), "text": str(row[text]), "label": gold,
                      "split": str(row.get(split) or "").strip().casefold()})
    return items


def sample_examples(train: Sequence[Row], labels: Sequence[str], n: int, rng: random.Random) -> list[Example]:
    """n training rows, as even across labels as the counts allow, interleaved label by label."""
    picks = []
    for i, label in enumerate(labels):
        k = n // len(labels) + (1 if i < n % len(labels) else 0)
        pool = [it for it in train if it["label"] == label]
        picks.append(rng.sample(pool, min(k, len(pool))))
    out: list[Example] = []
    for i in range(max((len(p) for p in picks), default=0)):
        out += [{"text": p[i]["text"], "label": p[i]["label"]} for p in picks if i < len(p)]
    return out


def _minibatch(pool: Sequence[Row], size: int, seed: Any, rnd: int) -> list[Row]:
    rng = random.Random(f"{seed}:{rnd}")  # a str seed is hashed with sha512: stable across processes
    chosen = set(rng.sample(range(len(pool)), min(size, len(pool))))
    return [it for i, it in enumerate(pool) if i in chosen]


# --------------------------------------------------------------------------- students and teacher


async def _classify(ctx: Any, p: dict[str, Any], labels: list[str],
                    jobs: list[tuple[str, list[Example], Row]], models: Sequence[str]) -> list[Row]:
    """Every model classifies every (candidate key, examples, item); one record each, in job order."""
    records: list[Row] = []
    for student in models:
        rows = [{"_id": f"{key}|{it['item']}", "examples": examples, "text": it["text"]}
                for key, examples, it in jobs]
        out = await ctx.prompt(PROMPTS["classify"], rows, model=student, params=p["student_params"],
                               parse={"choice": labels}, output="prediction") if rows else []
        by_parent = {r["_parent"]: r for r in out}
        for job, (row, (key, _, it)) in enumerate(zip(rows, jobs, strict=True)):
            got = by_parent.get(row["_id"], {"prediction": None, "_error": "call failed"})
            prediction = got.get("prediction") if got.get("_error") is None else None
            records.append({"job": job, "key": key, "student": student, "item": it["item"], "text": it["text"],
                            "label": it["label"], "prediction": prediction,
                            "correct": prediction == it["label"]})
    records.sort(key=lambda r: r["job"])  # stable: job order, then the students in their order
    return records


def _score(records: list[Row], key: str) -> float | None:
    mine = [r["correct"] for r in records if r["key"] == key]
    return sum(mine) / len(mine) if mine else None


def _pooled(failures: list[Row], limit: int) -> list[Row]:
    """Failures of all students, one entry per item, with every wrong answer given to it."""
    items: dict[str, Row] = {}
    for f in failures:
        entry = items.setdefault(f["item"], {"text": f["text"], "label": f["label"], "answers": []})
        entry["answers"].append(f["prediction"] or "no answer")
    shown = list(items.values())[:limit] if limit else list(items.values())
    return [{**e, "answers": ", ".join(e["answers"])} for e in shown]


async def _initial(ctx: Any, p: dict[str, Any], labels: list[str], train: list[Row],
                   rng: random.Random) -> tuple[list[Example], str]:
    n = int(p["n_examples"])
    if p["init"] == "teacher":
        out = await ctx.prompt(PROMPTS["write"], [{"_id": "init", "n": n}], model=p["teacher"],
                               params=_seeded(p["rewrite_params"], p["seed"]), output="reply")
        reply = out[0]["reply"] if out and out[0]["_error"] is None else ""
        examples = parse_examples(reply, labels, n)
        if _valid(examples, labels) == "ok":
            return examples, "teacher"
        return sample_examples(train, labels, n, rng), "sample (the teacher's examples did not parse)"
    if p["init"] != "sample":
        raise DatasetError(f"params.init is {p['init']!r}; expected sample or teacher")
    return sample_examples(train, labels, n, rng), "sample"


def _seeded(params: dict[str, Any], seed: Any) -> dict[str, Any]:
    return {"seed": seed, **params} if isinstance(seed, int) else dict(params)


# --------------------------------------------------------------------------- the loop


async def refine(rows: Sequence[Row], ctx: Any, text: str = "text", label: str = "label",
                 split: str = "split") -> dict[str, Any]:
    """Run M3 over the input rows (columns `text`, `label`, `split`); returns the metrics."""
    p = {**DEFAULTS, **(ctx.params or {})}
    labels = [str(x) for x in p["labels"]]
    scorers = _models(p, "scorers")
    evaluators = _models(p, "evaluators")
    n, beam_size, k = int(p["n_examples"]), max(1, int(p["beam"])), max(1, int(p["candidates"]))
    items = _items(rows, text, label, split, labels)
    data = {s: [it for it in items if it["split"] == s] for s in SPLITS}
    rng = random.Random(p["seed"])

    examples, init_source = await _initial(ctx, p, labels, data["train"], rng)
    initial = Candidate("r0.c0", None, examples)
    beam = [initial]
    tables: dict[str, list[Row]] = {"candidates": [], "failures": [], "feedback": [], "rounds": []}
    tables["candidates"].append(_candidate_row(0, initial, "initial", None, "ok", True))
    last_scores: dict[str, float | None] = {}
    rounds_done = 0

    for rnd in range(1, int(p["rounds"]) + 1):
        batch = _minibatch(data["pool"], int(p["minibatch"]), p["seed"], rnd)
        if not batch:
            break
        parents = beam
        records = await _classify(ctx, p, labels, [(c.id, c.examples, it) for c in beam for it in batch],
                                  p["students"])
        failures = {c.id: [r for r in records if r["key"] == c.id and not r["correct"]] for c in beam}
        for c in beam:
            tables["failures"] += [{"round": rnd, "candidate": c.id, "student": f["student"], "item": f["item"],
                                    "text": f["text"], "label": f["label"], "prediction": f["prediction"]}
                                   for f in failures[c.id]]

        # The teacher explains each member's pooled failures, then rewrites it k times.
        shown = {c.id: _pooled(failures[c.id], int(p["max_failures_shown"] or 0)) for c in beam}
        asked: list[Row] = [{"_id": c.id, "examples": c.examples, "failures": shown[c.id]}
                            for c in beam if shown[c.id]]
        reasons_out = await ctx.prompt(PROMPTS["reasons"], asked, model=p["teacher"], params=p["teacher_params"],
                                       output="reasons") if asked else []
        reasons = {r["_parent"]: r["reasons"] for r in reasons_out if r["_error"] is None}
        for row in asked:
            tables["feedback"].append({"round": rnd, "candidate": row["_id"], "failures_shown": len(row["failures"]),
                                       "reasons": reasons.get(row["_id"])})
        to_rewrite = [{**row, "reasons": reasons[row["_id"]], "n": n} for row in asked if row["_id"] in reasons]
        rewrites = await ctx.prompt(PROMPTS["rewrite"], to_rewrite, model=p["teacher"], samples=k,
                                    params=_seeded(p["rewrite_params"], p["seed"]),
                                    output="reply") if to_rewrite else []
        replies = {(r["_parent"], r["_sample"]): r for r in rewrites}

        new: list[tuple[Candidate, str]] = []
        for row in to_rewrite:
            for s in range(k):
                got = replies.get((row["_id"], s))
                parsed = parse_examples(got["reply"], labels, n) if got and got["_error"] is None else []
                status = _valid(parsed, labels) if got else "call failed"
                new.append((Candidate(f"r{rnd}.c{len(new)}", row["_id"], parsed), status))
        valid = [c for c, status in new if status == "ok"]
        # The scorers (the teacher, by default) score the members and the rewrites on the same minibatch;
        # where a scorer is also a student, its calls on the members are cache hits.
        scored = [*beam, *valid]
        records = await _classify(ctx, p, labels, [(c.id, c.examples, it) for c in scored for it in batch],
                                  scorers)
        scores = {c.id: _score(records, c.id) for c in scored}

        contenders = ([*beam, *valid] if p["keep_parents"] else valid) or beam
        ranked = sorted(contenders, key=lambda c: -(scores[c.id] or 0.0))  # stable: ties keep the earlier
        kept = {c.id for c in ranked[:beam_size]}
        tables["candidates"] += [_candidate_row(rnd, c, "parent", scores[c.id], "ok", c.id in kept) for c in beam]
        tables["candidates"] += [_candidate_row(rnd, c, "rewrite", scores.get(c.id), status, c.id in kept)
                                 for c, status in new]
        beam = ranked[:beam_size]
        last_scores = scores
        rounds_done = rnd
        tables["rounds"].append({
            "round": rnd, "minibatch": ",".join(it["item"] for it in batch), "parents": len(parents),
            "failures": sum(len(f) for f in failures.values()), "rewrites": len(new), "valid": len(valid),
            "best": beam[0].id, "best_score": scores[beam[0].id], "beam": ",".join(c.id for c in beam)})

    final = beam[0]
    heldout = data["heldout"][: int(p["max_heldout"])] if p["max_heldout"] else data["heldout"]
    sets = [("initial", initial), ("final", final)]
    jobs = [(name, cand.examples, it) for name, cand in sets[: 1 if final is initial else 2] for it in heldout]
    records = await _classify(ctx, p, labels, jobs, evaluators)
    if final is initial:  # one evaluation serves both rows of the table
        records += [{**r, "key": "final"} for r in records]
    ids = dict(sets)
    tables["heldout"] = [{"set": r["key"], "candidate": ids[r["key"]].id, "model": r["student"],
                          "item": r["item"], "label": r["label"], "prediction": r["prediction"],
                          "correct": r["correct"]} for r in records]
    for suffix, table in tables.items():
        ctx.write_table(suffix, table)

    before, after = _score(records, "initial"), _score(records, "final")
    f1_label = _f1_label(p["f1_label"], labels, heldout)
    f1_before, f1_after = (f1_score([r for r in records if r["key"] == key], f1_label)
                           for key in ("initial", "final"))
    return {"rounds": rounds_done, "init": init_source, "initial_candidate": initial.id,
            "final_candidate": final.id, "final_minibatch_score": last_scores.get(final.id),
            "candidates": sum(1 for r in tables["candidates"] if r["role"] == "rewrite"),
            "heldout_n": len(heldout), "students": len(p["students"]), "scorers": ",".join(scorers),
            "evaluators": ",".join(evaluators), "f1_label": f1_label,
            "initial_heldout_f1": f1_before, "final_heldout_f1": f1_after,
            "initial_heldout_accuracy": before, "final_heldout_accuracy": after,
            "heldout_gain": after - before if before is not None and after is not None else None,
            "final_examples": render_examples(final.examples)}


def _models(p: dict[str, Any], role: str) -> list[str]:
    """The model names of a role; null means the teacher, as in the reference."""
    value = p.get(role)
    if value is None:
        return [str(p["teacher"])]
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise DatasetError(f"params.{role} is empty; give model names, or null for the teacher")
    return [str(x) for x in names]


def _f1_label(choice: Any, labels: Sequence[str], heldout: Sequence[Row]) -> str | None:
    """The class whose F1 is reported: a label, or `minority`, the least frequent gold label of the
    held-out rows (ties: the smaller label), as the reference's `compute_f1` picks it
    (min over (support, label); a label with no held-out row has no support and is not a candidate)."""
    if choice == "minority":
        counts = [(sum(1 for it in heldout if it["label"] == label), label) for label in labels]
        present = [c for c in counts if c[0] > 0]
        return min(present)[1] if present else None
    by_key = {_key(x): x for x in labels}
    if _key(str(choice)) not in by_key:
        raise DatasetError(f"params.f1_label is {choice!r}; expected minority or one of {', '.join(labels)}")
    return by_key[_key(str(choice))]


def f1_score(records: Sequence[Row], label: str | None) -> float | None:
    """F1 of `label` over classification records (label, prediction): 2PR / (P + R), 0.0 when it is
    undefined (no true positive), as scikit-learn's f1_score with zero_division=0; None with no records.
    A missing prediction counts as not `label`."""
    if label is None or not records:
        return None
    tp = sum(1 for r in records if r["prediction"] == label and r["label"] == label)
    fp = sum(1 for r in records if r["prediction"] == label and r["label"] != label)
    fn = sum(1 for r in records if r["prediction"] != label and r["label"] == label)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _candidate_row(rnd: int, c: Candidate, role: str, score: float | None, status: str, kept: bool) -> Row:
    return {"round": rnd, "candidate": c.id, "parent": c.parent, "role": role, "status": status,
            "n_examples": len(c.examples), "examples": render_examples(c.examples),
            "minibatch_score": score, "kept": kept}
