"""Export a stage table as a dataset file, with a manifest beside it.

    retort export STAGE --format FORMAT [--out PATH] [--run N] [--where SQL]

    jsonl       the table as is, one JSON object per row
    parquet     the table as is, with its column types
    chat        {"messages": [user, assistant]} from the model's outputs: `prompt` -> `completion` when
                the table has them, else `text` -> `prediction` (after `rationale` and a blank line,
                as "Label: <prediction>", when the table has a `rationale` column)
    chat-gold   {"messages": [user, assistant]}: `text` -> the gold `label` (after `rationale`, as above);
                the one format that supervises with the gold label, and its name says so
    multitask   distilling step by step: per row {"input": "predict: <text>", "output": <label>,
                "task": "predict"}, {"input": "explain: <text>", "output": <rationale>, "task": "explain"},
                and {"input": "explain_domain: <text>", "output": <domain_rationale>,
                "task": "explain_domain"} when that column exists (the predict task trains on the gold
                label for every example, as the method does; an explain record is written only where
                the model wrote a rationale)
    dpo         {"prompt", "chosen", "rejected"} strings
    dpo-chat    the same as message lists, TRL's conversational preference format: prompt is
                [user], chosen and rejected are [assistant]

Training formats never invent: a row whose model output failed (`_error` set: it did not parse)
or that lacks a field its record is made of (null or blank) is dropped, never filled in with
the gold label, and the manifest counts the dropped rows by reason. Their texts are stripped of
surrounding whitespace. `jsonl` and `parquet` write every row as it is, and leave out `_call`
(a cache key, meaningless outside the database) and `_raw` (the completion the parsed columns
came from) unless `include_raw=True`; the lineage columns `_id` and `_parent` stay.

The default path is `WORKSPACE/exports/<stage>.jsonl` or `.parquet` for the table formats and
`exports/<stage>.<format>.jsonl` for the training formats, so exporting one stage in several
formats keeps every file. `<path>.manifest.json` records where the rows came from: the run
(pipeline, spec hash, status, the input file's SHA-256, the options `--input`, `--limit`,
`--map`, `--set`, `--model` it was started with), every prompt stage's template and parser
digests and counts, the models and sampling parameters of the calls behind the run's tables,
and what the export kept and dropped. It holds no secret: models are cache identities, which
never carry a key, and option values that look like credentials are written as "<redacted>".

`--where` is checked by the store before anything runs (see `Cache.table`): one SQL expression
over the table's columns, never a second statement. Files are written in Python (orjson,
pyarrow.parquet), never with DuckDB COPY: the cache's connection runs with external access
disabled. A file is written beside its final path and renamed, so a failed export leaves no half
file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from retort import __version__
from retort.errors import UserError

if TYPE_CHECKING:  # both are heavy imports; the CLI reads FORMATS on every start
    import pyarrow as pa

    from retort.cache import Cache

__all__ = ["FORMATS", "ExportResult", "export"]

FORMATS = ("jsonl", "parquet", "chat", "chat-gold", "multitask", "dpo", "dpo-chat")
RECORD_TABLES = frozenset({"calls", "runs", "failures", "metrics"})
INTERNAL = ("_call", "_raw")
EXPORT_DIR = Path("exports")
ERROR = "_error"  # the reason a row is dropped when its model output did not parse

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path
    manifest: Path
    format: str
    rows: int  # records written (multitask writes up to three per table row)
    kept: int  # table rows that made it into the file
    dropped: int  # table rows left out: their model output failed, or a field they need is blank
    dropped_because: dict[str, int] = field(default_factory=dict)  # "_error" or the blank column → rows


ReadArgv = Callable[[str], "dict[str, Any] | None"]  # a recorded command line → the options it gave, or None


def export(cache: Cache, relation: str, stage: str, fmt: str, out: Path | None = None, *,
           run: int | None = None, include_raw: bool = False, where: str | None = None,
           root: Path | None = None, read_argv: ReadArgv | None = None) -> ExportResult:
    """Write `relation` (a stage table, `main."X"` or `run_N."X"`), filtered by `where`, as `fmt` to
    `out` (default: `root/exports/...`, root being the workspace, else the current directory).
    `read_argv` reads the run's recorded command line into its options for the manifest (the CLI
    passes `retort.cli.run_options`); without it the manifest's `options` is null.

    Raises UserError for an unknown format, a `where` that is not one read-only filter, or a
    table that lacks the columns the format needs (the message names both column lists).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    table = cache.table(relation, where=where)
    if fmt in ("jsonl", "parquet") and not include_raw:
        table = table.drop_columns([c for c in INTERNAL if c in table.column_names])
    shape = _shape(fmt, table.column_names, stage)  # checks the columns before any write
    path = out if out is not None else (root or Path()) / _default_path(stage, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        rows, kept, dropped = _write_parquet(table, path)
    else:
        rows, kept, dropped = _write_jsonl(table, shape, path)
    manifest = path.with_name(path.name + ".manifest.json")
    total = table.num_rows if where is None else cache.count(relation)
    record = {
        "format": fmt,
        "file": path.name,
        "sha256": _sha256(path),
        "rows": rows,
        "kept": kept,
        "dropped": sum(dropped.values()),
        "dropped_because": dropped,
        "supervision": shape.supervision,
        "gold_label": shape.gold,
        "columns": shape.fields,
        "stage": stage,
        "table_rows": total,
        "where": where,
        **_provenance(cache, stage, run, read_argv),
        "retort_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _atomic_write(manifest, orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    return ExportResult(path=path, manifest=manifest, format=fmt, rows=rows, kept=kept,
                        dropped=sum(dropped.values()), dropped_because=dropped)


def _default_path(stage: str, fmt: str) -> Path:
    if fmt in ("jsonl", "parquet"):
        return EXPORT_DIR / f"{stage}.{fmt}"
    return EXPORT_DIR / f"{stage}.{fmt}.jsonl"


# ------------------------------------------------------------------ formats

@dataclass(frozen=True, slots=True)
class _Shape:
    """How a format turns a table row into records."""

    fields: list[str]  # the records' fields
    needs: tuple[str, ...]  # columns a row must have (not null, not blank) to be written
    build: Callable[[Row], list[Row]]  # a row that has them → its records
    supervision: dict[str, str]  # each record field → the column (or text) it comes from
    gold: str | None = None  # the column of gold labels the records are supervised with, if any
    check_error: bool = True  # drop rows whose `_error` is set


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str:
    return str(value).strip()


def _needs(fmt: str, have: list[str], stage: str, *options: tuple[str, ...], hint: str = "") -> tuple[str, ...]:
    """The first option whose columns the table has, else a UserError naming them all."""
    for option in options:
        if all(c in have for c in option):
            return option
    wanted = " or ".join(f"({', '.join(o)})" for o in options) if len(options) > 1 else ", ".join(options[0])
    raise UserError(f"--format {fmt} needs the columns {wanted}; {stage} has: {', '.join(have) or 'none'}"
                    + hint)


def _shape(fmt: str, have: list[str], stage: str) -> _Shape:
    if fmt in ("jsonl", "parquet"):
        return _Shape(have, (), lambda row: [row], {}, check_error=False)
    rationale = ("rationale",) if "rationale" in have else ()
    if fmt == "chat":
        hint = "; --format chat-gold writes text -> the gold label" if "label" in have else ""
        pair = _needs(fmt, have, stage, ("prompt", "completion"), ("text", "prediction"), hint=hint)
        if pair == ("prompt", "completion"):
            return _Shape(["messages"], pair, lambda row: _chat(row["prompt"], row["completion"]),
                          {"user": "prompt", "assistant": "completion"})
        return _Shape(["messages"], (*pair, *rationale), lambda row: _chat(row["text"], _answer(row, "prediction")),
                      {"user": "text", "assistant": " + ".join((*rationale, "prediction"))})
    if fmt == "chat-gold":
        pair = _needs(fmt, have, stage, ("text", "label"))
        return _Shape(["messages"], (*pair, *rationale), lambda row: _chat(row["text"], _answer(row, "label")),
                      {"user": "text", "assistant": " + ".join((*rationale, "label (gold)"))}, gold="label")
    if fmt == "multitask":
        _needs(fmt, have, stage, ("text", "label", "rationale"))
        tasks = [("rationale", "explain")] + ([("domain_rationale", "explain_domain")]
                                              if "domain_rationale" in have else [])
        # Every example trains predict (with its gold label, as distilling step by step does); an
        # explain record is written only where the model wrote a rationale: none is ever invented.
        return _Shape(["input", "output", "task"], ("text", "label"), lambda row: _multitask(row, tasks),
                      {"predict": "label (gold)", **{task: column for column, task in tasks}}, gold="label",
                      check_error=False)
    needs = _needs(fmt, have, stage, ("prompt", "chosen", "rejected"))
    return _Shape(["prompt", "chosen", "rejected"], needs, _dpo_chat if fmt == "dpo-chat" else _dpo,
                  {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})


def _answer(row: Row, label: str) -> str:
    """The assistant's turn: the label, after the rationale when the table has one."""
    if "rationale" in row:
        return f"{_text(row['rationale'])}\n\nLabel: {_text(row[label])}"
    return _text(row[label])


def _chat(user: Any, assistant: Any) -> list[Row]:
    return [{"messages": [{"role": "user", "content": _text(user)},
                          {"role": "assistant", "content": _text(assistant)}]}]


def _multitask(row: Row, tasks: list[tuple[str, str]]) -> list[Row]:
    text = _text(row["text"])
    return [{"input": f"predict: {text}", "output": _text(row["label"]), "task": "predict"},
            *({"input": f"{task}: {text}", "output": _text(row[column]), "task": task} for column, task in tasks
              if _present(row.get(column)) and not row.get(ERROR))]


def _dpo(row: Row) -> list[Row]:
    return [{"prompt": _text(row["prompt"]), "chosen": _text(row["chosen"]), "rejected": _text(row["rejected"])}]


def _dpo_chat(row: Row) -> list[Row]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _dpo(row)]


