"""The store: one DuckDB file per workspace, and the only code that writes it.

Tables in `main`:
    calls      one row per sample, keyed by SHA-256 (see `call_key`): the ledger of what was paid for
    embeddings one vector per (model, text)
    runs       one row per run: pipeline, namespace, spec hash, status, counts, pinned
    failures   calls that failed after retries, and stages that crashed
    metrics    numbers evaluators return, per run
    memo       stage fingerprints (see reuse in runner.py): which run's table a later run may reuse,
               and `origin`, the run whose schema holds its rows
Each run writes its stage tables into its own schema `run_<id>`. Only a run that ends
complete (status `ok`) becomes the latest: views `<namespace>.<stage>` (the namespace is the
pipeline's name) and, for convenience, `main.<stage>` then point at its tables. A run
that fails, is interrupted or crashes keeps its tables under its number and changes no view.

Invariants (DESIGN.md, "the store"):
  - Calls are a ledger, committed on their own: calls, embeddings and failures go in one
    transaction, stage rows in the next, so no stage-row problem can roll a call back. A
    buffer is released only after its COMMIT; a write that fails stays queued and is retried,
    and a third failure in a row fails the run loudly (never silently, never in a task that
    nobody awaits).
  - Stage rows have no Arrow type errors: a column whose values do not share one type is
    stored as text (strings as they are, anything else as JSON); a table whose column type no
    longer fits is widened (integer to double, anything to text), never a lost batch.
  - Group commit: rows are buffered and written as Arrow batches at least once a second on a
    writer thread of their own (the event loop keeps sending requests while DuckDB commits);
    a process killed with SIGKILL loses at most the last second of calls.
  - Look-ups read the ledger itself: the key index (`_KeyIndex`) is a process's in-memory map of the
    committed calls' key prefixes to their rowids, built and extended from `calls`, never written;
    every look-up also reads the rows committed since it last took them in, and without it, all rows.
  - Retention: stage tables of the last KEEP_RUNS runs, of the latest complete run of every
    namespace and of every pinned run are kept; calls are kept forever, so a pruned table is
    rebuilt by rerunning at no cost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from retort.datasets import table_from_rows
from retort.errors import CacheError, NotFoundError, UserError
from retort.sql import NotReadOnly, check_select, first_line

FLUSH_SECONDS = 1.0
FLUSH_ROWS = 50_000
SLICE = 1_024  # buffered rows are converted to Arrow this many at a time: a few ms of the event loop each
KEEP_RUNS = 20
WRITE_ATTEMPTS = 3  # a write that fails this many times in a row fails the run
RESERVED_SCHEMAS = frozenset({"main", "temp", "information_schema", "pg_catalog", "system"})

CALL_FIELDS = [
    ("key", pa.string()), ("model", pa.string()), ("request", pa.string()),
    ("sample", pa.int32()), ("attempt", pa.int32()), ("text", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("latency_ms", pa.float64()),
    ("run_id", pa.int32()), ("stage", pa.string()), ("k", pa.int64()), ("created_at", pa.timestamp("us")),
]
CALL_SCHEMA = pa.schema(CALL_FIELDS)

DDL = """
CREATE TABLE IF NOT EXISTS calls (key VARCHAR, model VARCHAR, request JSON, sample INTEGER,
    attempt INTEGER, text VARCHAR, finish_reason VARCHAR, prompt_tokens BIGINT, completion_tokens BIGINT,
    latency_ms DOUBLE, run_id INTEGER, stage VARCHAR, created_at TIMESTAMP, k BIGINT);
