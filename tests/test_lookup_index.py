"""The look-up's key index (retort.cache._KeyIndex): a speed-up that must never hide a call. Each test
puts calls in the ledger in a way the index could miss (committed after it was built, by another
connection, past its rowid width, with shared key prefixes, with its upkeep failing) and counts what
the look-up finds and what a rerun pays."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

import retort.cache as store
from retort.backends.scripted import ScriptedBackend
from retort.cache import Cache
from retort.runner import Runner
from retort.spec import load_pipeline
from retort.workspace import Workspace


def key(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def add(cache: Cache, keys: list[str]) -> None:
    for k in keys:
        cache.add_call(k, "m", b"{}", 0, 0, f"text of {k}", "stop", 1, 2, 1.0, 1, "s")
    cache.flush()


def test_calls_committed_after_the_index_are_found(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "db.duckdb")
    first, later = [key(i) for i in range(500)], [key(i) for i in range(500, 800)]
    add(cache, first)
    assert len(cache.lookup(first[:10])) == 10
    assert cache._keys is not None and cache._keys.covered == 500  # built from the 500 committed calls
    add(cache, later)  # committed after: not in the index, read from the ledger's tail
    found = cache.lookup(first + later + [key("absent")])
    assert len(found) == 800 and found[later[-1]] == (f"text of {later[-1]}", 1, 2)
    assert cache._keys.covered == 500  # the tail was read, the index left as it was
    cache.close()


def test_the_index_takes_in_the_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "INDEX_TAIL", 100)
    cache = Cache(tmp_path / "db.duckdb")
    keys = [key(i) for i in range(1000)]
    add(cache, keys[:300])
    cache.lookup(keys[:1])
    for start in range(300, 1000, 150):
        add(cache, keys[start:start + 150])
        assert len(cache.lookup(keys)) == min(start + 150, 1000)
    assert cache._keys is not None and cache._keys.covered >= 850 and len(cache._keys.values) == cache._keys.covered
    cache.close()


def test_a_ledger_that_outgrows_the_rowid_bits_is_reindexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "INDEX_MIN_BITS", 4)  # 16 rowids
    monkeypatch.setattr(store, "INDEX_TAIL", 1)
    cache = Cache(tmp_path / "db.duckdb")
    keys = [key(i) for i in range(300)]
    add(cache, keys[:10])
    cache.lookup(keys[:1])
    assert cache._keys is not None and cache._keys.bits == 6  # room for 4 times the 10 calls
    add(cache, keys[10:])
    assert len(cache.lookup(keys)) == 300
    assert cache._keys.bits == 11 and cache._keys.covered == 300
    cache.close()


def test_calls_written_by_another_connection_are_found(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "db.duckdb")
    add(cache, [key(i) for i in range(100)])
    cache.lookup([key(0)])
    other = cache.con.cursor()  # not through this Cache: its counters never hear of these
    other.execute(f"INSERT INTO calls (key, k, text) SELECT key, {store.KEY_PREFIX_SQL}, 'other' "
                  "FROM (SELECT sha256(i::VARCHAR) AS key FROM range(100, 200) t(i))")
    other.close()
    found = cache.lookup([key(i) for i in range(200)])
    assert len(found) == 200 and found[key(150)][0] == "other"
    cache.close()


def test_keys_that_share_a_prefix_are_told_apart(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "db.duckdb")
    prefix = key("shared")[:15]
    twins = [prefix + key(f"twin {i}")[:49] for i in range(3)]
    add(cache, [key(i) for i in range(50)] + twins[:2])
    found = cache.lookup(twins)
    assert cache._keys is not None
    assert found == {twins[0]: (f"text of {twins[0]}", 1, 2), twins[1]: (f"text of {twins[1]}", 1, 2)}
    cache.close()


def test_a_failing_index_falls_back_to_reading_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger commits, then the index's upkeep fails (a fault injected after the commit): the
    look-up reads `calls` whole and finds every call."""
    cache = Cache(tmp_path / "db.duckdb")
    keys = [key(i) for i in range(400)]
    add(cache, keys[:200])
    cache.lookup(keys[:1])
    monkeypatch.setattr(store, "INDEX_TAIL", 1)
    add(cache, keys[200:])  # committed; the next look-up extends the index, and that fails

    def broken(self: store._KeyIndex, con: object) -> None:
        raise MemoryError("injected")

    monkeypatch.setattr(store._KeyIndex, "extend", broken)
    found = cache.lookup(keys)
    assert len(found) == 400 and cache._keys is None
    cache.close()


PIPELINE = """
input: {path: data/rows.jsonl}
stages:
  - {name: a, template: "First {{ text }}", samples: 2}
  - {name: b, from: a, template: "Then {{ a }}"}
"""


def test_a_rerun_pays_no_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call of a first run is found by a rerun in a new process (a new index built from the
    ledger), also while the index takes in calls committed during the run."""
    monkeypatch.setattr(store, "INDEX_TAIL", 50)
    for folder in ("pipelines", "data"):
        (tmp_path / folder).mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(300)))
    (tmp_path / "pipelines" / "p.yaml").write_text(PIPELINE)  # a: 600 calls, b: 300 distinct prompts
    pipeline, source = load_pipeline(tmp_path / "pipelines" / "p.yaml")
    paid: list[int] = []

    def run() -> int:
        backend = ScriptedBackend(function=lambda request: "answer " + request.messages[-1]["content"])
        cache = Cache(tmp_path / "db.duckdb")
        try:
            runner = Runner(Workspace(tmp_path), pipeline, source, cache, reuse=False,
                            backend_factory=lambda name, config: backend)
            result = asyncio.run(runner.execute())
            assert result.status == "ok"
        finally:
            cache.close()
        paid.append(result.totals()["calls_made"])
        assert (len(backend.calls) == 0) == (paid[-1] == 0)  # requests sent: none on a rerun
        return result.totals()["cache_hits"]

    first = run()  # b's two samples of a row share a prompt: one call, then one hit
    assert paid == [900] and first == 300
    assert run() == 1200 and paid == [900, 0]


def test_every_row_of_a_wanted_prefix_is_in_the_ranges_read() -> None:
    """The index's two-level search against a brute-force one: rows of shared prefixes, block edges,
    keys past the last value and before the first."""
    import re

    import numpy as np

    rng = np.random.default_rng(1)
    prefixes = rng.integers(0, 2**60, 5000)
    prefixes[100:400] = prefixes[0]  # 301 rows share one prefix, across several blocks
    prefixes[-1], prefixes[-2] = 0, 2**60 - 1
    index = store._KeyIndex()
    index.bits = 13
    index.values = np.sort(((prefixes >> 10) << 13) | np.arange(5000))
    index.fence, index.covered = index.values[::store.FENCE].copy(), 5000
    wanted = np.concatenate([prefixes[[0, 2500, 4998, 4999]], rng.integers(0, 2**60, 500)])  # and 500 misses
    ranges = [(int(a), int(b)) for a, b in re.findall(r"rowid BETWEEN (\d+) AND (\d+)", index.rows(wanted))]
    assert ranges == [(0, 399), (2500, 2500), (4998, 4999)]  # 0 and 100-399 share a prefix
    everything = np.concatenate([prefixes[::7], rng.integers(0, 2**60, 500)])
    ranges = [(int(a), int(b)) for a, b in re.findall(r"rowid BETWEEN (\d+) AND (\d+)", index.rows(everything))]
    assert all(any(a <= r <= b for a, b in ranges) for r in [*range(0, 5000, 7), *range(100, 400)])
