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
table, column) is checked against DuckDB's catalog before it reaches the store's read methods
(retort/cache.py), which bind every value. Requests whose Host is not this machine's loopback address
are refused (DNS rebinding).
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

from retort.cache import Cache, quote
from retort.errors import CacheError, NotFoundError, RetortError, UserError
from retort.lineage import check_table, lineage, relation, run_tables, source_table, stage_order

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
    def open(self) -> Iterator[Cache]:
        with self._lock:
            cache = Cache(self.db, read_only=True)
            try:
                yield cache
            finally:
                cache.close()

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


def api_runs(cache: Cache, params: dict[str, list[str]]) -> dict[str, Any]:
    kept = cache.unpruned_runs()
    failures = cache.failure_counts()
    out = []
    for r in cache.runs():
        out.append({"run": r.run_id, "pipeline": r.pipeline, "spec": r.spec_path, "status": r.status,
                    "started": r.started_at, "finished": r.finished_at,
                    "seconds": None if r.seconds is None else round(float(r.seconds), 2), "argv": r.argv,
                    "calls_made": r.stats.get("calls_made"), "cache_hits": r.stats.get("cache_hits"),
                    "failures": failures.get(r.run_id, 0), "kept": r.run_id in kept,
                    "stages": [s.get("name") for s in r.stats.get("stages", []) if isinstance(s, dict)]})
    return {"runs": out, "records": _record_tables(cache)}


def _record_tables(cache: Cache) -> list[str]:
    found = {name for name, kind in cache.tables("main").items() if kind == "table"}
    return [name for name in RECORDS if name in found]


def api_run(cache: Cache, params: dict[str, list[str]]) -> dict[str, Any]:
    run = _int(params, "run")
    record = cache.run(run)
    if record is None:
        raise NotFoundError(f"no run {run}")
    tables = []
    kept = run in cache.unpruned_runs()
    if kept:
        for name in run_tables(cache, run):  # names from the catalog
            rel = relation(run, name)
            cols = cache.columns(rel)
            bad = cache.page(rel, errors=True, limit=0).total if "_error" in cols else 0
            tables.append({"name": name, "rows": cache.count(rel), "errors": bad, "columns": cols})
    return {"run": run, "pipeline": record.pipeline, "spec": record.spec_path, "status": record.status,
            "started": record.started_at, "finished": record.finished_at, "argv": record.argv,
            "order": stage_order(cache, run), "tables": tables,
            "failures": cache.failure_counts().get(run, 0), "kept": kept,
            "stages": [s for s in record.stats.get("stages", []) if isinstance(s, dict)],
            "totals": {k: v for k, v in record.stats.items() if not isinstance(v, (dict, list))}}


def _relation(cache: Cache, params: dict[str, list[str]]) -> tuple[str, str]:
    """The table a request names, as a checked SQL relation: a kept run's table, or a record of main."""
    table = _one(params, "table")
    if params.get("run", [""])[0] == "main":
        if table not in _record_tables(cache):
            raise NotFoundError(f"no record table {table!r} (records: {', '.join(_record_tables(cache))})")
        return f"main.{quote(table)}", table
    return check_table(cache, _int(params, "run"), table), table


def api_table(cache: Cache, params: dict[str, list[str]]) -> dict[str, Any]:
    rel, table = _relation(cache, params)
    cols = cache.columns(rel)
    equals: list[tuple[str, str | None]] = []
    for item in params.get("f", []):
        column, sep, value = item.partition("=")
        if not sep or column not in cols:
            raise UserError(f"filter {item!r}: expected COLUMN=VALUE with a column of {table}")
        equals.append((column, value or None))  # `COLUMN=`: the column is NULL
    errors = params.get("errors", [""])[0]
    sort = params.get("sort", [""])[0]
    if sort and sort not in cols:
        raise UserError(f"sort {sort!r}: {table} has no such column")
    limit = _int(params, "limit", PAGE_ROWS, low=1, high=500)
    offset = _int(params, "offset", 0)
    page = cache.page(rel, search=params.get("q", [""])[0].strip() or None, equals=equals,
                      errors=(errors == "only") if errors and "_error" in cols else None, sort=sort or None,
                      descending=params.get("desc", [""])[0] == "1", limit=limit, offset=offset)
    return {"table": table, "relation": rel, "columns": cols, "total": page.total, "offset": offset, "limit": limit,
            "rows": [[_cut(_plain(v)) for v in r] for r in page.rows]}


def api_lineage(cache: Cache, params: dict[str, list[str]]) -> dict[str, Any]:
    found = lineage(cache, _int(params, "run"), _one(params, "table"), _one(params, "id"))
    return _plain(found.to_dict())  # type: ignore[no-any-return]


def api_failures(cache: Cache, params: dict[str, list[str]]) -> dict[str, Any]:
    """Calls that failed after their retries (from `failures`) and rows whose completion did not parse."""
    run = _int(params, "run")
    calls = cache.failures(run, limit=500)
    kept = run in cache.unpruned_runs()
    sources = {(f["stage"], f["row_id"]): source_table(cache, run, f["stage"], f["row_id"])
               if kept and f["row_id"] is not None else None for f in calls}
    parse = []
    if kept:
        for name in run_tables(cache, run):
            rel = relation(run, name)
            if "_error" not in cache.columns(rel):
                continue
            for row in cache.page(rel, errors=True, limit=200).records():
                parse.append({"table": name, "id": None if row.get("_id") is None else str(row["_id"]),
                              "error": row["_error"], "raw": _cut(row.get("_raw"))})
    return {"run": run, "calls": [{"stage": f["stage"], "row": f["row_id"],
                                   "source": sources[(f["stage"], f["row_id"])], "key": f["call_key"],
                                   "error": f["error"], "status": f["status"], "at": _plain(f["created_at"])}
                                  for f in calls], "parse": parse}


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


API: dict[str, Callable[[Cache, dict[str, list[str]]], dict[str, Any]]] = {
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
                with store.open() as cache:
                    body = fn(cache, params)
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
