"""`retort view`: a local, read-only web viewer of the store.

The standard library's HTTP server on 127.0.0.1 serves three plain files from `retort/viewer/`
(no build step, nothing fetched from another host) and a small JSON API:

    /api/runs                                   every run, newest first, and whether its tables are kept
    /api/run?run=N                              one run: its stages' counts and tables
    /api/table?run=N&table=T&q=&f=COL=VAL&errors=only|none&sort=COL&desc=1&offset=&limit=
                                                a page of a stage table (run=main: a record table)
    /api/lineage?run=N&table=T&id=ID            one row's path (retort.lineage), prompts and completions
    /api/failures?run=N                         failed calls and rows that did not parse
    /api/reports, /reports/<path>               the comparison reports `retort compare` wrote

Read-only and never in the way: the DuckDB file is opened read-only for one request and closed
after it, so the viewer never keeps `retort run` from starting; while a run holds the file, the API
answers 503 with one line that says so and the page shows it. Every name a request gives (run,
table, column) is checked against DuckDB's catalog before it reaches SQL; every value is a bound
parameter. Requests whose Host is not this machine's loopback address are refused (DNS rebinding).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import mimetypes
import sys
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import duckdb

from retort.cache import Cache
from retort.errors import CacheError, NotFoundError, RetortError, UserError
from retort.lineage import (
    check_table,
    columns,
    kept_runs,
    lineage,
    quote,
    relation,
    run_tables,
    source_table,
    stage_order,
)

STATIC = Path(__file__).parent / "viewer"
RECORDS = ("failures", "metrics", "compare_items", "runs", "calls")  # tables of `main` the viewer may show
PAGE_ROWS = 50
CELL_CHARS = 400  # a table cell's text is cut here; a row's lineage shows it whole
APP_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
              "frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"


class Store:
    """The DuckDB file, opened read-only per request (one at a time: the file is small work)."""

    def __init__(self, db: Path, reports: Path) -> None:
        self.db, self.reports = db, reports
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def open(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            cache = Cache(self.db, read_only=True)
            try:
                yield cache.con
            finally:
                cache.con.close()

    def report_files(self) -> dict[str, Path]:
        """Comparison reports under the reports folder, by their path relative to it."""
        if not self.reports.is_dir():
            return {}
        found = sorted(self.reports.glob("**/report.html"), key=lambda p: p.stat().st_mtime, reverse=True)
        return {p.relative_to(self.reports).as_posix(): p for p in found}


# ---------------------------------------------------------------------------- the API


def _plain(value: Any) -> Any:
    """A DuckDB value as JSON can carry it."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (dt.date, dt.datetime, dt.time, dt.timedelta, decimal.Decimal)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CELL_CHARS:
        return value[:CELL_CHARS] + "…"
    if isinstance(value, list) and len(value) > 16:  # an embedding: its head is enough in a table
        return [*value[:16], f"… {len(value)} values"]
    return value


def _int(params: dict[str, list[str]], name: str, default: int | None = None, *, low: int = 0,
         high: int = 1 << 31) -> int:
    raw = params.get(name, [None])[0]
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"missing parameter {name!r}")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"parameter {name!r} must be a whole number, not {raw!r}") from None
    return max(low, min(high, value))


def _one(params: dict[str, list[str]], name: str) -> str:
    value = params.get(name, [""])[0]
    if not value:
        raise UserError(f"missing parameter {name!r}")
    return value


