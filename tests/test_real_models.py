"""The real thing: the embedded model in-process, and the same GGUF behind a real
OpenAI-compatible server on 127.0.0.1, reached by the `openai` SDK and retort's fast
transport over real HTTP. The model is tiny: these tests prove the machinery, not quality."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_cli

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install -e '.[test]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` serving the packaged SmolLM2 on an ephemeral loopback port."""
    from retort.backends.local import gguf_path

    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with log.open("w") as sink:  # a file, not a pipe: the server logs a lot and would block on a full pipe
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(), "--model_alias", "smollm2",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
            stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama_cpp.server did not start within 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


PIPELINE = """\
input:
  path: data/rows.jsonl
params:
  labels: [positive, negative]
models:
  default: {backend: local}
stages:
  - name: classify
    template: "{% block user %}Review: {{ text }}\\nIs it positive or negative?{% endblock %}\
      {% block assistant %}Answer:{% endblock %}"
    params: {temperature: 0, max_tokens: 6, seed: 1}
    parse: {choice: "{{ params.labels }}"}
    output: prediction
  - name: structured
    from: input
    template: "Give the sentiment of this review as JSON: {{ text }}"
    params: {temperature: 0, max_tokens: 24}
    parse:
      json:
        schema: {type: object, properties: {sentiment: {type: string, enum: [positive, negative]}},
                 required: [sentiment]}
  - name: score
    python: accuracy
    from: classify
"""

ROWS = [{"text": "A wonderful, moving film.", "label": "positive"},
        {"text": "Dull and far too long.", "label": "negative"}]


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (workspace / "pipelines" / "real.yaml").write_text(PIPELINE)
    return workspace


def _tables(ws: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        return (con.execute("SELECT prediction, _raw, _error FROM main.classify ORDER BY _id").fetchall(),
                con.execute("SELECT sentiment, _error FROM main.structured ORDER BY _id").fetchall(),
                con.execute("SELECT model, prompt_tokens, completion_tokens, latency_ms FROM calls").fetchall())
    finally:
        con.close()


@pytest.mark.local_model
def test_embedded_model_in_process(ws: Path) -> None:
    out = run_cli("run", "real", "--json", "-q", cwd=ws)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["calls_made"] == 4
    classify, structured, calls = _tables(ws)
    assert len(classify) == 2 and all(raw for _, raw, _ in classify)
    # grammar-constrained JSON: every row parses and validates against the schema
    assert [e for _, e in structured] == [None, None]
    assert {s for s, _ in structured} <= {"positive", "negative"}
    assert {m for m, *_ in calls} == {"local:SmolLM2-135M-Instruct.Q4_1"}
    assert all(p > 0 and c > 0 and lat > 0 for _, p, c, lat in calls)
    # the rerun is served from the cache
    again = json.loads(run_cli("run", "real", "--json", "-q", cwd=ws).stdout)
    assert again["calls_made"] == 0 and again["cache_hits"] == 4


@pytest.mark.server
@pytest.mark.parametrize("transport", ["sdk", "aiohttp", "fast"])
def test_same_gguf_over_real_http(ws: Path, llama_server: str, transport: str) -> None:
    served = ws / "pipelines" / "served.yaml"
    served.write_text(PIPELINE.replace(
        "  default: {backend: local}",
        f"  default: {{backend: openai, model: smollm2, base_url: '{llama_server}', transport: {transport},\n"
        "            structured_output: json_object}"))  # llama.cpp's server takes a schema as json_object
    out = run_cli("run", "served", "--json", "-q", cwd=ws)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["failures"] == 0
    classify, structured, calls = _tables(ws)
    assert len(classify) == 2 and all(raw for _, raw, _ in classify)
    assert [e for _, e in structured] == [None, None]  # response_format json_schema honoured by the server
    assert {m for m, *_ in calls} == {"openai:smollm2"}
    assert all(p > 0 and c > 0 for _, p, c, _ in calls)


@pytest.mark.server
def test_validate_lists_served_models(ws: Path, llama_server: str) -> None:
    out = run_cli("validate", "real", "--model", f"default={llama_server}#smollm2", cwd=ws)
    assert out.returncode == 0, out.stderr
    msg = run_cli("validate", "real", "--model", f"default={llama_server}#not-served", cwd=ws)
    assert msg.returncode == 2 and "not-served" in msg.stderr and "smollm2" in msg.stderr
