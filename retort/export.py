"""Export a stage table as a dataset file, with a manifest beside it.

    retort export STAGE --format FORMAT [--out PATH] [--run N]

    jsonl       the table as is, one JSON object per row
    parquet     the table as is, with its column types
    multitask   distilling step by step: per row {"input": "predict: <text>", "output": <label>,
                "task": "predict"}, {"input": "explain: <text>", "output": <rationale>, "task": "explain"},
                and {"input": "explain_domain: <text>", "output": <domain_rationale>,
                "task": "explain_domain"} when that column exists; a null rationale writes no record
    chat        {"messages": [user, assistant]}: `prompt` -> `completion` when the table has them,
                else `text` -> `rationale` (when present) and then "Label: <label>"
    dpo         {"prompt", "chosen", "rejected"} strings
    dpo-chat    the same as message lists, TRL's conversational preference format: prompt is
                [user], chosen and rejected are [assistant]

`jsonl` and `parquet` leave out `_call` (a cache key, meaningless outside the
database) and `_raw` (the completion the parsed columns came from) unless
`include_raw=True`; the lineage columns `_id` and `_parent` stay. The training
formats write exactly the fields above, so trainers take them as they are.

The default path is `exports/<stage>.jsonl` or `exports/<stage>.parquet` for the
table formats and `exports/<stage>.<format>.jsonl` for the training formats, so
exporting one stage in several formats keeps every file. `<path>.manifest.json`
records where the rows came from: pipeline, run, spec hash, the models that
produced them, counts kept, dropped and skipped, format, retort version and time.
It holds no secret: the models are the cache identities, which never carry a key.

Files are written in Python (orjson, pyarrow.parquet), never with DuckDB COPY:
the cache's connection runs with external access disabled. A file is written
beside its final path and renamed, so a failed export leaves no half file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from retort import __version__
from retort.cache import Cache
from retort.errors import UserError

__all__ = ["FORMATS", "ExportResult", "export"]

FORMATS = ("jsonl", "parquet", "multitask", "chat", "dpo", "dpo-chat")
RECORD_TABLES = frozenset({"calls", "runs", "failures", "metrics"})
INTERNAL = ("_call", "_raw")
EXPORT_DIR = Path("exports")

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path
    manifest: Path
    format: str
    rows: int  # records written (multitask writes up to three per table row)
    kept: int  # table rows that made it into the file
    skipped: int  # table rows the format had nothing to write for (a null completion, say)


def export(cache: Cache, relation: str, stage: str, fmt: str, out: Path | None = None, *,
           run: int | None = None, include_raw: bool = False) -> ExportResult:
    """Write `relation` (a stage table, `main."X"` or `run_N."X"`) as `fmt` to `out`.

    Raises UserError for an unknown format or a table that lacks the columns the
    format needs (the message names both column lists).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    table = cache.con.sql(f"SELECT * FROM {relation}").to_arrow_table()
    if fmt in ("jsonl", "parquet") and not include_raw:
        table = table.drop_columns([c for c in INTERNAL if c in table.column_names])
    build, columns = _builder(fmt, table.column_names, stage)  # checks the columns before any write
    path = out if out is not None else _default_path(stage, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        rows, kept, skipped = _write_parquet(table, path)
    else:
        rows, kept, skipped = _write_jsonl(table, build, path)
    manifest = path.with_name(path.name + ".manifest.json")
    source = _provenance(cache, stage, run)
    record = {
        "format": fmt,
        "file": path.name,
        "sha256": _sha256(path),
        "rows": rows,
        "kept": kept,
        "dropped": _dropped(source.pop("stage_stats")),
        "skipped": skipped,
        "columns": columns,
        "stage": stage,
        **source,
        "retort_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _atomic_write(manifest, orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    return ExportResult(path=path, manifest=manifest, format=fmt, rows=rows, kept=kept, skipped=skipped)


def _default_path(stage: str, fmt: str) -> Path:
    if fmt in ("jsonl", "parquet"):
        return EXPORT_DIR / f"{stage}.{fmt}"
    return EXPORT_DIR / f"{stage}.{fmt}.jsonl"


# ------------------------------------------------------------------ formats

Build = Callable[[Row], list[Row]]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _needs(fmt: str, have: list[str], stage: str, *options: tuple[str, ...]) -> tuple[str, ...]:
    """The first option whose columns the table has, else a UserError naming them all."""
    for option in options:
        if all(c in have for c in option):
            return option
    wanted = " or ".join(f"({', '.join(o)})" for o in options) if len(options) > 1 else ", ".join(options[0])
    raise UserError(f"--format {fmt} needs the columns {wanted}; {stage} has: {', '.join(have) or 'none'}")


def _builder(fmt: str, have: list[str], stage: str) -> tuple[Build, list[str]]:
    """The function turning one table row into its records, and the records' fields."""
    if fmt in ("jsonl", "parquet"):
        return (lambda row: [row]), have
    if fmt == "multitask":
        _needs(fmt, have, stage, ("text", "label", "rationale"))
        tasks = [("rationale", "explain")] + ([("domain_rationale", "explain_domain")]
                                              if "domain_rationale" in have else [])
        return (lambda row: _multitask(row, tasks)), ["input", "output", "task"]
    if fmt == "chat":
        pair = _needs(fmt, have, stage, ("prompt", "completion"), ("text", "label"))
        with_rationale = pair == ("text", "label") and "rationale" in have
        return (lambda row: _chat(row, pair, with_rationale)), ["messages"]
    _needs(fmt, have, stage, ("prompt", "chosen", "rejected"))
    return (_dpo_chat if fmt == "dpo-chat" else _dpo), ["prompt", "chosen", "rejected"]


def _multitask(row: Row, tasks: list[tuple[str, str]]) -> list[Row]:
    text = row["text"]
    if not _present(text):
        return []
    records = []
    if _present(row["label"]):
        records.append({"input": f"predict: {text}", "output": str(row["label"]), "task": "predict"})
    for column, task in tasks:
        if _present(row[column]):
            records.append({"input": f"{task}: {text}", "output": str(row[column]), "task": task})
    return records


def _chat(row: Row, pair: tuple[str, ...], with_rationale: bool) -> list[Row]:
    user, answer = (row[c] for c in pair)
    if not (_present(user) and _present(answer)):
        return []
    if pair == ("text", "label"):
        rationale = row["rationale"] if with_rationale else None
        answer = f"{str(rationale).strip()}\n\nLabel: {answer}" if _present(rationale) else str(answer)
    return [{"messages": [{"role": "user", "content": str(user)},
                          {"role": "assistant", "content": str(answer)}]}]


def _dpo(row: Row) -> list[Row]:
    values = [row["prompt"], row["chosen"], row["rejected"]]
    if not all(_present(v) for v in values):
        return []
    prompt, chosen, rejected = map(str, values)
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def _dpo_chat(row: Row) -> list[Row]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _dpo(row)]


# ------------------------------------------------------------------ writing

def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)  # intervals, UUIDs and whatever else Arrow hands over


