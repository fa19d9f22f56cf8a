"""Input datasets: JSONL, CSV, Parquet or a JSON list → an Arrow table.

Files are read in Python (pyarrow, orjson), never through DuckDB SQL, because
pipeline SQL runs with external access disabled. A column mapping renames or
derives columns with DuckDB expressions over the file's own columns, so a real
dataset fits a pipeline without editing it:

    columns: {text: sentence, conversation: "list_transform(c_h, lambda t: t.user || ': ' || t.text)"}
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from retort.errors import DatasetError

FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")


def read_table(path: Path, limit: int | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            try:  # Arrow's C++ reader: ~20x faster than building rows in Python
                from pyarrow import json as pa_json

                table = pa_json.read_json(path, read_options=pa_json.ReadOptions(block_size=1 << 22))
                if table.num_rows:
                    return table.slice(0, limit) if limit else table
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # mixed types across rows, or a line that is not an object: the exact path says which
            return _from_rows(_jsonl_rows(path, limit), path)
        if suffix == ".json":
            try:
                data = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise DatasetError(f"{path}: invalid JSON: {exc}") from None
            if isinstance(data, dict):  # {"data": [...]} and similar: take the one list inside
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DatasetError(f"{path}: expected a JSON list of objects")
                data = lists[0]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data[:100]):
                raise DatasetError(f"{path}: expected a JSON list of objects")
            return _from_rows(data[:limit] if limit else data, path)
        if suffix in (".csv", ".tsv"):
            from pyarrow import csv

            opts = csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
                read = csv.ReadOptions()
            except UnicodeDecodeError:  # not UTF-8: Latin-1 (any byte is a character), never bytes in a prompt
                read = csv.ReadOptions(encoding="latin-1")
            table = csv.read_csv(path, read_options=read, parse_options=opts)
        elif suffix == ".parquet":
            from pyarrow import parquet

            table = parquet.read_table(path)
        else:
            raise DatasetError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(FORMATS)}")
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    return table.slice(0, limit) if limit else table


def _jsonl_rows(path: Path, limit: int | None) -> list[dict[str, object]]:
    rows = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def table_from_rows(rows: Sequence[Mapping[str, Any]], *, lenient: bool = False,
                    types: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """Rows of dicts (a Python stage's output, a JSONL file read row by row) as an Arrow table.

    Every key any row has becomes a column, in order of first appearance, null where a row
    lacks it. `pa.Table.from_pylist` keeps only the first row's keys and silently drops a
    column that starts on row 2. `types` pins the type of some columns. With `lenient`, a column
    whose values do not share one type is stored as text (see `column`) instead of failing.
    """
    if not rows:
        return pa.table({})
    first = rows[0].keys()
    names = dict.fromkeys(first)
    for row in rows:
        if row.keys() != first:
            names.update(dict.fromkeys(row))
    types = types or {}
    if len(names) == len(first) > 1:  # every row has the same keys (stage rows do): columns in one C-level pass
        values: Iterable[Sequence[Any]] = zip(*map(operator.itemgetter(*names), rows), strict=True)
    else:
        values = ([row.get(name) for row in rows] for name in names)
    convert = column if lenient else pa.array
    return pa.Table.from_arrays([convert(list(v), types.get(name)) for name, v in zip(names, values, strict=True)],
                                names=list(names))


def column(values: list[Any], kind: pa.DataType | None = None) -> pa.Array:
    """One column of stage rows, never an Arrow type error: values of one type become that type;
    values that do not share one (a parsed field that is a number in one row and text in the
    next, an integer past 2^63) become text, strings as they are and anything else as JSON."""
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        return pa.array(as_text(values), pa.string())


def as_text(values: list[Any]) -> list[str | None]:
    return [v if v is None or isinstance(v, str) else json_text(v) for v in values]


def json_text(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # orjson stops at 64-bit integers
        import json

        return json.dumps(value, default=str)


def _from_rows(rows: list[dict[str, object]], path: Path) -> pa.Table:
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    try:
        return table_from_rows(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DatasetError(f"{path}: rows of inconsistent types: {exc}") from None