def api_runs(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> dict[str, Any]:
    kept = kept_runs(con)
    rows = con.execute("SELECT run_id, pipeline, spec_path, status, started_at, finished_at, "
                       "epoch(finished_at - started_at), argv, stats FROM runs ORDER BY run_id DESC").fetchall()
    failures = dict(con.execute("SELECT run_id, count(*) FROM failures GROUP BY run_id").fetchall())
    out = []
    for run_id, pipeline, spec, status, started, finished, seconds, argv, stats in rows:
        record = json.loads(stats) if isinstance(stats, str) else (stats or {})
        out.append({"run": run_id, "pipeline": pipeline, "spec": spec, "status": status, "started": started,
                    "finished": finished, "seconds": None if seconds is None else round(float(seconds), 2),
                    "argv": argv, "calls_made": record.get("calls_made"), "cache_hits": record.get("cache_hits"),
                    "failures": failures.get(run_id, 0), "kept": run_id in kept,
                    "stages": [s.get("name") for s in record.get("stages", []) if isinstance(s, dict)]})
    records = _record_tables(con)
    return {"runs": out, "records": records}


def _record_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    found = {name for (name,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
        "AND database_name = current_database()").fetchall()}
    return [name for name in RECORDS if name in found]


def api_run(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> dict[str, Any]:
    run = _int(params, "run")
    rows = con.execute("SELECT pipeline, spec_path, status, started_at, finished_at, argv, stats FROM runs "
                       "WHERE run_id = ?", [run]).fetchall()
    if not rows:
        raise NotFoundError(f"no run {run}")
    pipeline, spec, status, started, finished, argv, stats = rows[0]
    record = json.loads(stats) if isinstance(stats, str) else (stats or {})
    tables = []
    kept = run in kept_runs(con)
    if kept:
        for name in run_tables(con, run):  # names from the catalog
            rel = relation(run, name)
            cols = columns(con, rel)
            errors = "count(_error)" if "_error" in cols else "0"
            count, bad = con.execute(f"SELECT count(*), {errors} FROM {rel}").fetchall()[0]
            tables.append({"name": name, "rows": count, "errors": bad, "columns": cols})
    failures = con.execute("SELECT count(*) FROM failures WHERE run_id = ?", [run]).fetchall()[0][0]
    return {"run": run, "pipeline": pipeline, "spec": spec, "status": status, "started": started,
            "finished": finished, "argv": argv, "order": stage_order(con, run), "tables": tables,
            "failures": failures, "kept": kept,
            "stages": [s for s in record.get("stages", []) if isinstance(s, dict)],
            "totals": {k: v for k, v in record.items() if not isinstance(v, (dict, list))}}


def _relation(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> tuple[str, str]:
    """The table a request names, as a checked SQL relation: a kept run's table, or a record of main."""
    table = _one(params, "table")
    if params.get("run", [""])[0] == "main":
        if table not in _record_tables(con):
            raise NotFoundError(f"no record table {table!r} (records: {', '.join(_record_tables(con))})")
        return f"main.{quote(table)}", table
    return check_table(con, _int(params, "run"), table), table


def api_table(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> dict[str, Any]:
    rel, table = _relation(con, params)
    cols = columns(con, rel)
    where: list[str] = []
    values: list[Any] = []
    q = params.get("q", [""])[0].strip()
    if q:  # a search: any column's text contains it, case-insensitively
        where.append("(" + " OR ".join(f"contains(lower(CAST({quote(c)} AS VARCHAR)), ?)" for c in cols) + ")")
        values += [q.lower()] * len(cols)
    for item in params.get("f", []):
        column, sep, value = item.partition("=")
        if not sep or column not in cols:
            raise UserError(f"filter {item!r}: expected COLUMN=VALUE with a column of {table}")
        if value == "":
            where.append(f"{quote(column)} IS NULL")
        else:
            where.append(f"CAST({quote(column)} AS VARCHAR) = ?")
            values.append(value)
    errors = params.get("errors", [""])[0]
    if errors and "_error" in cols:
        where.append("_error IS NOT NULL" if errors == "only" else "_error IS NULL")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    sort = params.get("sort", [""])[0]
    if sort and sort not in cols:
        raise UserError(f"sort {sort!r}: {table} has no such column")
    order = f" ORDER BY {quote(sort)} {'DESC' if params.get('desc', [''])[0] == '1' else 'ASC'} NULLS LAST" \
        if sort else ""
    limit = _int(params, "limit", PAGE_ROWS, low=1, high=500)
    offset = _int(params, "offset", 0)
    total = con.execute(f"SELECT count(*) FROM {rel}{clause}", values).fetchall()[0][0]
    rows = con.execute(f"SELECT * FROM {rel}{clause}{order} LIMIT ? OFFSET ?", [*values, limit, offset]).fetchall()
    return {"table": table, "relation": rel, "columns": cols, "total": total, "offset": offset, "limit": limit,
            "rows": [[_cut(_plain(v)) for v in r] for r in rows]}


def api_lineage(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> dict[str, Any]:
    found = lineage(con, _int(params, "run"), _one(params, "table"), _one(params, "id"))
    return _plain(found.to_dict())  # type: ignore[no-any-return]


def api_failures(con: duckdb.DuckDBPyConnection, params: dict[str, list[str]]) -> dict[str, Any]:
    """Calls that failed after their retries (from `failures`) and rows whose completion did not parse."""
    run = _int(params, "run")
    calls = con.execute("SELECT stage, row_id, call_key, error, status, created_at FROM failures "
                        "WHERE run_id = ? ORDER BY created_at, stage, row_id LIMIT 500", [run]).fetchall()
    kept = run in kept_runs(con)
    sources = {(stage, row): source_table(con, run, stage, row) if kept and row is not None else None
               for stage, row, *_ in calls}
    parse = []
    if kept:
        for name in run_tables(con, run):
            rel = relation(run, name)
            if "_error" not in columns(con, rel):
                continue
            for row_id, error, raw in con.execute(f"SELECT CAST(_id AS VARCHAR), _error, _raw FROM {rel} "
                                                  "WHERE _error IS NOT NULL LIMIT 200").fetchall():
                parse.append({"table": name, "id": row_id, "error": error, "raw": _cut(raw)})
    return {"run": run, "calls": [{"stage": s, "row": r, "source": sources[(s, r)], "key": k, "error": e, "status": st,
                                   "at": _plain(at)} for s, r, k, e, st, at in calls], "parse": parse}


def api_reports(store: Store) -> dict[str, Any]:
    reports = []
    for name, path in store.report_files().items():
        summary = path.with_name("report.json")
        title = None
        if summary.is_file():
            with contextlib.suppress(ValueError, OSError):
                title = json.loads(summary.read_text(encoding="utf-8")).get("title")
        reports.append({"path": name, "title": title or path.parent.name,
                        "modified": dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")})
    return {"folder": str(store.reports), "reports": reports}


API: dict[str, Callable[[duckdb.DuckDBPyConnection, dict[str, list[str]]], dict[str, Any]]] = {
    "/api/runs": api_runs, "/api/run": api_run, "/api/table": api_table, "/api/lineage": api_lineage,
    "/api/failures": api_failures,
}


# ---------------------------------------------------------------------------- HTTP


def _handler(store: Store, port: int) -> type[BaseHTTPRequestHandler]:
    static = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # the only files served from the package
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    class Handler(BaseHTTPRequestHandler):
        server_version = "retort-view"

        def log_message(self, format: str, *args: Any) -> None:  # a quiet terminal: errors only
            pass

        def do_GET(self) -> None:
            if self.headers.get("Host") not in hosts:
                self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain")
                return
            url = urlsplit(self.path)
            path = unquote(url.path)
            if path in ("/", "/index.html"):
                self._file(static["index.html"], APP_POLICY)
            elif path.startswith("/static/") and path[8:] in static:
                self._file(static[path[8:]], APP_POLICY)
            elif path.startswith("/reports/"):
                report = store.report_files().get(path[9:])
                if report is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no report {path[9:]!r}"})
                else:
                    self._file(report, REPORT_POLICY)
            elif path == "/api/reports":
                self._json(HTTPStatus.OK, api_reports(store))
            elif path in API:
                self._api(API[path], parse_qs(url.query))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

        def _api(self, fn: Callable[..., dict[str, Any]], params: dict[str, list[str]]) -> None:
            try:
                with store.open() as con:
                    body = fn(con, params)
                self._json(HTTPStatus.OK, body)
            except CacheError as exc:  # another process holds the file: say so, try again next time
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            except RetortError as exc:
                status = HTTPStatus.NOT_FOUND if isinstance(exc, NotFoundError) else HTTPStatus.BAD_REQUEST
                self._json(status, {"error": str(exc)})
            except duckdb.Error as exc:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

        def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body, default=str, ensure_ascii=False).encode()
            self._send(status, data, "application/json; charset=utf-8", APP_POLICY)

        def _file(self, path: Path, policy: str) -> None:
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            charset = "; charset=utf-8" if kind.startswith("text/") or kind.endswith("javascript") else ""
            self._send(HTTPStatus.OK, path.read_bytes(), kind + charset, policy)

        def _send(self, status: HTTPStatus, data: bytes, kind: str, policy: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if policy:
                self.send_header("Content-Security-Policy", policy)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def serve(db: Path, reports: Path, *, port: int = 8765) -> int:
    """Serve the viewer on 127.0.0.1 until Ctrl-C. Fails first, in one line, if the store cannot be read."""
    store = Store(db, reports)
    with store.open():  # no file, a file another process holds, or not DuckDB: one clear line now
        pass
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(store, port))
    except OSError as exc:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another with --port "
                        "(0: any free port)") from None
    server.daemon_threads = True
    bound = server.server_address[1]
    server.RequestHandlerClass = _handler(store, bound)
    print(f"retort view: http://127.0.0.1:{bound}/ (read-only on {db}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
