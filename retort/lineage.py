"""One row's path through a run: the input row and, for each stage on the way, its prompt and completion.

Every row a prompt stage writes carries its lineage in columns:

    _id      "<parent _id>.<sample>"; input rows are "0", "1", ...
    _parent  the `_id` of the row it was made from, in the stage's `from` table
    _sample  which of the stage's samples it is
    _call    its key in `calls`, whose `request` holds the rendered messages and `text` the completion
    _raw     the completion as the model wrote it;  _error  why it did not parse (NULL when it did)

The walk reads only a run's own schema (`run_<N>`, where the runner writes its stage tables) and the
`runs` table, never main's views, so it keeps working however the latest tables are named. The parent
of a row is looked up among the tables before its stage, nearest first; when two of them hold the same
`_id` (two stages reading the same table), the one whose columns the row carries wins. A SQL stage that
passes rows through keeps their lineage columns: the stage that made the call is put before it.

`retort show --lineage` and `retort view` both call `lineage()`. It reads through the store's read
methods (retort/cache.py); every table name it hands them comes from DuckDB's catalog.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from retort.cache import quote
from retort.errors import NotFoundError

if TYPE_CHECKING:
    from retort.cache import Cache, Page

LINEAGE_COLUMNS = ("_id", "_parent", "_sample", "_call", "_raw", "_error")


def relation(run_id: int, table: str) -> str:
    return f"{quote(f'run_{int(run_id)}')}.{quote(table)}"


# ---------------------------------------------------------------------------- the catalog of runs


def stage_order(cache: Cache, run_id: int) -> list[str]:
    """The run's stages in pipeline order, from its record (`input` first)."""
    record = cache.run(run_id)
    stages = record.stats.get("stages", []) if record is not None else []
    return ["input", *(s["name"] for s in stages if isinstance(s, dict) and "name" in s)]


def run_tables(cache: Cache, run_id: int) -> list[str]:
    """The tables of run `run_id` (stage tables, `input`, and the `<stage>__<suffix>` tables stages keep),
    in pipeline order; tables the run record does not name come last, by name."""
    found = set(cache.tables(f"run_{int(run_id)}"))
    order = stage_order(cache, run_id)
    rank = {name: i for i, name in enumerate(order)}

    def key(name: str) -> tuple[int, str]:
        base = name.split("__")[0]
        return (rank.get(name, rank.get(base, len(order))), name)

    return sorted(found, key=key)


def find_run(cache: Cache, stage: str) -> int:
    """The newest run that kept a table named `stage`, runs that finished `ok` first."""
    ranked = sorted(cache.runs_that_made(stage), key=lambda made: made[1] != "ok")  # stable: newest first in each
    if ranked:
        return ranked[0][0]
    raise NotFoundError(f"no kept run has a table {stage!r}; `retort list` shows the stage tables")


def check_table(cache: Cache, run_id: int, table: str) -> str:
    """`run_<N>."table"` if the run kept that table, else a NotFoundError naming the ones it has."""
    if run_id not in cache.unpruned_runs():
        raise NotFoundError(f"run {run_id} has no tables (it does not exist, or its tables were pruned)")
    tables = run_tables(cache, run_id)
    if table not in tables:
        raise NotFoundError(f"run {run_id} has no table {table!r} (tables: {', '.join(tables)})")
    return relation(run_id, table)


# ---------------------------------------------------------------------------- the walk


@dataclass
class Call:
    """A cached model call: the rendered messages and the completion."""

    key: str
    stage: str | None
    model: str | None
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    run_id: int | None


@dataclass
class Step:
    """One table's row on the path; `call` is None for the input row and for rows no model made."""

    stage: str
    row_id: str
    row: dict[str, Any]
    call: Call | None = None
    error: str | None = None
    note: str | None = None  # what is unusual about the step
    passes: str | None = None  # a SQL stage's row passed through from this stage (its call is shown there)


@dataclass
class Lineage:
    run_id: int
    stage: str
    row_id: str
    steps: list[Step]  # the input row (or the first row with no parent) first, the asked-for row last
    children: list[tuple[str, str]] = field(default_factory=list)  # (stage, _id) of rows made from it
    duplicates: int = 0  # other rows of the asked-for table with the same _id (a fan-out that kept ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fetch_row(cache: Cache, rel: str, row_id: str) -> tuple[dict[str, Any] | None, int]:
    """The first row of `rel` whose `_id` is `row_id`, and how many there are."""
    page = cache.page(rel, row_id=row_id, limit=1)
    return (page.records()[0] if page.rows else None), page.total


def fetch_call(cache: Cache, key: str) -> Call | None:
    found = cache.call(key)
    if found is None:
        return None
    request, model = found["request"], found["model"]
    try:
        req = json.loads(request) if isinstance(request, str) else dict(request or {})
    except ValueError:
        req = {"messages": [{"role": "?", "content": str(request)}]}
    return Call(key=found["key"], stage=found["stage"], model=model or req.get("model"),
                messages=list(req.get("messages") or []),
                params={k: v for k, v in req.items() if k not in ("messages", "model")}, text=found["text"],
                finish_reason=found["finish_reason"], prompt_tokens=found["prompt_tokens"],
                completion_tokens=found["completion_tokens"], latency_ms=found["latency_ms"],
                run_id=found["run_id"])


