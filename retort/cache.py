"""The cache and the records: one DuckDB file per workspace.

Tables in `main`:
    calls      one row per sample, keyed by SHA-256 (see `call_key`)
    runs       one row per run: pipeline, spec hash, status, counts
    failures   calls that failed after retries, and stages that crashed
    metrics    numbers evaluators return, per run
    memo       stage fingerprints (see Runner._fingerprint): which run's table a later run may reuse,
               and `origin`, the run whose schema holds its rows
Each run writes its stage tables into its own schema `run_<id>` and then
points a view `main.<stage>` at them, so `retort show STAGE` reads the latest
run and `--run N` any earlier one. A stage a run reuses unchanged is a view in
its schema onto the run that built it; pruning an old run first moves such
rows into the newest run that still uses them.

Writes are group commits of Arrow batches, never row by row (DuckDB's
executemany manages ~2,000 rows/s here; an Arrow insert, millions). The runner
calls `maybe_flush()` as it goes and a ticker flushes at least once a second,
so a process killed with SIGKILL loses at most the last second of calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from retort.errors import CacheError

FLUSH_SECONDS = 1.0
FLUSH_ROWS = 50_000
KEEP_RUNS = 20

CALL_FIELDS = [
    ("key", pa.string()), ("model", pa.string()), ("request", pa.string()),
    ("sample", pa.int32()), ("attempt", pa.int32()), ("text", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("latency_ms", pa.float64()),
    ("run_id", pa.int32()), ("stage", pa.string()), ("created_at", pa.timestamp("us")),
]
CALL_SCHEMA = pa.schema(CALL_FIELDS)

DDL = """
CREATE TABLE IF NOT EXISTS calls (key VARCHAR, model VARCHAR, request JSON, sample INTEGER,
    attempt INTEGER, text VARCHAR, finish_reason VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER,
    latency_ms DOUBLE, run_id INTEGER, stage VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS embeddings (key VARCHAR, model VARCHAR, text VARCHAR, vector FLOAT[],
    tokens INTEGER, run_id INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs (run_id INTEGER, pipeline VARCHAR, spec_path VARCHAR, spec_hash VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR, argv VARCHAR, stats JSON);
CREATE TABLE IF NOT EXISTS failures (run_id INTEGER, stage VARCHAR, row_id VARCHAR, call_key VARCHAR,
    error VARCHAR, status INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS metrics (run_id INTEGER, pipeline VARCHAR, stage VARCHAR, name VARCHAR,
    value DOUBLE, data JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS memo (fingerprint VARCHAR, run_id INTEGER, stage VARCHAR, origin INTEGER,
    stats JSON, created_at TIMESTAMP);
"""


def request_base(model: str, messages: list[dict[str, str]], params: dict[str, Any],
                 schema: dict[str, Any] | None, choices: list[str] | None = None) -> bytes:
    """Canonical JSON of everything but the sample index that changes a completion.

    A choice stage's options enter only when present (a backend may constrain decoding to them).
    """
    request: dict[str, Any] = {"model": model, "messages": messages, "params": params, "schema": schema}
    if choices is not None:
        request["choices"] = choices
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS)


def call_key(base: bytes, sample: int, attempt: int = 0) -> str:
    """SHA-256 of the canonical request JSON, then `#sample` (and `.attempt` for a re-ask).

    The sample index is part of the key so raising `samples` from 4 to 8 finds
    samples 0-3 and makes exactly 4 new calls.
    """
    suffix = f"#{sample}" if not attempt else f"#{sample}.{attempt}"
    return hashlib.sha256(base + suffix.encode()).hexdigest()


class Cache:
    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise CacheError(f"no retort database at {self.path}; run a pipeline first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            text = str(exc)
            if "lock" in text.lower():
                pid = re.search(r"PID (\d+)", text)
                holder = f" (PID {pid.group(1)})" if pid else ""
                raise CacheError(f"{self.path} is in use by another process{holder}; wait for it to finish, "
                                 "or use another workspace or --db") from None
            raise CacheError(f"cannot open {self.path}: {text}") from None
        except duckdb.Error as exc:
            raise CacheError(f"{self.path} is not a usable DuckDB file: {exc}") from None
        # Pipelines' SQL must not read or write files; data enters only through Arrow.
        self.con.execute("SET enable_external_access = false")
        if not read_only:
            self.con.execute(DDL)
        self._held = False  # a transaction start_run left open (see release)
        self._calls: list[tuple[Any, ...]] = []
        self._call_index: dict[str, tuple[str, int, int]] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._created: set[str] = set()
        self._types: dict[str, dict[str, pa.DataType]] = {}
        self._failures: list[tuple[Any, ...]] = []
        self._vectors: list[tuple[Any, ...]] = []
        self._vector_index: dict[str, list[float]] = {}
        self.last_flush = time.monotonic()
        self.flushed_calls = 0

    # ------------------------------------------------------------ runs

    def start_run(self, pipeline: str, spec_path: str, spec_hash: str, argv: str, *, hold: bool = False) -> int:
        """Record a new run and make its schema. With `hold`, the transaction stays open until the
        first write that needs its own (`release`): a rerun whose stages are all reused then
        commits once, in finish_run, instead of once per statement."""
        self.con.execute("BEGIN")
        self._held = True
        try:
            run_id = int(self.con.execute(
                "INSERT INTO runs SELECT coalesce(max(run_id), 0) + 1, ?, ?, ?, now(), NULL, 'running', ?, NULL "
                "FROM runs RETURNING run_id", [pipeline, spec_path, spec_hash, argv]).fetchall()[0][0])
            self.con.execute(f"CREATE SCHEMA IF NOT EXISTS run_{run_id}")
        except BaseException:
            self._held = False
            self.con.execute("ROLLBACK")
            raise
        if not hold:
            self.release()
        return run_id

    def latest_run(self) -> tuple[int, str, str, str, str | None] | None:
        """(run_id, pipeline, spec_path, status, stats JSON) of the newest run, if any."""
        rows = self.con.execute("SELECT run_id, pipeline, spec_path, status, stats FROM runs "
                                "ORDER BY run_id DESC LIMIT 1").fetchall()
        return rows[0] if rows else None

    def release(self) -> None:
        """Commit what start_run held open, if anything."""
        if self._held:
            self._held = False
            self.con.execute("COMMIT")

    def finish_run(self, run_id: int, status: str, stats: dict[str, Any], stages: Iterable[str]) -> None:
        """Point main's views at this run's tables and close its record. No CHECKPOINT here: DuckDB
        folds the write-ahead log into the file once it passes 16 MB, and when the cache closes."""
        self.flush()
        stages = set(stages)
        schema = f"run_{run_id}"
        with self._transaction():
            found = self.con.execute(
                "SELECT schema_name, table_name FROM duckdb_tables() WHERE schema_name = ? UNION ALL "
                "SELECT schema_name, view_name FROM duckdb_views() WHERE schema_name IN (?, 'main') AND NOT internal",
                [schema, schema]).fetchall()
            produced = {name for where, name in found if where == schema}
            for name in sorted(produced):  # stage tables and the extra tables stages keep (`<stage>__<suffix>`)
                if name in stages or name.split("__")[0] in stages:
                    self.con.execute(f'CREATE OR REPLACE VIEW main."{name}" AS SELECT * FROM {schema}."{name}"')
            for where, name in found:  # a table this pipeline's stages made before but not this time: no stale view
                if where == "main" and name.split("__")[0] in stages and name not in produced:
                    self.con.execute(f'DROP VIEW main."{name}"')
            self.con.execute("UPDATE runs SET finished_at = now(), status = ?, stats = ? WHERE run_id = ?",
                             [status, orjson.dumps(stats).decode(), run_id])
        self._prune(run_id)

    def _prune(self, run_id: int) -> None:
        """Keep the stage tables of the last KEEP_RUNS runs; calls are kept forever."""
        if run_id <= KEEP_RUNS:
            return
        for (schema,) in self.con.execute(
                "SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'run_%' "
                "AND TRY_CAST(substr(schema_name, 5) AS INTEGER) <= ?", [run_id - KEEP_RUNS]).fetchall():
            with self._transaction():
                self._rehome(int(schema[4:]))
                self.con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                self.con.execute("DELETE FROM memo WHERE origin = ?", [int(schema[4:])])  # their rows are gone

    def _rehome(self, old: int) -> None:
        """Before run `old` is dropped: a later run that reuses one of its tables (a view onto it) gets
        the rows; the newest such run keeps them as a table, the others' views point at it."""
        holders: dict[str, list[int]] = {}
        for schema, view, sql in self.con.execute(
                "SELECT schema_name, view_name, sql FROM duckdb_views() WHERE schema_name LIKE 'run_%' "
                "AND NOT internal").fetchall():
            if schema == f"run_{old}":
                continue  # dropped with it
            body = sql.split(" AS ", 1)[-1]  # what the view selects from, not its own name
            name = re.escape(view)  # DuckDB keeps the quotes of the view's SQL only where they are needed
            if re.search(rf'\brun_{old}\.(?:"{name}"|{name}\b)', body):
                holders.setdefault(view, []).append(int(schema[4:]))
        for name, runs in holders.items():
            keeper, *others = sorted(runs, reverse=True)
            self.con.execute(f'DROP VIEW run_{keeper}."{name}"')
            self.con.execute(f'CREATE TABLE run_{keeper}."{name}" AS SELECT * FROM run_{old}."{name}"')
            for other in others:
                self.con.execute(f'CREATE OR REPLACE VIEW run_{other}."{name}" AS SELECT * FROM run_{keeper}."{name}"')
            self.con.execute("UPDATE memo SET origin = ? WHERE origin = ? AND stage = ?", [keeper, old, name])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._held:  # this transaction takes over the one start_run held open
            self._held = False
        else:
            self.con.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # ------------------------------------------------------------ whole stage tables

    def digest(self, table: str) -> str:
        """A fingerprint of a table's content: its columns and types, and its rows as a multiset
        (row order does not count). One scan in DuckDB, about 2 ms per 10,000 rows."""
        columns = self.con.execute(f"DESCRIBE {table}").fetchall()
        count, total, mixed = self.con.execute(
            f"SELECT count(*), sum(hash(t))::HUGEINT, bit_xor(hash(t)) FROM {table} t").fetchall()[0]
        return hashlib.sha256(repr(([c[:2] for c in columns], count, total, mixed)).encode()).hexdigest()

    def builds(self, stages: Iterable[str]) -> dict[tuple[str, str], tuple[int, int, str]]:
        """(stage, fingerprint) → (the latest run that built it, the run whose schema holds the rows, its
        counts as JSON), for the given stage names, among builds whose rows are still kept. Two queries
        for a whole run, whatever its number of stages."""
        kept = self.con.execute("SELECT schema_name, table_name FROM duckdb_tables() "
                                "WHERE schema_name LIKE 'run_%'").fetchall()
        tables = {(int(schema[4:]), name) for schema, name in kept if schema[4:].isdigit()}
        names = sorted(set(stages))
        if not tables or not names:
            return {}
        origins = sorted({origin for origin, _ in tables})
        marks = ", ".join("?" * len(names))
        rows = self.con.execute(
            f"SELECT stage, fingerprint, run_id, origin, stats FROM memo WHERE stage IN ({marks}) "
            f"AND origin IN ({', '.join(str(o) for o in origins)}) ORDER BY run_id", names).fetchall()
        return {(stage, fp): (int(run_id), int(origin), stats) for stage, fp, run_id, origin, stats in rows
                if (origin, stage) in tables}

    def remember(self, fingerprint: str, run_id: int, stage: str, origin: int, stats: dict[str, Any]) -> None:
        self.release()
        self.con.execute("INSERT INTO memo VALUES (?, ?, ?, ?, ?, now())",
                         [fingerprint, run_id, stage, origin, orjson.dumps(stats).decode()])

    def table_exists(self, schema: str, name: str) -> bool:
        """Whether `schema."name"` is a table or view (schema `temp`: a dry run's temporary table)."""
        if self._held:  # a failed bind would abort the held transaction: ask the catalog instead
            column = "database_name" if schema == "temp" else "schema_name"
            return bool(self.con.execute(
                f"SELECT count(*) FROM (SELECT database_name, schema_name, table_name FROM duckdb_tables() UNION ALL "
                f"SELECT database_name, schema_name, view_name FROM duckdb_views()) WHERE {column} = ? "
                f"AND table_name = ?", [schema, name]).fetchall()[0][0])
        return self.tables_exist(schema, [name])

    def tables_exist(self, schema: str, names: Iterable[str]) -> bool:
        """Whether every `schema."name"` is a table or view, in one query (not while start_run holds)."""
        tables = ", ".join(f'{schema}."{name}"' for name in names)
        try:  # binding a query is the cheapest test (a catalog scan costs several times more)
            self.con.execute(f"SELECT NULL FROM {tables} LIMIT 0")
        except duckdb.CatalogException:
            return False
        return True

    # ------------------------------------------------------------ calls

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, int, int]]:
        """key → (text, prompt_tokens, completion_tokens) for the keys already cached."""
        found = {k: self._call_index[k] for k in keys if k in self._call_index}
        if len(found) == len(keys):
            return found
        batch = pa.table({"key": pa.array(keys, pa.string())})
        self.con.register("_lookup", batch)
        try:
            cols = self.con.sql("SELECT c.key, c.text, coalesce(c.prompt_tokens, 0) AS p, "
                                "coalesce(c.completion_tokens, 0) AS c "
                                "FROM calls c SEMI JOIN _lookup l ON c.key = l.key").to_arrow_table().to_pydict()
        finally:
            self.con.unregister("_lookup")
        found.update(zip(cols["key"], zip(cols["text"], cols["p"], cols["c"], strict=True), strict=True))
        return found

    def add_call(self, key: str, model: str, request: bytes, sample: int, attempt: int, text: str,
                 finish_reason: str | None, prompt_tokens: int, completion_tokens: int, latency_ms: float,
                 run_id: int, stage: str) -> None:
        """`request` is the canonical JSON the key hashes (model, messages, params, schema)."""
        self._calls.append((key, model, request.decode(), sample, attempt, text, finish_reason, prompt_tokens,
                            completion_tokens, latency_ms, run_id, stage, None))
        self._call_index[key] = (text, prompt_tokens, completion_tokens)

    def lookup_embeddings(self, keys: list[str]) -> dict[str, list[float]]:
        found = {k: self._vector_index[k] for k in keys if k in self._vector_index}
        if len(found) == len(keys):
            return found
        self.con.register("_lookup", pa.table({"key": pa.array(keys, pa.string())}))
        try:
            cols = self.con.sql("SELECT e.key, e.vector FROM embeddings e SEMI JOIN _lookup l ON e.key = l.key"
                                ).to_arrow_table().to_pydict()
        finally:
            self.con.unregister("_lookup")
        found.update(zip(cols["key"], cols["vector"], strict=True))
        return found

    def add_embedding(self, key: str, model: str, text: str, vector: list[float], tokens: int,
                      run_id: int) -> None:
        self._vectors.append((key, model, text, vector, tokens, run_id))
        self._vector_index[key] = vector

    def add_failure(self, run_id: int, stage: str, row_id: str | None, key: str | None, error: str,
                    status: int | None = None) -> None:
        self._failures.append((run_id, stage, row_id, key, error, status))

    # ------------------------------------------------------------ stage tables

    def add_rows(self, table: str, rows: list[dict[str, Any]], types: dict[str, pa.DataType] | None = None) -> None:
        """Buffer stage rows; `types` pins columns whose type the rows alone may not show (all-null vectors)."""
        self._rows.setdefault(table, []).extend(rows)
        if types:
            self._types[table] = types

    def write_table(self, table: str, data: pa.Table) -> None:
        """Create or replace a whole table from Arrow (input tables, SQL and Python stage results)."""
        self.release()
        data = _nulls_as_strings(data)
        self.con.register("_batch", data)
        try:
            self.con.execute(f"{create(table)} AS SELECT * FROM _batch")
        finally:
            self.con.unregister("_batch")
        self._created.add(table)

    def drop_table(self, table: str) -> None:
        self.release()
        self.con.execute(f"DROP TABLE IF EXISTS {table}")
        self._created.discard(table)
        self._rows.pop(table, None)

    # ------------------------------------------------------------ group commit

    def maybe_flush(self) -> None:
        pending = len(self._calls) + len(self._vectors) + sum(len(r) for r in self._rows.values())
        if pending >= FLUSH_ROWS or (pending and time.monotonic() - self.last_flush >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        """One transaction: calls first, then the stage rows that depend on them."""
        calls, self._calls = self._calls, []
        rows, self._rows = self._rows, {}
        failures, self._failures = self._failures, []
        vectors, self._vectors = self._vectors, []
        self.last_flush = time.monotonic()
        if not (calls or rows or failures or vectors):
            return
        self.release()
        now = pa.scalar(time.time_ns() // 1000, pa.timestamp("us"))
        self.con.execute("BEGIN")
        try:
            if calls:
                cols = list(zip(*calls, strict=True))
                arrays = [pa.array(col, type=f[1]) for col, f in zip(cols[:-1], CALL_FIELDS[:-1], strict=True)]
                arrays.append(pa.array([now.value] * len(calls), pa.timestamp("us")))
                self._insert("calls", pa.Table.from_arrays(arrays, schema=CALL_SCHEMA))
            if vectors:
                cols = list(zip(*vectors, strict=True))
                self._insert("embeddings", pa.table({
                    "key": pa.array(cols[0], pa.string()), "model": pa.array(cols[1], pa.string()),
                    "text": pa.array(cols[2], pa.string()), "vector": pa.array(cols[3], pa.list_(pa.float32())),
                    "tokens": pa.array(cols[4], pa.int32()), "run_id": pa.array(cols[5], pa.int32()),
                    "created_at": pa.array([now.value] * len(vectors), pa.timestamp("us"))}))
            for table, batch in rows.items():
                if batch:
                    data = pa.Table.from_pylist(batch)  # a stage's rows share their keys
                    for column, kind in self._types.get(table, {}).items():
                        i = data.schema.get_field_index(column)
                        data = data.set_column(i, pa.field(column, kind), data.column(i).cast(kind))
                    self._insert(table, _nulls_as_strings(data))
            if failures:
                self._insert("failures", pa.table({
                    "run_id": [f[0] for f in failures], "stage": [f[1] for f in failures],
                    "row_id": pa.array([f[2] for f in failures], pa.string()),
                    "call_key": pa.array([f[3] for f in failures], pa.string()),
                    "error": [f[4] for f in failures], "status": pa.array([f[5] for f in failures], pa.int32()),
                    "created_at": pa.array([now.value] * len(failures), pa.timestamp("us"))}))
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.flushed_calls += len(calls)
        for call in calls:  # flushed calls are found by SQL now; keep the in-memory index small
            self._call_index.pop(call[0], None)
        for vector in vectors:
            self._vector_index.pop(vector[0], None)

    def _insert(self, table: str, data: pa.Table) -> None:
        self.con.register("_batch", data)
        try:
            if table in self._created or table in ("calls", "failures", "embeddings"):
                self.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
            else:
                self.con.execute(f"{create(table)} AS SELECT * FROM _batch")
                self._created.add(table)
        finally:
            self.con.unregister("_batch")

    def close(self) -> None:
        try:
            self.flush()
            self.release()
        finally:
            self.con.close()


def create(table: str) -> str:
    """The CREATE for a table; dry runs (plan, validate) write to DuckDB's `temp` catalog."""
    temp = "TEMP " if table.startswith("temp.") else ""
    return f"CREATE OR REPLACE {temp}TABLE {table}"


def _nulls_as_strings(table: pa.Table) -> pa.Table:
    """A column that is all null in a batch has Arrow type null; store it as text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, pa.field(field.name, pa.string()), table.column(i).cast(pa.string()))
    return table