_JSONL = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _write_jsonl(table: pa.Table, build: Build, path: Path) -> tuple[int, int, int]:
    rows = kept = skipped = 0

    def lines() -> Iterator[bytes]:
        nonlocal rows, kept, skipped
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                records = build(row)
                kept += bool(records)
                skipped += not records
                rows += len(records)
                for record in records:
                    yield orjson.dumps(record, default=_json_default, option=_JSONL)

    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.writelines(lines())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, kept, skipped


def _write_parquet(table: pa.Table, path: Path) -> tuple[int, int, int]:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return table.num_rows, table.num_rows, 0


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ provenance

def _provenance(cache: Cache, stage: str, run: int | None) -> dict[str, Any]:
    """Pipeline, run, spec hash, models and the stage's counts, from the `runs` table.

    Without `--run`, `main.STAGE` is a view of the latest run that produced a
    table named STAGE (each run points the views at its own tables when it
    finishes), so that is the run looked up here.
    """
    empty: dict[str, Any] = {"pipeline": None, "run_id": None, "spec_hash": None, "models": [],
                             "stage_stats": None}
    con = cache.con
    if run is None:
        if stage in RECORD_TABLES:
            return empty
        found = con.execute("SELECT r.run_id FROM runs r WHERE EXISTS (SELECT 1 FROM information_schema.tables t "
                            "WHERE t.table_schema = 'run_' || r.run_id AND t.table_name = ?) "
                            "ORDER BY r.run_id DESC LIMIT 1", [stage]).fetchall()
        if not found:
            return empty
        run = int(found[0][0])
    info = con.execute("SELECT pipeline, spec_hash, stats FROM runs WHERE run_id = ?", [run]).fetchall()
    if not info:
        return {**empty, "run_id": run}
    pipeline, spec_hash, stats = info[0]
    if isinstance(stats, str):
        stats = orjson.loads(stats)
    stage_stats = next((s for s in (stats or {}).get("stages", []) if s.get("name") == stage), None)
    return {"pipeline": pipeline, "run_id": run, "spec_hash": spec_hash, "models": _models(con, run),
            "stage_stats": stage_stats}


def _models(con: Any, run: int) -> list[str]:
    """The cache identities of the models whose calls fed any table of the run."""
    schema = f"run_{run}"
    tables = [r[0] for r in con.execute("SELECT DISTINCT table_name FROM information_schema.columns "
                                        "WHERE table_schema = ? AND column_name = '_call' ORDER BY 1",
                                        [schema]).fetchall()]
    if not tables:
        return []
    keys = " UNION ".join(f'SELECT _call FROM {schema}."{t}"' for t in tables)
    rows = con.execute(f"SELECT DISTINCT model FROM calls WHERE key IN ({keys}) ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def _dropped(stage_stats: dict[str, Any] | None) -> int | None:
    """Input rows of the stage that produced no row: prompt and SQL stages that count their input.

    A Python stage aggregates (rows in, one row out), so its difference means nothing.
    """
    if not stage_stats or stage_stats.get("kind") not in ("prompt", "sql"):
        return None
    rows_in, rows_out = stage_stats.get("rows_in") or 0, stage_stats.get("rows_out") or 0
    if rows_in <= 0 or rows_out > rows_in:  # not counted (SQL today), or samples fan out
        return None
    return int(rows_in - rows_out)