def _dropped_because(row: Row, shape: _Shape) -> str | None:
    """Why a row is left out (`_error`, or the first needed column that is blank), or None to keep it."""
    if shape.check_error and row.get(ERROR):
        return ERROR
    return next((c for c in shape.needs if not _present(row[c])), None)


# ------------------------------------------------------------------ writing

def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)  # intervals, UUIDs and whatever else Arrow hands over


_JSONL = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _write_jsonl(table: pa.Table, shape: _Shape, path: Path) -> tuple[int, int, dict[str, int]]:
    rows = kept = 0
    dropped: dict[str, int] = {}

    def lines() -> Iterator[bytes]:
        nonlocal rows, kept
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                why = _dropped_because(row, shape)
                if why is not None:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                records = shape.build(row)
                kept += 1
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
    return rows, kept, dropped


def _write_parquet(table: pa.Table, path: Path) -> tuple[int, int, dict[str, int]]:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return table.num_rows, table.num_rows, {}


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

def _provenance(cache: Cache, stage: str, run: int | None, read_argv: ReadArgv | None) -> dict[str, Any]:
    """Where the table came from, from the `runs` and `calls` tables: the run, its input and
    options, its stages' template and parser digests and counts, its models and their sampling
    parameters.

    Without `--run`, `main.STAGE` is a view of the latest run that produced a table named STAGE
    (each run points the views at its own tables when it finishes), so that is the run looked up.
    """
    empty: dict[str, Any] = {"pipeline": None, "run_id": None, "run_status": None, "spec_hash": None,
                             "input": None, "options": None, "stages": [], "models": [], "sampling": []}
    if run is None:
        if stage in RECORD_TABLES:
            return empty
        made = cache.runs_that_made(stage)
        if not made:
            return empty
        run = made[0][0]
    record = cache.run(run)
    if record is None:
        return {**empty, "run_id": run}
    stats = record.stats
    # The parameters are the ones in the calls' requests (what the cache key covers), so they are what
    # the model was asked with, whatever the spec says today.
    sampling = [{"model": _redact("", model), "params": orjson.loads(params) if params else None,
                 "tables": tables} for model, params, tables in cache.sampling(run)]
    return {"pipeline": record.pipeline, "run_id": run, "run_status": record.status, "spec_hash": record.spec_hash,
            "input": stats.get("input"), "options": _options(record.argv, read_argv),
            "stages": [{k: s.get(k) for k in STAGE_FIELDS} for s in stats.get("stages", [])],
            "models": sorted({m["model"] for m in sampling}), "sampling": sampling}


