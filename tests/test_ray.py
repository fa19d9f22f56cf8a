"""`retort run --on ray`: the checks of a local run, on a real Ray cluster on 127.0.0.1.

One cluster for the module (`ray start --head --num-cpus 2`, started once: a worker process
costs seconds here). The CLI runs connect to it with `--ray-address`; in-process runs connect
the test process to it. The cluster's workers import this checkout (PYTHONPATH) and the vLLM
stand-in (tests/vllm_standin), never a real vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from bench.stub_server import launch
from tests.conftest import ROOT, db_rows, run_cli

pytest.importorskip("ray")  # in the `test` extra: CI always has it
STANDIN = ROOT / "tests" / "vllm_standin"
# Ray binds its head, its workers and each driver to 127.0.0.1 only (its single-machine mode, read when
# `ray` is imported); without it Ray 2.60 listens on every interface. Every Ray process here gets it.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head on 127.0.0.1 with 2 CPUs; its address. Stopped (its whole process group) at the end."""
    port = _free_port()
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(STANDIN)]),
           "RETORT_ALLOWED_BACKENDS": "scripted,openai,vllm", "RAY_USAGE_STATS_ENABLED": "0"}
    beside = Path(sys.executable).parent / "ray"  # the ray of this interpreter, whether or not its bin is on PATH
    ray = str(beside) if beside.exists() else "ray"
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # the GCS port answers once the head is up
            assert proc.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS listens
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def stub() -> Iterator[str]:
    proc, url = launch()
    yield url
    proc.kill()
    proc.wait()


def served(url: str) -> int:
    """Chat completion requests the stub server has answered so far."""
    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as reply:
        return int(json.loads(reply.read())["requests"])


def settled(url: str) -> int:
    """The server's count once nothing more arrives (a dead driver's workers may still be finishing)."""
    last = served(url)
    for _ in range(60):
        time.sleep(1.0)
        now = served(url)
        if now == last:
            return now
        last = now
    return last


def write(ws: Path, rows: int, model: str, stages: str) -> None:
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (ws / folder).mkdir(parents=True, exist_ok=True)
    (ws / "data" / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"item {i}", "n": i})
                                                      for i in range(rows)))
    (ws / "pipelines" / "p.yaml").write_text(f"input: {{path: data/rows.jsonl}}\nmodels:\n  default: {model}\n"
                                             f"stages:\n{stages}")