CREATE TABLE IF NOT EXISTS embeddings (key VARCHAR, model VARCHAR, text VARCHAR, vector FLOAT[],
    tokens BIGINT, run_id INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs (run_id INTEGER, pipeline VARCHAR, spec_path VARCHAR, spec_hash VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR, argv VARCHAR, stats JSON,
    namespace VARCHAR, pinned BOOLEAN DEFAULT false);
CREATE TABLE IF NOT EXISTS failures (run_id INTEGER, stage VARCHAR, row_id VARCHAR, call_key VARCHAR,
    error VARCHAR, status INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS metrics (run_id INTEGER, pipeline VARCHAR, stage VARCHAR, name VARCHAR,
    value DOUBLE, data JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS memo (fingerprint VARCHAR, run_id INTEGER, stage VARCHAR, origin INTEGER,
    stats JSON, created_at TIMESTAMP);
"""
# Files written before these columns existed are brought up to date when opened for writing.
MIGRATIONS = {
    ("calls", "prompt_tokens"): "ALTER TABLE calls ALTER prompt_tokens TYPE BIGINT",
    ("calls", "completion_tokens"): "ALTER TABLE calls ALTER completion_tokens TYPE BIGINT",
    ("embeddings", "tokens"): "ALTER TABLE embeddings ALTER tokens TYPE BIGINT",
}


KEY_PREFIX_SQL = "('0x' || left(key, 15))::BIGINT"
INDEX_SMALL = 1 << 20  # a ledger up to this many calls gets its key index at the first look-up (tens of ms)
INDEX_AFTER_SCANS = 3  # a bigger one after this many scanning look-ups: by then they cost about what a build does
INDEX_MIN_BITS = 20  # bits of rowid in an index entry, at least (see _KeyIndex)
INDEX_RANGES = 16  # rowid ranges one look-up reads at most (its hits are where earlier runs wrote them)
FENCE = 64  # index entries per block of the look-up's first level (see _KeyIndex.rows)
INDEX_TAIL = 65_536  # calls committed past the index before it takes them in (each look-up reads them meanwhile)


def key_prefix(key: str) -> int:
    """The first 60 bits of a call key as an integer: what look-ups filter on. DuckDB filters a BIGINT
    column inside its scan and reads the other columns only for the rows that pass, so a look-up
    costs a few tens of ms even with 10 million calls cached (a join on the 64-character key read
    every key and text: 0.7-1.5 s there). Equal prefixes are told apart by the whole key."""
    return int(key[:15], 16)


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


def namespace_schema(namespace: str) -> str:
    """The schema that holds a namespace's latest tables: the pipeline's name, unless DuckDB or
    the store already uses that name."""
    if namespace.lower() in RESERVED_SCHEMAS or re.fullmatch(r"run_\d+", namespace):
        return f"pipeline_{namespace}"
    return namespace


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(eq=False)
class _Batch:
    """Buffered writes as Arrow tables, committed ledger first (calls, vectors, failures), then rows.
    Built on the event loop's thread when taken (a short, bounded stall), so the writer thread only
    runs DuckDB, which releases the GIL: a writer building Python objects would hold up the loop."""

    calls: pa.Table | None = None
    vectors: pa.Table | None = None
    failures: pa.Table | None = None
    rows: dict[str, list[pa.Table]] = field(default_factory=dict)  # per stage table, its slices in order
    keys: list[str] = field(default_factory=list)  # the calls' keys, forgotten by the index once committed
    vector_keys: list[str] = field(default_factory=list)
    ledger_done: bool = False

    def __bool__(self) -> bool:
        return any(t is not None for t in (self.calls, self.vectors, self.failures)) or bool(self.rows)


class _KeyIndex:
    """Which rows of `calls` may hold a key, without scanning `calls`: one sorted int64 per committed call,
    its key prefix's leading bits above its rowid (8 bytes a call: 80 MB at 10 million). A chunk's misses
    are told by a binary search, and its hits are read from the few rowid ranges where earlier runs wrote
    them, so a look-up costs the same with 10 thousand or 10 million calls cached (docs/benchmarks.md).

    It is built from the ledger and extended from it, in memory only: nothing is written, so there is no
    side structure to lose, repair or keep in step. Rows committed since (rowid `covered` and up) are not
    in it: every look-up also reads them from `calls`, so a call committed by anyone is never missed.
    `calls` is append-only (calls are never deleted), which is what keeps a row at its rowid."""

    def __init__(self) -> None:
        import numpy as np

        self.values = np.empty(0, np.int64)
        self.fence = self.values  # every FENCE-th value: the first level of a look-up
        self.bits = INDEX_MIN_BITS  # low bits: the rowid; the key prefix's top 63 - bits bits above them
        self.covered = 0  # rows below this rowid are all in `values`
        self.extended_at = 0  # Cache.flushed_calls when last extended

    def extend(self, con: duckdb.DuckDBPyConnection) -> None:
        """Add the rows committed since; rebuild with wider rowids when the ledger outgrows them."""
        import numpy as np

        top = con.execute("SELECT max(rowid) + 1 FROM calls WHERE rowid >= $1", [self.covered]).fetchall()[0][0]
        if top is None:
            return
        if top >= 1 << self.bits or not self.covered:  # start (again) with room for 4 times as many calls
            self.values, self.covered = np.empty(0, np.int64), 0
            self.bits = max(INDEX_MIN_BITS, (4 * top).bit_length())
        shift = self.bits - 3  # the key prefix has 60 bits; 63 - bits of them fit above the rowid
        # Arrow's buffers read as they are: DuckDB's fetchnumpy and Arrow's to_numpy import pandas (~1 s) where
        # it is installed. No NULL among them: a look-up never matches a NULL k.
        chunks = con.sql(f"SELECT ((k >> {shift}) << {self.bits}) | rowid AS v FROM calls "
                         f"WHERE rowid >= {self.covered} AND rowid < {int(top)} AND k IS NOT NULL"
                         ).to_arrow_table().column(0).chunks
        new = np.concatenate([np.empty(0, np.int64)] + [np.frombuffer(c.buffers()[1], np.int64, len(c), c.offset * 8)
                                                         for c in chunks])
        new.sort()
        self.values = np.insert(self.values, np.searchsorted(self.values, new), new) if len(self.values) else new
        self.fence = self.values[::FENCE].copy()
        self.covered = top  # rows committed since the max was read are the next tail

    def rows(self, prefixes: Any) -> str:
        """A SQL condition on `rowid` that holds for every row of `calls` whose key has one of these
        prefixes (an int64 array): the ranges of the indexed ones, and everything past `covered`."""
        import numpy as np

        values, bits = self.values, self.bits
        where = [f"rowid >= {self.covered}"]
        if not len(values):
            return where[0]
        wanted = np.sort(prefixes >> (bits - 3))  # (low + 2**bits could pass 2**63: compare these instead)
        low = wanted << bits
        # Two levels, so that a look-up touches a few cache lines per key, not one per step of a binary
        # search over 80 MB: the fence (every FENCE-th value) finds the block, the block the position.
        at = np.maximum(np.searchsorted(self.fence, low, "right") - 1, 0) * FENCE
        end = np.minimum(at + FENCE, len(values))
        for _ in range(FENCE.bit_length()):  # a binary search in each block, all keys at once
            mid = (at + end) >> 1
            right = (at < end) & (values[np.minimum(mid, len(values) - 1)] < low)
            at, end = np.where(right, mid + 1, at), np.where(right, end, np.minimum(mid, end))
        found = []
        while len(at):  # each key's first row, then (rarely: a shared prefix) the next ones
            inside = np.flatnonzero(at < len(values))
            inside = inside[values[at[inside]] >> bits == wanted[inside]]
            found.append(values[at[inside]] & ((1 << bits) - 1))
            at, wanted = at[inside] + 1, wanted[inside]
        rowids = np.concatenate(found) if found else at
        if len(rowids):
            rowids.sort()
            gaps = np.diff(rowids)
            cuts = np.flatnonzero(gaps > 2048)  # rows closer than that share DuckDB's storage anyway
            if len(cuts) >= INDEX_RANGES:  # the widest gaps split; the rest are read through
                cuts = np.sort(cuts[np.argsort(gaps[cuts])[-(INDEX_RANGES - 1):]])
            firsts, lasts = rowids[np.concatenate([[0], cuts + 1])], rowids[np.concatenate([cuts, [-1]])]
            where += [f"rowid BETWEEN {a} AND {b}" for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True)]
        return " OR ".join(where)


class Cache:
    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise CacheError(f"no retort database at {self.path}; run a pipeline first")
        if str(path) != ":memory:":
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
            self._migrate()
        elif self.con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' "
                              "AND table_name = 'runs'").fetchall()[0][0]:
            # Opened read-only, so no process writes the file now: a run still `running` died (a
            # writable open records that; a reader shows it, through a view of its own session).
            catalog = quote(self.con.execute("SELECT current_database()").fetchall()[0][0])
            self.con.execute("CREATE TEMP VIEW runs AS SELECT * REPLACE (CASE WHEN status = 'running' "
                             f"THEN 'crashed' ELSE status END AS status) FROM {catalog}.main.runs")
        self._held = False  # a transaction start_run left open (see release)
        self._lock = threading.Lock()  # every write to the file holds it
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writing: concurrent.futures.Future[None] | None = None
        self._flushing = False  # a flush_async is running
        self._wcon: duckdb.DuckDBPyConnection | None = None
        self._pending: list[_Batch] = []  # taken from the buffers, not yet committed
        self._write_errors = 0
        self._broken: CacheError | None = None
        # Buffers: what came in since the last slice, and the slices already converted to Arrow (every
        # SLICE rows, so converting never holds the event loop for long; see _Batch).
        self._calls: list[tuple[Any, ...]] = []
        self._call_slices: list[pa.Table] = []
        self._call_keys: list[str] = []
        self._row_slices: dict[str, list[pa.Table]] = {}
        self._buffered = 0  # rows and calls in the buffers, raw or converted
        self._call_index: dict[str, tuple[str, int, int]] = {}
        self._keys: _KeyIndex | None = None  # committed calls' keys in memory (see _ledger_rows)
        self._scans = 0  # look-ups that scanned `calls` while it had no key index
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._created: set[str] = set()
        self._types: dict[str, dict[str, pa.DataType]] = {}  # pinned Arrow types per table (vectors)
        self._columns: dict[str, dict[str, str]] = {}  # DuckDB column types of the tables this process writes
        self._provisional: dict[str, set[str]] = {}  # columns created from all-null batches: type not known yet
        self._failures: list[tuple[Any, ...]] = []
        self._vectors: list[tuple[Any, ...]] = []
        self._vector_index: dict[str, list[float]] = {}
        self.last_flush = time.monotonic()
        self.flushed_calls = 0
        self._closed = False

    def _migrate(self) -> None:
        types = {(t, c): kind for t, c, kind in self.con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE schema_name = 'main' "
            "AND table_name IN ('calls', 'embeddings', 'runs')").fetchall()}
        for (table, col), statement in MIGRATIONS.items():
            if types.get((table, col), "BIGINT") != "BIGINT":
                self.con.execute(statement)
        if ("calls", "k") not in types:  # the look-up column (see `lookup`), for files written before it
            self.con.execute("ALTER TABLE calls ADD COLUMN k BIGINT")
            self.con.execute(f"UPDATE calls SET k = {KEY_PREFIX_SQL}")
        if ("runs", "namespace") not in types:
            self.con.execute("ALTER TABLE runs ADD COLUMN namespace VARCHAR")
            self.con.execute("UPDATE runs SET namespace = pipeline")
        if ("runs", "pinned") not in types:
            self.con.execute("ALTER TABLE runs ADD COLUMN pinned BOOLEAN DEFAULT false")
        # One process holds the file at a time, so a run still `running` now died without closing it.
        if self.con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchall()[0][0]:
            self.con.execute("UPDATE runs SET status = 'crashed', finished_at = coalesce(finished_at, now()) "
                             "WHERE status = 'running'")

    # ------------------------------------------------------------ runs

    def start_run(self, pipeline: str, spec_path: str, spec_hash: str, argv: str, *, namespace: str | None = None,
                  hold: bool = False) -> int:
        """Record a new run and make its schema. With `hold`, the transaction stays open until the
        first write that needs its own (`release`): a rerun whose stages are all reused then
        commits once, in finish_run, instead of once per statement."""
        self._check_writes()
        self._lock.acquire()
        self.con.execute("BEGIN")
        self._held = True
        try:
            run_id = int(self.con.execute(
                "INSERT INTO runs (run_id, pipeline, spec_path, spec_hash, started_at, status, argv, namespace) "
                "SELECT coalesce(max(run_id), 0) + 1, ?, ?, ?, now(), 'running', ?, ? FROM runs RETURNING run_id",
                [pipeline, spec_path, spec_hash, argv, namespace or pipeline]).fetchall()[0][0])
            self.con.execute(f"CREATE SCHEMA IF NOT EXISTS run_{run_id}")
        except BaseException:
            self._held = False
            self.con.execute("ROLLBACK")
            self._lock.release()
            raise
        if not hold:
            self.release()
        return run_id

    def latest_run(self, namespace: str | None = None) -> tuple[int, str, str, str, str | None] | None:
        """(run_id, pipeline, spec_path, status, stats JSON) of the newest run (of a namespace), if any."""
        where, args = ("WHERE coalesce(namespace, pipeline) = ? ", [namespace]) if namespace else ("", [])
        rows = self.con.execute(f"SELECT run_id, pipeline, spec_path, status, stats FROM runs {where}"
                                "ORDER BY run_id DESC LIMIT 1", args).fetchall()
        return rows[0] if rows else None

    def release(self) -> None:
        """Commit what start_run held open, if anything."""
        if self._held:
            self._held = False
            try:
                self.con.execute("COMMIT")
            finally:
                self._lock.release()

    def finish_run(self, run_id: int, status: str, stats: dict[str, Any], stages: Iterable[str],
                   namespace: str) -> None:
        """Close the run's record. A complete run (`ok`) becomes the latest of its namespace: its
        views point at this run's tables. Any other status leaves every view as it was. No
        CHECKPOINT here: DuckDB folds the write-ahead log into the file once it passes 16 MB."""
        broken: CacheError | None = None
        try:
            self.flush()
        except CacheError as exc:  # its calls are committed (the ledger goes first); its rows are not
            broken, status = exc, "error"
        stages = set(stages)
        with self._transaction():
            if status == "ok":
                self._point_views(run_id, stages, namespace)
            self.con.execute("UPDATE runs SET finished_at = now(), status = ?, stats = ? WHERE run_id = ?",
                             [status, orjson.dumps(stats, default=str).decode(), run_id])
        if broken is not None:
            raise broken
        self._prune(run_id)

    def _point_views(self, run_id: int, stages: set[str], namespace: str) -> None:
        schema, target = f"run_{run_id}", namespace_schema(namespace)
        found = self.con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE schema_name = ? UNION ALL "
            "SELECT schema_name, view_name FROM duckdb_views() WHERE schema_name IN (?, ?, 'main') AND NOT internal",
            [schema, schema, target]).fetchall()
        produced = {name for where, name in found if where == schema}
        self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(target)}")
        for name in sorted(produced):  # stage tables and the extra tables stages keep (`<stage>__<suffix>`)
            if name in stages or name.split("__")[0] in stages:
                for view_schema in (quote(target), "main"):
                    self.con.execute(f'CREATE OR REPLACE VIEW {view_schema}.{quote(name)} AS '
                                     f'SELECT * FROM {schema}.{quote(name)}')
        for where, name in found:  # a table this pipeline made before but not this time: no stale view
            if where in ("main", target) and name.split("__")[0] in stages and name not in produced:
                self.con.execute(f"DROP VIEW {quote(where)}.{quote(name)}")

    def pin(self, run_id: int, pinned: bool = True) -> None:
        """Keep (or stop keeping) a run's tables whatever its age."""
        with self._transaction():
            found = self.con.execute("UPDATE runs SET pinned = ? WHERE run_id = ? RETURNING run_id",
                                     [pinned, run_id]).fetchall()
        if not found:
            raise CacheError(f"no run {run_id} in {self.path}")
        if not pinned:
            self._prune(self.con.execute("SELECT max(run_id) FROM runs").fetchall()[0][0] or 0)

    def kept_runs(self, newest: int) -> set[int]:
        """Runs whose tables retention keeps: the last KEEP_RUNS, the latest complete run of every
        namespace, every pinned run, and any run still running."""
        rows = self.con.execute(
            "SELECT run_id FROM runs WHERE run_id > ? OR pinned OR status = 'running' UNION "
            "SELECT max(run_id) FROM runs WHERE status = 'ok' GROUP BY coalesce(namespace, pipeline)",
            [newest - KEEP_RUNS]).fetchall()
        return {int(r[0]) for r in rows if r[0] is not None}

    def _prune(self, run_id: int) -> None:
        """Drop the stage tables of runs retention does not keep; calls are kept forever."""
        if run_id <= KEEP_RUNS:
            return
        kept = self.kept_runs(run_id)
        for (schema,) in self.con.execute(
                "SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'run_%' "
                "AND TRY_CAST(substr(schema_name, 5) AS INTEGER) <= ?", [run_id - KEEP_RUNS]).fetchall():
            old = int(schema[4:])
            if old in kept:
                continue
            with self._transaction():
                self._rehome(old)
                self.con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                self.con.execute("DELETE FROM memo WHERE origin = ?", [old])  # their rows are gone

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
        if self._held:  # this transaction takes over the one start_run held open (and its lock)
            self._held = False
        else:
            self._lock.acquire()
            self.con.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            self._lock.release()
            raise
        try:
            self.con.execute("COMMIT")
        finally:
            self._lock.release()

    # ------------------------------------------------------------ naming tables for show/export

    def resolve(self, name: str, run: int | None = None) -> tuple[str, int | None, str | None]:
        """A table as a user names it, as (relation, run, run status): a record (`calls`, `runs`,
        `failures`, `metrics`), `STAGE` (the latest complete run of the one pipeline that has it),
        `PIPELINE.STAGE`, or with `run`, that run's table. Every miss says what to do instead."""
        if run is None and name in ("calls", "runs", "failures", "metrics", "embeddings", "memo"):
            return f"main.{quote(name)}", None, None
        namespace, dot, stage = name.rpartition(".")
        if run is not None:
            return self._run_table(run, name if not dot else stage)
        namespaces = [r[0] for r in self.con.execute(
            "SELECT DISTINCT coalesce(namespace, pipeline) FROM runs WHERE status = 'ok' ORDER BY 1").fetchall()]
        wanted = [namespace] if dot else namespaces
        holders = []
        for ns in wanted:
            schema = namespace_schema(ns)
            found = self.con.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE schema_name = ? AND view_name = ?",
                [schema, stage]).fetchall()
            if found:
                match = re.search(r"\brun_(\d+)\.", found[0][1])
                holders.append((ns, schema, int(match.group(1)) if match else None))
        if len(holders) > 1:
            names = ", ".join(f"{ns}.{stage}" for ns, _, _ in holders)
            raise NotFoundError(f"{stage!r} is a table of {len(holders)} pipelines; name one: {names}")
        if holders:
            _, schema, origin = holders[0]
            return f"{quote(schema)}.{quote(stage)}", origin, "ok"
        raise NotFoundError(self._missing(stage, namespace if dot else None, namespaces))

    def _run_table(self, run: int, stage: str) -> tuple[str, int | None, str | None]:
        record = self.con.execute("SELECT pipeline, status FROM runs WHERE run_id = ?", [run]).fetchall()
        if not record:
            raise NotFoundError(f"no run {run} in {self.path} (`retort list` shows the runs)")
        pipeline, status = record[0]
        if not self._schema_exists(f"run_{run}"):
            raise NotFoundError(f"run {run}'s tables were pruned (retort keeps the last {KEEP_RUNS} runs, the latest "
                                f"complete run of every pipeline and pinned runs); `retort run {pipeline}` with the "
                                "same input and settings rebuilds them from the cache at 0 calls; "
                                "`retort keep RUN` pins a run")
        if not self.tables_exist(f"run_{run}", [stage]):
            tables = [r[0] for r in self.con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? UNION "
                "SELECT view_name FROM duckdb_views() WHERE schema_name = ? ORDER BY 1",
                [f"run_{run}", f"run_{run}"]).fetchall()]
            raise NotFoundError(f"run {run} ({pipeline}, {status}) has no table {stage!r} "
                                f"(tables: {', '.join(tables) or 'none'})")
        return f"run_{run}.{quote(stage)}", run, status

    def _schema_exists(self, schema: str) -> bool:
        return bool(self.con.execute("SELECT count(*) FROM duckdb_schemas() WHERE schema_name = ?",
                                     [schema]).fetchall()[0][0])

    def _missing(self, stage: str, namespace: str | None, namespaces: list[str]) -> str:
        """Why no latest table is named `stage`, and what to do."""
        where = f"pipeline {namespace!r} has" if namespace else "no pipeline has"
        made = self.con.execute(
            "SELECT r.run_id, r.pipeline, r.status FROM runs r WHERE list_contains("
            "list_transform(CAST(json_extract(r.stats, '$.stages') AS JSON[]), lambda s: s->>'name'), ?) "
            + ("AND coalesce(r.namespace, r.pipeline) = ? " if namespace else "")
            + "ORDER BY r.run_id DESC LIMIT 1", [stage, namespace] if namespace else [stage]).fetchall()
        if made:
            run, pipeline, status = made[0]
            if status != "ok" and self._schema_exists(f"run_{run}"):
                return (f"{where} a complete run with a table {stage!r}; run {run} ({pipeline}) is {status}: "
                        f"`--run {run}` shows its rows, and `retort run {pipeline}` completes it (cached calls "
                        "are not made again)")
            return (f"{where} a kept table {stage!r}: run {run} ({pipeline}) made it and its tables were pruned; "
                    f"`retort run {pipeline}` with the same input and settings rebuilds it from the cache at 0 calls")
        known = ", ".join(namespaces) or "none yet"
        return f"{where} a table {stage!r} (pipelines with complete runs: {known}; `retort list` shows their tables)"

    # ------------------------------------------------------------ whole stage tables

    def digest(self, table: str) -> str:
        """A fingerprint of a table's content: its columns and types, and its rows as a multiset
        (row order does not count). One scan in DuckDB, about 2 ms per 10,000 rows."""
        columns = self.con.execute(f"DESCRIBE {table}").fetchall()
        count, total, mixed = self.con.execute(
            f"SELECT count(*), sum(hash(t))::HUGEINT, bit_xor(hash(t)) FROM {table} t").fetchall()[0]
        return hashlib.sha256(repr(([c[:2] for c in columns], count, total, mixed)).encode()).hexdigest()

    def count(self, table: str) -> int:
        return int(self.con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])

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
        with self._writes():
            self.con.execute("INSERT INTO memo VALUES (?, ?, ?, ?, ?, now())",
                             [fingerprint, run_id, stage, origin, orjson.dumps(stats, default=str).decode()])

    def record_metrics(self, rows: list[list[Any]]) -> None:
        """(run_id, pipeline, stage, name, value, data JSON) rows into `metrics`."""
        with self._writes():
            for row in rows:
                self.con.execute("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, now())", row)

    def execute(self, sql: str) -> None:
        """A statement of retort's own that writes (a view, an empty stage table); inside what
        start_run holds open, if it still is."""
        self._check_writes()
        if self._held:  # this thread holds the lock with the transaction
            self.con.execute(sql)
            return
        with self._lock:
            self.con.execute(sql)

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
        tables = ", ".join(f"{quote(schema)}.{quote(name)}" for name in names)
        try:  # binding a query is the cheapest test (a catalog scan costs several times more)
            self.con.execute(f"SELECT NULL FROM {tables} LIMIT 0")
        except duckdb.CatalogException:
            return False
        return True

    # ------------------------------------------------------------ calls

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, int, int]]:
        """key → (text, prompt_tokens, completion_tokens) for the keys already cached."""
        index = self._call_index  # calls not yet committed (a writer may pop committed ones meanwhile)
        found = {}
        for k in keys:
            hit = index.get(k)
            if hit is not None:
                found[k] = hit
        if len(found) == len(keys):
            return found
        wanted = {k for k in keys if k not in found}
        found.update((key, (text, p, c)) for key, text, p, c in self._ledger_rows(wanted) if key in wanted)
        return found

    async def lookup_async(self, keys: list[str]) -> dict[str, tuple[str, int, int]]:
        """`lookup` on a thread, so the event loop keeps sending requests meanwhile. Only the caller's
        task may use this connection until it returns (a prompt stage's chunk loop is the only one)."""
        import asyncio

        return await asyncio.to_thread(self.lookup, keys)

    def add_call(self, key: str, model: str, request: bytes, sample: int, attempt: int, text: str,
                 finish_reason: str | None, prompt_tokens: int, completion_tokens: int, latency_ms: float,
                 run_id: int, stage: str) -> None:
        """`request` is the canonical JSON the key hashes (model, messages, params, schema)."""
        self._calls.append((key, model, request.decode(), sample, attempt, text, finish_reason, prompt_tokens,
                            completion_tokens, latency_ms, run_id, stage, key_prefix(key), None))
        self._call_index[key] = (text, prompt_tokens, completion_tokens)
        self._call_keys.append(key)
        self._buffered += 1
        if len(self._calls) >= SLICE:
            self._slice_calls()

    def _slice_calls(self) -> None:
        cols = list(zip(*self._calls, strict=True))
        arrays = [pa.array(col, type=f[1]) for col, f in zip(cols[:-1], CALL_FIELDS[:-1], strict=True)]
        now = pa.array([time.time_ns() // 1000] * len(self._calls), pa.timestamp("us"))
        self._call_slices.append(pa.Table.from_arrays([*arrays, now], schema=CALL_SCHEMA))
        self._calls = []

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
        if types:
            self._types[table] = types
        buffered = self._rows.setdefault(table, [])
        buffered.extend(rows)
        self._buffered += len(rows)
        if len(buffered) >= SLICE:
            self._slice_rows(table)

    def _slice_rows(self, table: str) -> None:
        rows = self._rows.pop(table, [])
        if rows:
            self._row_slices.setdefault(table, []).append(
                table_from_rows(rows, lenient=True, types=self._types.get(table)))

    def write_table(self, table: str, data: pa.Table) -> None:
        """Create or replace a whole table from Arrow (input tables, SQL and Python stage results)."""
        with self._writes():
            self._create(self.con, table, data)

    def drop_table(self, table: str) -> None:
        with self._writes():
            self.con.execute(f"DROP TABLE IF EXISTS {table}")
        self._created.discard(table)
        self._columns.pop(table, None)
        self._rows.pop(table, None)
        self._row_slices.pop(table, None)

    @contextlib.contextmanager
    def _writes(self) -> Iterator[None]:
        """A write of retort's own, on the calling thread: after what start_run held, never beside a
        group commit."""
        self._check_writes()
        self.release()
        with self._lock:
            yield

    # ------------------------------------------------------------ group commit

    def maybe_flush(self) -> None:
        """Start a group commit on the writer thread when one is due; never waits for it."""
        self._check_writes()
        if self._writing is not None or self._flushing:
            return
        pending = self._buffered + len(self._vectors) + len(self._failures)
        if pending >= FLUSH_ROWS or (pending and time.monotonic() - self.last_flush >= FLUSH_SECONDS):
            self._take()
            self.last_flush = time.monotonic()
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retort-writer")
            self.release()
            if any(t.startswith("temp.") for b in self._pending for t in b.rows):
                self.flush()  # a dry run's temporary tables belong to this connection alone
                return
            if self._wcon is None:
                self._wcon = self.con.cursor()  # the writer thread's own connection to the same database
            self._writing = self._writer.submit(self._write_pending, self._wcon)

    async def flush_async(self) -> None:
        """`flush` on a thread: the event loop is not held while the last rows of a stage commit."""
        import asyncio

        self._flushing = True  # the ticker's maybe_flush stays out of the way meanwhile
        try:
            await asyncio.to_thread(self.flush)
        finally:
            self._flushing = False

    def flush(self) -> None:
        """Commit everything buffered, on this thread, before returning (a stage boundary, the end)."""
        self._wait()
        self._take()
        self.last_flush = time.monotonic()
        while self._pending:
            self.release()
            try:
                self._write_pending(self.con)
            except Exception as exc:
                self._settle(exc)
                continue
            self._settle(None)

    def _check_writes(self) -> None:
        """Settle a finished background write; raise if writes keep failing."""
        if self._broken is not None:
            raise self._broken
        if self._writing is not None and self._writing.done():
            self._settle(self._writing.exception())

    def _wait(self) -> None:
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._settle(self._writing.exception())

    def _take(self) -> None:
        """Move the buffers into a batch of Arrow tables (most of them converted already, slice by slice)."""
        if self._calls:
            self._slice_calls()
        for table in list(self._rows):
            self._slice_rows(table)
        vectors, failures = self._vectors, self._failures
        if not (self._call_slices or vectors or failures or self._row_slices):
            return
        now = pa.array([time.time_ns() // 1000] * max(len(vectors), len(failures), 1), pa.timestamp("us"))
        batch = _Batch(keys=self._call_keys, vector_keys=[v[0] for v in vectors], rows=self._row_slices)
        if self._call_slices:
            batch.calls = pa.concat_tables(self._call_slices)
        if vectors:
            cols = list(zip(*vectors, strict=True))
            batch.vectors = pa.table({
                "key": pa.array(cols[0], pa.string()), "model": pa.array(cols[1], pa.string()),
                "text": pa.array(cols[2], pa.string()), "vector": pa.array(cols[3], pa.list_(pa.float32())),
                "tokens": pa.array(cols[4], pa.int64()), "run_id": pa.array(cols[5], pa.int32()),
                "created_at": now[:len(vectors)]})
        if failures:
            f = failures
            batch.failures = pa.table({
                "run_id": pa.array([x[0] for x in f], pa.int32()), "stage": pa.array([x[1] for x in f], pa.string()),
                "row_id": pa.array([x[2] for x in f], pa.string()),
                "call_key": pa.array([x[3] for x in f], pa.string()),
                "error": pa.array([x[4] for x in f], pa.string()),
                "status": pa.array([x[5] if isinstance(x[5], int) and -2**31 <= x[5] < 2**31 else None for x in f],
                                   pa.int32()),
                "created_at": now[:len(f)]})
        self._call_slices, self._call_keys, self._row_slices = [], [], {}
        self._vectors, self._failures, self._buffered = [], [], 0
        self._pending.append(batch)

    def _settle(self, exc: BaseException | None) -> None:
        """On the caller's thread, after a write: forget what was committed, or count the failure.
        Batches that failed stay queued, in order, for the next write."""
        self._writing = None
        done = [b for b in self._pending if b.ledger_done and not b.rows]
        for batch in done:
            self.flushed_calls += len(batch.keys)
            for key in batch.keys:  # flushed calls are found by SQL now; keep the in-memory index small
                self._call_index.pop(key, None)
            for key in batch.vector_keys:
                self._vector_index.pop(key, None)
        self._pending = [b for b in self._pending if not any(b is d for d in done)]
        if exc is None:
            self._write_errors = 0
            return
        self._write_errors += 1
        if self._write_errors >= WRITE_ATTEMPTS:
            calls = sum(len(b.keys) for b in self._pending if not b.ledger_done)
            rows = sum(t.num_rows for b in self._pending for slices in b.rows.values() for t in slices)
            self._broken = CacheError(f"cannot write to {self.path} ({WRITE_ATTEMPTS} attempts): "
                                      f"{type(exc).__name__}: {exc}; {calls} calls and {rows} stage rows are "
                                      "not saved")
            raise self._broken from exc

    def _write_pending(self, con: duckdb.DuckDBPyConnection) -> None:
        """Commit the queued batches in order: per batch, the ledger (calls, vectors, failures) in one
        transaction, then its stage rows in another. A batch's ledger is never written twice."""
        for batch in list(self._pending):
            if not batch.ledger_done:
                with self._lock:
                    self._commit(con, lambda b=batch: self._write_ledger(con, b))
                batch.ledger_done = True
            if batch.rows:
                with self._lock:
                    self._commit(con, lambda b=batch: self._write_rows(con, b))
                batch.rows = {}

    @staticmethod
    def _commit(con: duckdb.DuckDBPyConnection, work: Any) -> None:
        con.execute("BEGIN")
        try:
            work()
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _write_ledger(self, con: duckdb.DuckDBPyConnection, batch: _Batch) -> None:
        for table, data in (("calls", batch.calls), ("embeddings", batch.vectors), ("failures", batch.failures)):
            if data is not None:
                self._insert(con, table, data)

    def _write_rows(self, con: duckdb.DuckDBPyConnection, batch: _Batch) -> None:
        for table, slices in batch.rows.items():
            for data in slices:  # each slice may widen the table's types (see _append)
                self._insert(con, table, data)

    def _insert(self, con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        if table in ("calls", "failures", "embeddings"):
            _register_and(con, data, f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
        elif table not in self._created:
            self._create(con, table, data)
        else:
            self._append(con, table, data)

    def _create(self, con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        provisional = {f.name for f in data.schema if pa.types.is_null(f.type)}
        data = _nulls_as_strings(data)
        _register_and(con, data, f"{create(table)} AS SELECT * FROM _batch")
        self._created.add(table)
        self._columns[table] = {name: kind for name, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall()}
        self._provisional[table] = provisional

    def _append(self, con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        """Insert a batch into a table made by an earlier batch, widening the table where the batch's
        types do not fit (see the module docstring); never fails on a type."""
        have, provisional = self._columns[table], self._provisional.setdefault(table, set())
        con.register("_batch", data)
        try:
            incoming = {name: kind for name, kind, *_ in con.execute("DESCRIBE SELECT * FROM _batch").fetchall()}
            select = []
            for name, kind in incoming.items():
                column = quote(name)
                current = have.get(name)
                if kind == '"NULL"' or kind == "NULL":
                    pass
                elif current is None:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    have[name] = kind
                elif current != kind:
                    if name in provisional:
                        con.execute(f"ALTER TABLE {table} ALTER {column} TYPE {kind}")
                        have[name] = kind
                    elif current in ("BIGINT", "INTEGER") and kind == "DOUBLE":
                        con.execute(f"ALTER TABLE {table} ALTER {column} TYPE DOUBLE")
                        have[name] = kind
                    elif not (current == "DOUBLE" and kind in ("BIGINT", "INTEGER")):
                        if current != "VARCHAR":
                            con.execute(f"ALTER TABLE {table} ALTER {column} TYPE VARCHAR "
                                             f"USING to_json({column})::VARCHAR")
                            have[name] = "VARCHAR"
                        if kind != "VARCHAR":
                            select.append(f"to_json({column})::VARCHAR AS {column}")
                            continue
                    provisional.discard(name)
                else:
                    provisional.discard(name)
                if kind not in ('"NULL"', "NULL"):
                    provisional.discard(name)
                select.append(column)
            if select:
                con.execute(f"INSERT INTO {table} BY NAME SELECT {', '.join(select)} FROM _batch")
        finally:
            con.unregister("_batch")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only and self._broken is None:  # a broken store has said so already
                self.flush()
            self.release()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._wcon is not None:
                self._wcon.close()
            self.con.close()

    # ---- reads for the engine (runner, reuse, stage executors) ----

    def search_path(self, *schemas: str) -> None:
        """Where bare table names resolve (SQL stages, `where:` filters): this run's schema, then main."""
        self.con.execute(f"SET search_path = '{','.join(schemas)}'")

    def select(self, query: str, **tables: pa.Table) -> pa.Table:
        """The rows of one read-only SELECT (checked before DuckDB sees it: `NotReadOnly` otherwise),
        over the stored tables and any Arrow `tables` given by name."""
        check_select(query)
        for name, data in tables.items():
            self.con.register(name, data)
        try:
            return self.con.sql(query).to_arrow_table()
        finally:
            for name in tables:
                self.con.unregister(name)

    def columns(self, relation: str) -> list[str]:
        """The column names of a table, a view, or a SELECT (described, not run)."""
        return [row[0] for row in self.con.execute(f"DESCRIBE {relation}").fetchall()]

    def completion_history(self, model: str, stage: str) -> tuple[float | None, int]:
        """The average completion tokens of this model's cached calls for `stage`, and how many there are."""
        avg, n = self.con.execute("SELECT avg(completion_tokens), count(*) FROM calls WHERE model = ? AND stage = ?",
                                  [model, stage]).fetchall()[0]
        return avg, n

    def link(self, view: str, run: int, stage: str) -> None:
        """`view` becomes a view onto run `run`'s table of `stage` (a reused build: no copy)."""
        self.execute(f"CREATE VIEW {view} AS SELECT * FROM run_{run}.{quote(stage)}")

    def _ledger_rows(self, wanted: set[str]) -> list[tuple[str, str, int, int]]:
        """(key, text, prompt_tokens, completion_tokens) of the committed calls whose key prefix is one of
        `wanted`'s (equal prefixes are told apart by the caller). DuckDB filters the BIGINT `k` inside its
        scan; the key index (see _KeyIndex) limits the scan to the rowids that can match. Without the
        index the scan reads all of `calls` (4-8 ms at 10k calls, 60-130 ms at 10M; docs/benchmarks.md)."""
        prefixes = [key_prefix(k) for k in wanted]
        where = "true"
        try:
            if self._keys is None and (self._scans >= INDEX_AFTER_SCANS or self.con.execute(
                    "SELECT count(*) FROM calls").fetchall()[0][0] <= INDEX_SMALL):
                self._keys = _KeyIndex()
            if self._keys is not None:
                if self._keys.covered == 0 or self.flushed_calls - self._keys.extended_at >= max(
                        INDEX_TAIL, len(self._keys.values) // 8):  # the tail read on each look-up stays short
                    self._keys.extended_at = self.flushed_calls
                    self._keys.extend(self.con)
                import numpy as np

                where = self._keys.rows(np.array(prefixes, np.int64))
        except Exception:  # the index is only a speed-up: without it every row is read, none hidden
            self._keys, where = None, "true"
        self._scans += self._keys is None
        # The prefixes as an Arrow column: binding 4,096 Python ints as a list parameter costs ~10 ms.
        self.con.register("_lookup_k", pa.table({"k": pa.array(prefixes, pa.int64())}))
        try:
            return self.con.execute(
                "SELECT key, text, coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0) FROM calls "
                f"WHERE ({where}) AND k IN (SELECT k FROM _lookup_k)").fetchall()
        finally:
            self.con.unregister("_lookup_k")

    # ---- reads for compare (retort/comparison.py and what it becomes) ----

    def run_input_rows(self, run_id: int) -> list[dict[str, Any]]:
        """The rows of a run's `input` table: the dataset as that run read it, with its `_id`."""
        return self.con.sql(f'SELECT * FROM run_{run_id}."input"').to_arrow_table().to_pylist()

    def stage_column_names(self, run_id: int, stage: str) -> list[str]:
        return self.columns(f"run_{run_id}.{quote(stage)}")

    def stage_values(self, run_id: int, stage: str, column: str) -> list[tuple[str, Any]]:
        """(`_id` as text, the column's value) for every row of a run's stage table."""
        return self.con.execute(f'SELECT CAST("_id" AS VARCHAR), {quote(column)} '
                                f"FROM run_{run_id}.{quote(stage)}").fetchall()

    def call_latency_seconds(self, run_id: int) -> float:
        """The summed latency of the calls a run's stage tables reference, each call once: the run's wall
        time had it made every call one at a time."""
        schema = f"run_{run_id}"
        tables = [r[0] for r in self.con.execute(
            "SELECT DISTINCT table_name FROM information_schema.columns WHERE table_schema = ? "
            "AND column_name = '_call'", [schema]).fetchall()]
        if not tables:
            return 0.0
        keys = " UNION ".join(f'SELECT "_call" AS k FROM {schema}.{quote(t)}' for t in sorted(tables))
        total = self.con.execute(f"SELECT coalesce(sum(l), 0) FROM (SELECT key, min(latency_ms) AS l FROM calls "
                                 f"WHERE key IN ({keys}) GROUP BY key)").fetchall()[0][0]
        return float(total or 0) / 1000

    def record_comparison(self, name: str, items: list[tuple[Any, ...]], metrics: list[tuple[Any, ...]]) -> None:
        """A comparison's results in one transaction: its rows of `compare_items` (comparison, strategy, item_id,
        prediction, reference, score) replaced, and (run_id, pipeline, stage, name, value, data JSON) rows
        added to `metrics`."""
        def arrow(rows: list[tuple[Any, ...]], fields: list[tuple[str, pa.DataType]]) -> pa.Table:
            return pa.table({name: pa.array([row[i] for row in rows], kind) for i, (name, kind) in enumerate(fields)})

        self._check_writes()
        item_table = arrow(items, [("comparison", pa.string()), ("strategy", pa.string()), ("item_id", pa.string()),
                                   ("prediction", pa.string()), ("reference", pa.string()), ("score", pa.float64())])
        metric_table = arrow(metrics, [("run_id", pa.int32()), ("pipeline", pa.string()), ("stage", pa.string()),
                                       ("name", pa.string()), ("value", pa.float64()), ("data", pa.string())])
        with self._transaction():
            self.con.execute("CREATE TABLE IF NOT EXISTS main.compare_items (comparison VARCHAR, strategy VARCHAR, "
                             "item_id VARCHAR, prediction VARCHAR, reference VARCHAR, score DOUBLE)")
            self.con.execute("DELETE FROM main.compare_items WHERE comparison = ?", [name])
            _register_and(self.con, item_table, "INSERT INTO main.compare_items BY NAME SELECT * FROM _batch")
            _register_and(self.con, metric_table,
                          "INSERT INTO main.metrics BY NAME SELECT *, now() AS created_at FROM _batch")

    # ---- reads for show, export, view, lineage, the Python API and the CLI ----
    # Names of tables reach these as relations that `resolve` (or the viewer's catalog checks) made;
    # every value is a bound parameter, and a user's `--where` is checked before it runs (`_filtered`).

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        """The runs, newest first (the last `limit` of them)."""
        return self._run_records("ORDER BY run_id DESC" + (" LIMIT ?" if limit is not None else ""),
                                 [] if limit is None else [limit])

    def run(self, run_id: int) -> RunRecord | None:
        """One run's record, or None when there is no such run."""
        found = self._run_records("WHERE run_id = ?", [run_id])
        return found[0] if found else None

    def _run_records(self, rest: str, params: list[Any]) -> list[RunRecord]:
        # `*`: a file written before `namespace` and `pinned` existed still reads, opened read-only
        cur = self.con.execute(f"SELECT *, epoch(finished_at - started_at) AS __seconds FROM runs {rest}", params)
        names = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            r = dict(zip(names, values, strict=True))
            stats = orjson.loads(r["stats"]) if isinstance(r["stats"], str) else r["stats"]
            out.append(RunRecord(
                run_id=int(r["run_id"]), pipeline=r["pipeline"], namespace=r.get("namespace") or r["pipeline"],
                spec_path=r["spec_path"], spec_hash=r["spec_hash"], status=r["status"], pinned=bool(r.get("pinned")),
                started_at=r["started_at"], finished_at=r["finished_at"], seconds=r["__seconds"], argv=r["argv"],
                stats=stats if isinstance(stats, dict) else {}))
        return out

    def latest_complete_runs(self) -> dict[str, int]:
        """Namespace → its latest complete (`ok`) run, by namespace."""
        return {ns: int(run) for ns, run in self.con.execute(
            "SELECT coalesce(namespace, pipeline), max(run_id) FROM runs WHERE status = 'ok' "
            "GROUP BY 1 ORDER BY 1").fetchall()}

    def unpruned_runs(self) -> set[int]:
        """Runs whose tables are still kept (retention drops older runs' tables; their calls stay)."""
        rows = self.con.execute("SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'run_%' "
                                "AND database_name = current_database()").fetchall()
        return {int(name[4:]) for (name,) in rows if name[4:].isdigit()}

    def runs_that_made(self, table: str) -> list[tuple[int, str | None]]:
        """(run, status) of every run whose kept tables include `table`, newest first."""
        return [(int(run), status) for run, status in self.con.execute(
            "SELECT run_id, status FROM runs WHERE 'run_' || run_id IN (SELECT schema_name FROM duckdb_tables() "
            "WHERE table_name = $1 AND database_name = current_database() UNION ALL SELECT schema_name "
            "FROM duckdb_views() WHERE view_name = $1 AND database_name = current_database() AND NOT internal) "
            "ORDER BY run_id DESC", [table]).fetchall()]

    def tables(self, schema: str) -> dict[str, str]:
        """The tables and views of `schema` (`main`, `run_N`, a namespace), by name: "table" or "view"."""
        return dict(self.con.execute(
            "SELECT table_name, 'table' FROM duckdb_tables() WHERE schema_name = $1 "
            "AND database_name = current_database() UNION ALL SELECT view_name, 'view' FROM duckdb_views() "
            "WHERE schema_name = $1 AND database_name = current_database() AND NOT internal ORDER BY 1",
            [schema]).fetchall())

    def table(self, relation: str, *, where: str | None = None) -> pa.Table:
        """A whole table as Arrow, filtered by a user's `where` (checked: see `_filtered`)."""
        return self.con.sql(self._filtered(relation, where)).to_arrow_table()

    def page(self, relation: str, *, where: str | None = None, row_id: str | None = None, search: str | None = None,
             equals: Iterable[tuple[str, str | None]] = (), errors: bool | None = None, sort: str | None = None,
             descending: bool = False, limit: int = 50, offset: int = 0) -> Page:
        """Rows `offset` to `offset + limit` of a table, as Python values, and how many rows pass the filters:
        a user's `where` (checked), the row whose `_id` is `row_id`, rows where any column's text contains
        `search` (case-insensitively), rows whose column's text `equals` a value (None: it is NULL), rows
        whose `_error` is set (`errors=True`) or not (`False`); sorted by the column `sort` if given."""
        conditions: list[str] = []
        values: list[Any] = []
        if row_id is not None:
            conditions.append("CAST(_id AS VARCHAR) = ?")
            values.append(row_id)
        if search:
            names = self.columns(relation)
            conditions.append("(" + " OR ".join(f"contains(lower(CAST({quote(c)} AS VARCHAR)), ?)" for c in names)
                              + ")")
            values += [search.lower()] * len(names)
        for column, value in equals:
            if value is None:
                conditions.append(f"{quote(column)} IS NULL")
            else:
                conditions.append(f"CAST({quote(column)} AS VARCHAR) = ?")
                values.append(value)
        if errors is not None:
            conditions.append("_error IS NOT NULL" if errors else "_error IS NULL")
        query = f"SELECT * FROM ({self._filtered(relation, where)})"
        if conditions:
            query += f" WHERE {' AND '.join(conditions)}"
        order = f" ORDER BY {quote(sort)} {'DESC' if descending else 'ASC'} NULLS LAST" if sort else ""
        cur = self.con.execute(f"{query}{order} LIMIT ? OFFSET ?", [*values, max(0, limit), max(0, offset)])
        rows, described = cur.fetchall(), cur.description  # read both before the count: `cur` is the connection
        total = int(self.con.execute(f"SELECT count(*) FROM ({query})", values).fetchall()[0][0])
        return Page(columns=[d[0] for d in described], rows=rows, total=total,
                    json_columns=frozenset(d[0] for d in described if str(d[1]).upper() == "JSON"))

    def _filtered(self, relation: str, where: str | None) -> str:
        """`SELECT * FROM relation`, filtered by `where` once it is known to be one filter and nothing else.

        `show`, `export` and the Python API take `where` from a user. The text is refused when it holds a
        `;`, when the query it makes is not one SELECT (`check_select`, as every SQL a user writes), and
        when its parse tree differs from that of `SELECT * FROM relation WHERE (TRUE)` but for the WHERE
        clause: a closing parenthesis smuggling in a UNION, an ORDER BY or a LIMIT changes the tree.
        Last, the query is bound (DESCRIBE) so an unknown column is one line naming the filter. A reader's
        connection is read-only besides, so nothing a filter could call writes the file.
        """
        base = f"SELECT * FROM {relation}"
        if where is None:
            return base
        if not where.strip() or ";" in where:
            raise UserError(f"--where {where!r}: expected one SQL filter expression"
                            + (", without ';'" if ";" in where else ""))
        query = f"{base} WHERE ({where})"
        try:
            check_select(query)
            if self._tree(query) != self._tree(f"{base} WHERE (TRUE)"):
                raise UserError(f"--where {where!r}: expected one SQL filter expression over {relation}, "
                                "with nothing after it")
            self.con.execute(f"DESCRIBE {query}").fetchall()
        except NotReadOnly as exc:
            raise UserError(f"--where {where!r}: {exc}") from None
        except duckdb.Error as exc:
            raise UserError(f"--where {where!r}: {first_line(exc)}") from None
        return query

    def _tree(self, query: str) -> Any:
        """The parse tree of a query without its WHERE clause and source positions."""
        tree = orjson.loads(self.con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
        if tree.get("error"):
            return None

        def strip(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k not in ("where_clause", "query_location",
                                                                       "query_location_length")}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        return strip(tree["statements"])

    def failures(self, run: int, limit: int | None = None) -> list[dict[str, Any]]:
        """A run's failed calls and crashed stages, oldest first: stage, row_id, call_key, error, status,
        created_at."""
        cur = self.con.execute("SELECT stage, row_id, call_key, error, status, created_at FROM failures "
                               "WHERE run_id = ? ORDER BY created_at, stage, row_id LIMIT ?", [run, limit])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def failure_counts(self) -> dict[int, int]:
        """Run → how many failures it recorded (runs with none are left out)."""
        return {int(run): int(n) for run, n in self.con.execute(
            "SELECT run_id, count(*) FROM failures GROUP BY run_id").fetchall()}

    def call(self, key: str) -> dict[str, Any] | None:
        """The cached call `key` (its first record): key, stage, model, request (JSON text), text,
        finish_reason, prompt_tokens, completion_tokens, latency_ms, run_id."""
        cur = self.con.execute("SELECT key, stage, model, request, text, finish_reason, prompt_tokens, "
                               "completion_tokens, latency_ms, run_id FROM calls WHERE key = ? "
                               "ORDER BY created_at LIMIT 1", [key])
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        return dict(zip(names, rows[0], strict=True)) if rows else None

    def sampling(self, run: int) -> list[tuple[str, str | None, list[str]]]:
        """(model identity, sampling params as JSON text, the tables fed) for each model and params whose
        calls made rows of run `run`'s tables: the params the calls were asked with, not today's spec."""
        schema = f"run_{run}"
        tables = [r[0] for r in self.con.execute("SELECT DISTINCT table_name FROM information_schema.columns "
                                                 "WHERE table_schema = ? AND column_name = '_call' ORDER BY 1",
                                                 [schema]).fetchall()]
        if not tables:
            return []
        keys = " UNION ALL ".join("SELECT '{}' AS t, _call FROM {}.{}".format(t.replace("'", "''"), schema, quote(t))
                                  for t in tables)
        return [(model, params, list(names)) for model, params, names in self.con.execute(
            f"SELECT c.model, CAST(c.request->'params' AS VARCHAR), array_agg(DISTINCT u.t ORDER BY u.t) "
            f"FROM ({keys}) u JOIN calls c ON c.key = u._call GROUP BY 1, 2 ORDER BY 1, 2").fetchall()]

    def calls_by_model(self) -> list[tuple[Any, ...]]:
        """Per model, most calls first: model, calls, stages, prompt tokens, completion tokens, average
        latency in ms (one decimal), first and last call's time."""
        return self.con.execute(
            "SELECT model, count(*), count(DISTINCT stage), sum(prompt_tokens), sum(completion_tokens), "
            "round(avg(latency_ms), 1), min(created_at), max(created_at) FROM calls GROUP BY model ORDER BY 2 DESC"
        ).fetchall()


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One row of `runs`, its stats parsed (`{}` when it has none)."""

    run_id: int
    pipeline: str
    namespace: str
    spec_path: str | None
    spec_hash: str | None
    status: str | None
    pinned: bool
    started_at: Any  # datetime
    finished_at: Any
    seconds: float | None  # finished_at - started_at
    argv: str | None
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """Rows of a table as Python values (DuckDB's), with its columns and how many rows the filters pass."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    total: int
    json_columns: frozenset[str]  # columns of type JSON: their values are JSON text

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def create(table: str) -> str:
    """The CREATE for a table; dry runs (plan, validate) write to DuckDB's `temp` catalog."""
    temp = "TEMP " if table.startswith("temp.") else ""
    return f"CREATE OR REPLACE {temp}TABLE {table}"


def _register_and(con: duckdb.DuckDBPyConnection, data: pa.Table, sql: str) -> None:
    con.register("_batch", data)
    try:
        con.execute(sql)
    finally:
        con.unregister("_batch")


def _nulls_as_strings(table: pa.Table) -> pa.Table:
    """A column that is all null in a batch has Arrow type null; store it as text."""
    for i, field_ in enumerate(table.schema):
        if pa.types.is_null(field_.type):
            table = table.set_column(i, pa.field(field_.name, pa.string()), table.column(i).cast(pa.string()))
    return table
