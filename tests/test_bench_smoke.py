"""The benchmark scripts run end to end on tiny sizes.

Counts only: every script checks its own results (calls made, cache hits, rows, failures)
and fails loudly when they are wrong. Speed is never asserted: these run on shared cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS: dict[str, list[str]] = json.loads((BENCH / "peers" / "pins.json").read_text())  # as bench_peers.py reads them

pytestmark = pytest.mark.http  # every script talks to the stub server on 127.0.0.1


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_throughput_every_contender() -> None:
    proc = run("bench_throughput.py", "--n", "200", "--concurrency", "16")
    summary = proc.stdout.split("best of 1")[1]
    for name in ("sdk_httpx", "sdk_aiohttp", "aiohttp_orjson", "wire_bare", "backend_fast", "backend_sdk",
                 "retort_e2e", "retort_cached", "retort_replayed", "retort_engine"):
        assert f"  {name} " in summary, name


def test_replay_with_reuse_off_then_on() -> None:
    proc = run("bench_replay.py", "--rows", "200", "--repeat", "1")
    assert "replay: 800 cached calls" in proc.stdout  # 4 stages x 200 rows, every one replayed
    assert "rerun with every stage reused" in proc.stdout


def test_throughput_profile(tmp_path: Path) -> None:
    out = tmp_path / "retort.prof"
    run("bench_throughput.py", "--n", "100", "--only", "retort_e2e", "--profile", str(out))
    assert out.stat().st_size > 0


def test_peers_retort_and_bare(tmp_path: Path) -> None:
    """The peers' own venvs are not built here (a PyPI install); retort and the bare loop need none."""
    out = tmp_path / "peers.json"
    run("bench_peers.py", "--n", "200", "--only", "retort", "bare", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert results["retort"]["http_requests"] == [200, 0]  # the rerun is served from the cache
    assert results["bare"]["http_requests"] == [200, None]  # no cache, no rerun
    assert results["bare"]["ratio_to_bare"] == 1.0


@pytest.mark.parametrize("peer", ["curator", "distilabel"])
def test_peer_when_its_venv_exists(peer: str, tmp_path: Path) -> None:
    """Runs only where `python bench/bench_peers.py` has built the peer's venv (never installs here)."""
    venvs = BENCH / ".venvs"
    marker = venvs / peer / "retort-bench-installed.json"
    pins = json.loads(marker.read_text()) if marker.exists() else None
    if pins != PEERS[peer]:  # absent, or built for other pins: bench_peers.py would reach PyPI
        pytest.skip(f"no {peer} venv with {PEERS[peer]} in {venvs}: run bench/bench_peers.py once to build it")
    out = tmp_path / "peers.json"
    run("bench_peers.py", "--n", "100", "--only", peer, "--json", str(out), timeout=600)
    first, rerun = json.loads(out.read_text())["results"][peer]["http_requests"]
    assert first >= 100 and rerun <= 1  # curator sends one probe for rate-limit headers per run


def test_faults_nothing_lost() -> None:
    proc = run("bench_faults.py", "--rows", "40", "--fail-rate", "0.1", "--slow-rate", "0.05", "--slow-seconds", "1",
               "--timeout", "0.5", "--drop-rate", "0.05", "--retries", "1")
    assert proc.stdout.rstrip().endswith("PASS")
    assert "FAIL" not in proc.stdout