STAGE_FIELDS = ("name", "kind", "rows_in", "rows_out", "failures", "parse_errors", "reused_from", "template",
                "parser")


def _options(argv: str | None, read_argv: ReadArgv | None) -> dict[str, Any] | None:
    """The options a `retort run` command line was started with (`runs.argv`), or None for a run
    started otherwise (compare, the Python API); values that look like credentials are redacted."""
    options = read_argv(argv) if argv and read_argv is not None else None
    if options is None:
        return None
    return {name: {k: _redact(k, v) for k, v in value.items()} if isinstance(value, dict) else value
            for name, value in options.items()}


_CREDENTIAL_NAME = re.compile(r"key|token|secret|passw|credential|auth", re.IGNORECASE)
_CREDENTIAL_VALUE = re.compile(r"\s*(sk-|sk_|hf_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abpr]-|AKIA|AIza|Bearer\s)")
_URL_PASSWORD = re.compile(r"(//[^/@:\s]*:)[^/@\s]*@")
_URL_SECRET = re.compile(r"([?&][^=&#]*(?:key|token|secret)[^=&#]*=)[^&#]*", re.IGNORECASE)
REDACTED = "<redacted>"


def _redact(name: str, value: str) -> str:
    """`value` unless it looks like a credential: set under a name such as `api_key` or `token`, or
    shaped like a provider's key (`sk-...`, `hf_...`); a URL keeps everything but its password and
    secret query values."""
    if _CREDENTIAL_NAME.search(name) or _CREDENTIAL_VALUE.match(value):
        return REDACTED
    return _URL_SECRET.sub(rf"\1{REDACTED}", _URL_PASSWORD.sub(rf"\1{REDACTED}@", value))