class _Walk:
    """Caches a run's table list and columns while one lineage is walked."""

    def __init__(self, cache: Cache, run_id: int) -> None:
        self.cache, self.run_id = cache, run_id
        self.tables = run_tables(cache, run_id)
        self._columns: dict[str, list[str]] = {}

    def columns(self, table: str) -> list[str]:
        if table not in self._columns:
            self._columns[table] = self.cache.columns(relation(self.run_id, table))
        return self._columns[table]

    def step(self, table: str, row: dict[str, Any], note: str | None = None) -> Step:
        key = row.get("_call")
        call = fetch_call(self.cache, str(key)) if key else None
        error = row.get("_error")
        return Step(stage=table, row_id=str(row.get("_id")), row=row, call=call,
                    error=None if error is None else str(error), note=note)

    def parent(self, table: str, row: dict[str, Any], before: list[str]) -> tuple[str, dict[str, Any]] | None:
        """The row `row` was made from, in one of the tables `before` (nearest first)."""
        parent_id = str(row["_parent"])
        carried = set(self.columns(table))
        matches = []
        for candidate in reversed(before):
            if "_id" not in self.columns(candidate):
                continue
            found, _ = fetch_row(self.cache, relation(self.run_id, candidate), parent_id)
            if found is not None:
                matches.append((candidate, found))
        for candidate, found in matches:  # the table whose own columns the row carries
            own = {c for c in self.columns(candidate) if c not in LINEAGE_COLUMNS}
            if own <= carried:
                return candidate, found
        return matches[0] if matches else None


def lineage(cache: Cache, run_id: int, stage: str, row_id: str) -> Lineage:
    """The path of row `row_id` of table `stage` in run `run_id`, from the input row to it."""
    rel = check_table(cache, run_id, stage)
    walk = _Walk(cache, run_id)
    if "_id" not in walk.columns(stage):
        raise NotFoundError(f"table {stage!r} of run {run_id} has no _id column, so its rows have no lineage")
    row, count = fetch_row(cache, rel, row_id)
    if row is None:
        sample = _ids(cache.page(rel, limit=5))
        raise NotFoundError(f"table {stage!r} of run {run_id} has no row with _id {row_id!r}"
                            f" (ids look like: {', '.join(sample) or 'the table is empty'})")
    steps = [walk.step(stage, row)]
    table = stage
    position = walk.tables.index(stage)
    while position > 0:
        before = walk.tables[:position]
        current = steps[-1]
        caller = current.call.stage if current.call else None
        if caller and caller != table and caller in before:
            # a SQL stage passed this row through unchanged: the stage that made the call comes first
            same, _ = fetch_row(cache, relation(run_id, caller), current.row_id)
            if same is not None and same.get("_call") == current.row.get("_call"):
                current.call, current.error, current.passes = None, None, caller  # shown once, on its maker
                steps.append(walk.step(caller, same))
                table, position = caller, walk.tables.index(caller)
                continue
        if current.row.get("_parent") is None:
            break
        found = walk.parent(table, current.row, before)
        if found is None:
            steps[-1].note = f"its parent {current.row['_parent']!r} is in no earlier table of run {run_id}"
            break
        table, parent = found
        steps.append(walk.step(table, parent))
        position = walk.tables.index(table)
    steps.reverse()
    return Lineage(run_id=run_id, stage=stage, row_id=row_id, steps=steps,
                   children=children(walk, stage, row_id), duplicates=count - 1)


def children(walk: _Walk, stage: str, row_id: str, limit: int = 50) -> list[tuple[str, str]]:
    """Rows of later tables made from this one (`_parent` = its `_id`), up to `limit`."""
    out: list[tuple[str, str]] = []
    later = walk.tables[walk.tables.index(stage) + 1:]
    for table in later:
        if "_parent" not in walk.columns(table) or len(out) >= limit:
            continue
        made = walk.cache.page(relation(walk.run_id, table), equals=[("_parent", row_id)], limit=limit - len(out))
        out.extend((table, i) for i in _ids(made))
    return out


def _ids(page: Page) -> list[Any]:
    """The rows' `_id`s as text (as DuckDB casts them)."""
    return [None if r["_id"] is None else str(r["_id"]) for r in page.records()]


def source_table(cache: Cache, run_id: int, stage: str, row_id: str) -> str | None:
    """The nearest table before `stage` in run `run_id` holding a row `row_id`: where the row a failed call
    of `stage` was made from lives (`failures.row_id`), so its lineage can be shown."""
    tables = run_tables(cache, run_id)
    before = tables[: tables.index(stage)] if stage in tables else tables
    for table in reversed(before):
        rel = relation(run_id, table)
        if "_id" in cache.columns(rel) and fetch_row(cache, rel, row_id)[0] is not None:
            return table
    return None