def run(ws: Path, *args: str, on: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`retort run p ARGS` (with `--on ray --ray-address ADDR` when `on` is an address): its JSON summary."""
    where = ["--on", "ray", "--ray-address", on] if on else []
    proc = run_cli("run", "p", "--json", "-q", *where, *args, cwd=ws, env={**RAY_ENV, **(env or {})}, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    summary["exit"] = proc.returncode
    summary["stderr"] = proc.stderr
    return summary


# --- install -----------------------------------------------------------------------------------------


def test_without_ray_the_run_says_which_extra_to_install(tmp_path: Path) -> None:
    write(tmp_path, 3, "{backend: scripted, function: 'retort.backends.scripted:echo'}",
          "  - {name: ask, template: '{{ text }}'}\n")
    fake = tmp_path / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    proc = run_cli("run", "p", "--on", "ray", "-q", cwd=tmp_path, env={"PYTHONPATH": str(fake)})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: --on ray needs Ray, which is not installed: pip install 'retort[ray]'"], proc.stderr
    assert db_rows(tmp_path, "SELECT count(*) FROM runs") == [(0,)]  # stopped in pre-flight: no run recorded
    local = run(tmp_path)  # the same spec runs locally without Ray
    assert (local["exit"], local["calls_made"]) == (0, 3)


# --- the checks of a local run --------------------------------------------------------------------------


@pytest.mark.http
def test_samples_2_to_4_makes_exactly_the_new_calls_on_ray_and_locally(tmp_path: Path, cluster: str,
                                                                        stub: str) -> None:
    """Started on Ray, continued locally, continued on Ray: each run makes exactly the calls the others
    have not made, counted at the server (one request per row carries the missing samples as `n`)."""
    write(tmp_path, 40, f"{{backend: openai, model: stub, base_url: '{stub}'}}",
          "  - {name: ask, template: 'Tell me about {{ text }}', samples: 2}\n")
    begun = served(stub)
    first = run(tmp_path, on=cluster)
    assert (first["exit"], first["calls_made"], first["cache_hits"]) == (0, 80, 0), first["stderr"]
    assert served(stub) - begun == 40
    begun = served(stub)
    second = run(tmp_path, "--set", "stages.ask.samples=4")  # locally
    assert (second["calls_made"], second["cache_hits"], served(stub) - begun) == (80, 80, 40)
    begun = served(stub)
    third = run(tmp_path, "--set", "stages.ask.samples=6", on=cluster)
    assert (third["exit"], third["calls_made"], third["cache_hits"]) == (0, 80, 160), third["stderr"]
    assert served(stub) - begun == 40
    assert db_rows(tmp_path, "SELECT count(*), count(DISTINCT _id) FROM main.ask") == [(240, 240)]
    begun = served(stub)
    again = run(tmp_path, "--set", "stages.ask.samples=6", "--no-reuse", on=cluster)
    assert (again["calls_made"], again["cache_hits"], served(stub) - begun) == (0, 240, 0)


REPLIES = '''\
import os
import sys


def reply(request):
    """A deterministic reply; a choice stage's first attempt answers off the options, so it is re-asked.
    Each call notes where it ran: in a Ray worker process, or in the driver."""
    ray = sys.modules.get("ray")
    worker = ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    with open(os.path.join(os.path.dirname(__file__), "where.txt"), "a") as out:
        out.write("worker\\n" if worker else "driver\\n")
    last = request.messages[-1]["content"]
    if last.startswith("Classify"):
        seed = request.params.get("seed") or 0
        return ["maybe" if seed < 1000 and "3" in last else ("positive" if "1" in last else "negative")] * request.n
    return [f"about {last} ({request.params.get('seed')})"] * request.n
'''
CHAIN = """\
  - {name: ask, template: "Tell me about {{ text }}", samples: 3, params: {seed: 7}}
  - {name: judge, from: ask, template: "Classify {{ ask }}", parse: {choice: [positive, negative]}, output: pred,
     reask: 1, params: {seed: 7}}
  - {name: right, sql: "SELECT * FROM judge WHERE pred = 'positive'"}
"""


def tables(ws: Path) -> dict[str, pa.Table]:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return {name: con.sql(f"SELECT * FROM main.{name} ORDER BY _id").to_arrow_table()
                for name in ("ask", "judge", "right")}
    finally:
        con.close()


def test_the_ray_runs_tables_equal_the_local_runs(tmp_path: Path, cluster: str) -> None:
    """Samples, seeds, a choice stage with re-asks, a SQL stage: the same tables, cell for cell."""
    runs = {}
    for where in ("local", "ray"):
        ws = tmp_path / where
        write(ws, 30, "{backend: scripted, function: 'replies:reply'}", CHAIN)
        (ws / "evaluators" / "replies.py").write_text(REPLIES)
        runs[where] = run(ws, on=cluster if where == "ray" else None)
        assert runs[where]["exit"] == 0, runs[where]["stderr"]
    local, remote = tables(tmp_path / "local"), tables(tmp_path / "ray")
    assert local["judge"].num_rows == 90 and 0 < local["right"].num_rows < 90
    for name in local:
        assert remote[name].equals(local[name]), name
    for where, expected in (("local", "driver"), ("ray", "worker")):
        assert set((tmp_path / where / "evaluators" / "where.txt").read_text().split()) == {expected}
    counts = ("calls_made", "cache_hits", "parse_errors", "failures", "prompt_tokens", "completion_tokens")
    assert {k: runs["ray"][k] for k in counts} == {k: runs["local"][k] for k in counts}
    assert runs["ray"]["calls_made"] > 90 + 30  # the re-asks were made too (on Ray)


@pytest.mark.http
def test_20_percent_faults_every_row_done_or_recorded(tmp_path: Path, cluster: str) -> None:
    """A server failing 20% of requests (429 with Retry-After, or 500), one retry in the worker: every row
    is in the table or in `failures`, and a rerun against a good server calls exactly the failed ones."""
    flaky, flaky_url = launch("--fail-rate", "0.2", "--seed", "3")
    good, good_url = launch()
    try:
        write(tmp_path, 150, f"{{backend: openai, model: stub, base_url: '{flaky_url}', max_concurrency: 16}}",
              "  - {name: ask, template: 'Q: {{ text }}'}\n")
        first = run(tmp_path, "--retries", "1", on=cluster)
        rows = db_rows(tmp_path, f"SELECT count(*) FROM run_{first['run_id']}.ask")[0][0]
        failures = db_rows(tmp_path, f"SELECT status FROM failures WHERE run_id = {first['run_id']}")
        assert rows + len(failures) == 150 and failures, first["stderr"]
        assert {status for (status,) in failures} <= {429, 500}
        assert (first["exit"], first["failures"], first["stages"][0]["rows_out"]) == (1, len(failures), rows)
        assert served(flaky_url) > 150  # retried in the workers
        second = run(tmp_path, "--model", f"default={good_url}#stub", on=cluster)
        assert (second["exit"], second["calls_made"], second["cache_hits"]) == (0, len(failures), rows)
        assert served(good_url) == len(failures)
    finally:
        for proc in (flaky, good):
            proc.kill()
            proc.wait()


PIDS = '''\
import os


def reply(request):
    """Echo, noting which process answered (one line per call)."""
    with open(os.path.join(os.path.dirname(__file__), "pids.txt"), "a") as out:
        out.write(f"{os.getpid()}\\n")
    return request.messages[-1]["content"]
'''


def test_a_worker_killed_mid_batch_loses_no_row(tmp_path: Path, cluster: str) -> None:
    """SIGKILL to a worker process while batches are in flight: Ray restarts the actor and re-runs them."""
    write(tmp_path, 400, "{backend: scripted, function: 'pids:reply', delay: 0.05, max_concurrency: 8}",
          "  - {name: ask, template: 'Q: {{ text }}', samples: 2}\n")
    (tmp_path / "evaluators" / "pids.py").write_text(PIDS)
    pids = tmp_path / "evaluators" / "pids.txt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", "p", "-q", "--json", "--on", "ray",
                             "--ray-address", cluster], cwd=tmp_path, env={**os.environ, **RAY_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not pids.exists() or len(pids.read_text().split()) < 60) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = pids.read_text().split()
    victim = int(seen[-1])  # a worker answering right now: its limiter holds 8 calls, its queue more
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    summary = json.loads(out)
    assert (proc.returncode, summary["failures"], summary["calls_made"]) == (0, 0, 800), err
    after = pids.read_text().split()[len(seen):]
    assert str(victim) not in after[50:]  # dead (a call or two may have been writing as it died)
    assert set(after) - set(seen)  # the restarted actor, a new process, answered the re-run batches
    assert db_rows(tmp_path, "SELECT count(*), count(DISTINCT key) FROM calls") == [(800, 800)]
    assert db_rows(tmp_path, "SELECT count(*), count(DISTINCT _id) FROM main.ask") == [(800, 800)]


@pytest.mark.http
def test_the_driver_killed_mid_run_then_rerun_repeats_no_flushed_call(tmp_path: Path, cluster: str) -> None:
    """SIGKILL to `retort run --on ray` mid-run; the rerun calls exactly what the store does not hold."""
    slow, url = launch("--slow-rate", "1", "--slow-seconds", "0.05")
    try:
        write(tmp_path, 600, f"{{backend: openai, model: stub, base_url: '{url}', max_concurrency: 8}}",
              "  - {name: ask, template: 'Q: {{ text }}'}\n")
        env = {**os.environ, **RAY_ENV, "COLUMNS": "200"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", "p", "-q", "--on", "ray",
                                 "--ray-address", cluster], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while served(url) < 200 and time.monotonic() < deadline:  # mid-run: about a third called
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        before = settled(url)  # the dead driver's actors are gone (or done) before the rerun counts
        kept = db_rows(tmp_path, "SELECT count(*) FROM calls")[0][0]
        assert 0 < kept < 600 and before < 600
        rerun = run(tmp_path, on=cluster)
        assert (rerun["exit"], rerun["calls_made"], rerun["cache_hits"]) == (0, 600 - kept, kept), rerun["stderr"]
        assert served(url) - before == 600 - kept  # no flushed call made again
        assert db_rows(tmp_path, "SELECT count(*), count(DISTINCT key) FROM calls") == [(600, 600)]
    finally:
        slow.kill()
        slow.wait()


@pytest.mark.http
def test_no_key_is_shipped_the_workers_read_their_own_environment(tmp_path: Path, cluster: str, stub: str) -> None:
    """The driver has the key, the cluster's nodes do not: the workers never get it from the driver (no
    runtime_env, no object store), so the run stops before any call, naming the variable, not the key."""
    secret = "sk-test-not-for-the-workers-0123456789"
    write(tmp_path, 5, f"{{backend: openai, model: stub, base_url: '{stub}', api_key_env: RETORT_RAY_TEST_KEY}}",
          "  - {name: ask, template: 'Q: {{ text }}'}\n")
    begun = served(stub)
    proc = run_cli("run", "p", "-q", "--on", "ray", "--ray-address", cluster, cwd=tmp_path,
                   env={**RAY_ENV, "RETORT_RAY_TEST_KEY": secret})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: environment variable RETORT_RAY_TEST_KEY is not set; it should hold the API key for model "
        "'openai:stub'"), proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert served(stub) == begun  # not one request
    assert db_rows(tmp_path, "SELECT count(*) FROM calls") == [(0,)]


# --- vLLM, against the stand-in ----------------------------------------------------------------------


def test_vllm_runs_in_the_workers_against_the_stand_in(tmp_path: Path, cluster: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM backend is built and loaded in the Ray workers (the driver loads no engine: it has no
    `vllm` to import here), and its calls are the same cache entries a local run makes."""
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", "scripted,vllm")
    write(tmp_path, 20, "{backend: vllm, model: some-org/some-model, chunk_size: 8}",
          "  - {name: ask, template: 'Q: {{ text }}', samples: 2, params: {temperature: 0.7}}\n")
    remote = run(tmp_path, on=cluster)
    assert (remote["exit"], remote["calls_made"]) == (0, 40), remote["stderr"]
    texts = db_rows(tmp_path, "SELECT _sample, text, ask FROM main.ask WHERE text = 'item 3' ORDER BY _sample")
    assert texts == [(i, "item 3", f"stand-in reply {i} to: Q: item 3") for i in range(2)]
    assert db_rows(tmp_path, "SELECT DISTINCT model FROM calls") == [("vllm:some-org/some-model",)]
    # locally, with the stand-in importable here: every call is a cache hit
    local = run(tmp_path, "--no-reuse", env={"PYTHONPATH": str(STANDIN)})
    assert (local["exit"], local["calls_made"], local["cache_hits"]) == (0, 0, 40), local["stderr"]


# --- the Python API ---------------------------------------------------------------------------------------


def test_the_python_api_takes_on_ray(tmp_path: Path, cluster: str) -> None:
    """`retort.run(..., on="ray")` (in a process of its own, as Ray's driver): the calls run in workers."""
    write(tmp_path, 5, "{backend: scripted, function: 'replies:reply'}",
          "  - {name: ask, template: 'Tell me about {{ text }}'}\n")
    (tmp_path / "evaluators" / "replies.py").write_text(REPLIES)
    script = ("import json, retort\n"
              f"result = retort.run('p', workspace={str(tmp_path)!r}, on='ray', ray_address={cluster!r})\n"
              "print(json.dumps(result.totals))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **RAY_ENV},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["calls_made"] == 5
    assert (tmp_path / "evaluators" / "where.txt").read_text().split() == ["worker"] * 5


def test_the_python_api_refuses_an_unknown_executor(tmp_path: Path) -> None:
    import retort
    from retort.errors import UserError

    write(tmp_path, 2, "{backend: scripted, function: 'retort.backends.scripted:echo'}",
          "  - {name: ask, template: '{{ text }}'}\n")
    with pytest.raises(UserError, match="on must be 'local' or 'ray', not 'cloud'"):
        retort.run("p", workspace=tmp_path, on="cloud")
    assert not (tmp_path / ".retort" / "retort.duckdb").exists() or db_rows(
        tmp_path, "SELECT count(*) FROM calls") == [(0,)]
