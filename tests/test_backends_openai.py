"""OpenAIBackend against the stub server (bench/stub_server.py) on an ephemeral loopback port.

The stub runs in its own event loop on a background thread, so each test drives the
backend with a plain `asyncio.run`, as the CLI does.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from bench.stub_server import STATE, StubState, reply_text, start_stub
from retort.backends.base import Backend, Completion, Malformed, Request, decode_chat, decode_embeddings, token_count
from retort.backends.openai import OpenAIBackend, from_config, parse_retry_after, retryable_status
from retort.errors import BackendError, EndpointUnreachable, SpecError, UserError
from tests.conftest import use
from tests.hostile_server import Hostile

TRANSPORTS = ["fast", "aiohttp", "sdk"]
KEY = "sk-test-d0n0tl3ak-7f3a9c"


@dataclass
class Stub:
    url: str
    state: StubState


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start_stub(), loop).result(timeout=10)
    try:
        yield Stub(url, runner.app[STATE])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()




async def serve_chat(answer: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, str]:
    """A server on a free port whose POST /v1/chat/completions is `answer`: its runner and base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def failure(backend: OpenAIBackend, request: Request) -> BackendError:
    with pytest.raises(BackendError) as info:
        use(backend, lambda b: b.complete(request))
    return info.value


def forced(status: int, retry_after: str | None = None) -> Request:
    """A request the stub answers with `status` (through extra_body, as a stage would send it)."""
    extra: dict[str, Any] = {"stub_status": status}
    if retry_after is not None:
        extra["stub_retry_after"] = retry_after
    return Request(messages=[{"role": "user", "content": "hi"}], params={"extra_body": extra})


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_satisfies_the_backend_protocol() -> None:
    backend = OpenAIBackend("m", "http://127.0.0.1:1/v1")
    assert isinstance(backend, Backend)
    assert backend.identity == "openai:m"
    assert backend.max_concurrency == 64


@pytest.mark.parametrize("n", [1, 3])
def test_every_transport_returns_identical_completions(stub: Stub, n: int) -> None:
    prompt = "Which planet is the largest?"
    request = Request(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
                      params={"temperature": 0.7, "max_tokens": 16}, n=n)
    texts = [reply_text(prompt, i) for i in range(n)]
    expected = Completion(texts=texts, prompt_tokens=7, completion_tokens=sum(len(t.split()) for t in texts),
                          finish_reasons=["stop"] * n)
    for transport in TRANSPORTS:
        got = use(OpenAIBackend("stub", stub.url, transport=transport),  # type: ignore[arg-type]
                  lambda b: b.complete(request))
        assert got == expected, transport


def test_auto_transport_is_fast_with_a_proxy_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # retort's client honours HTTP(S)_PROXY, ALL_PROXY and NO_PROXY itself (tests/test_wire.py).
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert OpenAIBackend("m", "https://api.example.com/v1").transport == "fast"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert OpenAIBackend("m", "https://api.example.com/v1").transport == "fast"
    assert OpenAIBackend("m", "https://api.example.com/v1", transport="aiohttp").transport == "aiohttp"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_body_carries_params_schema_and_both_extra_bodies(stub: Stub, transport: str) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    backend = OpenAIBackend("served-name", stub.url, transport=transport,  # type: ignore[arg-type]
                            extra_body={"top_k": 20, "min_p": 0.05})
    request = Request(messages=[{"role": "user", "content": "classify this"}], n=2, schema=schema,
                      params={"temperature": 0.2, "top_p": 0.9, "max_tokens": 32, "seed": 7, "stop": ["\n"],
                              "presence_penalty": None,  # unset: must not reach the server
                              "extra_body": {"min_p": 0.1, "repetition_penalty": 1.1}})
    use(backend, lambda b: b.complete(request))

    body = stub.state.last_body
    assert body is not None
    assert body["model"] == "served-name"
    assert body["messages"] == request.messages
    assert {k: body[k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop", "n")} == {
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 32, "seed": 7, "stop": ["\n"], "n": 2}
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert body["top_k"] == 20  # backend extra_body
    assert body["min_p"] == 0.1  # the stage's extra_body wins over the backend's
    assert body["repetition_penalty"] == 1.1
    assert "presence_penalty" not in body
    assert "extra_body" not in body


def test_n_is_left_out_when_one(stub: Stub) -> None:
    use(OpenAIBackend("stub", stub.url), lambda b: b.complete(Request(messages=[{"role": "user", "content": "x"}])))
    assert stub.state.last_body is not None
    assert "n" not in stub.state.last_body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_429_is_retryable_with_retry_after(stub: Stub, transport: str) -> None:
    err = failure(OpenAIBackend("stub", stub.url, transport=transport), forced(429, "7"))  # type: ignore[arg-type]
    assert err.status == 429
    assert err.retryable is True
    assert err.retry_after == 7.0
    assert err.model == "openai:stub"
    assert "Rate limit reached" in str(err)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_400_is_not_retryable(stub: Stub, transport: str) -> None:
    err = failure(OpenAIBackend("stub", stub.url, transport=transport), forced(400))  # type: ignore[arg-type]
    assert err.status == 400
    assert err.retryable is False
    assert "maximum context length" in str(err)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_errors_are_retryable(stub: Stub, transport: str) -> None:
    err = failure(OpenAIBackend("stub", stub.url, transport=transport), forced(503))  # type: ignore[arg-type]
    assert (err.status, err.retryable, err.retry_after) == (503, True, None)


def test_retryable_statuses() -> None:
    assert [s for s in (400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504) if retryable_status(s)] == [
        408, 409, 429, 500, 502, 503, 504]


def test_parse_retry_after() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert 60 < (parse_retry_after({"retry-after": soon}) or 0) <= 120
    assert parse_retry_after({"retry-after": past}) == 0.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_after_as_http_date_reaches_the_error(stub: Stub, transport: str) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=600), usegmt=True)
    err = failure(OpenAIBackend("stub", stub.url, transport=transport), forced(429, when))  # type: ignore[arg-type]
    assert err.retryable
    assert err.retry_after is not None and 500 < err.retry_after <= 600


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dropped_connection_is_retryable(transport: str) -> None:
    async def scenario() -> BackendError:
        runner, url = await start_stub(drop_rate=1.0)
        backend = OpenAIBackend("stub", url, transport=transport)  # type: ignore[arg-type]
        try:
            await backend.complete(Request(messages=[{"role": "user", "content": "x"}]))
        except BackendError as e:
            return e
        finally:
            await backend.aclose()
            await runner.cleanup()
        raise AssertionError("a dropped connection must fail the call")

    err = asyncio.run(scenario())
    assert err.retryable is True
    assert err.status is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_connection_is_retryable(transport: str) -> None:
    url = closed_port_url()
    err = failure(OpenAIBackend("m", url, transport=transport),  # type: ignore[arg-type]
                  Request(messages=[{"role": "user", "content": "x"}]))
    assert err.retryable is True
    assert url in str(err)


@pytest.mark.parametrize(("payload", "expected"), [
    (b"<html>bad gateway</html>", "malformed response, not JSON: bad gateway"),
    (b'{"error": {"message": "upstream overloaded"}}', "no `choices` list: upstream overloaded"),
    (b'{"choices": []}', "0 choices for a request of n=2"),
    (b'{"choices": [{"index": 0, "message": {"content": "a"}}', "not JSON (unexpected end of data"),
    (b"", "malformed response: an empty body"),
])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_200_that_is_not_a_completion_is_not_retryable(transport: str, payload: bytes, expected: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/json")

    async def scenario() -> BackendError:
        runner, url = await serve_chat(answer)
        backend = OpenAIBackend("m", url, transport=transport)  # type: ignore[arg-type]
        try:
            await backend.complete(Request(messages=[{"role": "user", "content": "x"}], n=2))
        except BackendError as e:
            return e
        finally:
            await backend.aclose()
            await runner.cleanup()
        raise AssertionError("the call must fail")

    err = asyncio.run(scenario())
    assert expected in str(err)
    assert err.retryable is False


def test_check_lists_served_models(stub: Stub) -> None:
    backend = OpenAIBackend("stub", stub.url)
    assert use(backend, lambda b: b.check()) == ["stub"]
    assert backend.served_models == ["stub"]


def test_check_on_a_closed_port_names_the_url() -> None:
    url = closed_port_url()
    with pytest.raises(EndpointUnreachable) as info:
        use(OpenAIBackend("m", url), lambda b: b.check())
    assert f"cannot reach {url}" in str(info.value)


def test_check_tolerates_a_server_without_models() -> None:
    async def scenario() -> list[str] | None:
        runner, url = await start_stub()
        backend = OpenAIBackend("stub", url + "/nothing-here")  # every path 404s under this prefix
        try:
            return await backend.check()
        finally:
            await backend.aclose()
            await runner.cleanup()

    assert asyncio.run(scenario()) is None


def test_replicas_share_the_calls() -> None:
    async def scenario() -> list[int]:
        stubs = [await start_stub(), await start_stub()]
        backend = OpenAIBackend("stub", [url for _, url in stubs])
        try:
            for i in range(4):
                await backend.complete(Request(messages=[{"role": "user", "content": str(i)}]))
            return [runner.app[STATE].requests for runner, _ in stubs]
        finally:
            await backend.aclose()
            for runner, _ in stubs:
                await runner.cleanup()

    assert asyncio.run(scenario()) == [2, 2]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_key_is_sent_but_never_shown(stub: Stub, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETORT_TEST_KEY", KEY)
    backend = OpenAIBackend("stub", stub.url, api_key_env="RETORT_TEST_KEY", transport=transport)  # type: ignore[arg-type]
    use(backend, lambda b: b.complete(Request(messages=[{"role": "user", "content": "x"}])))
    assert stub.state.last_headers.get("Authorization") == f"Bearer {KEY}"

    err = failure(backend, forced(401))  # the stub quotes the key back, as OpenAI does
    unreachable = OpenAIBackend("stub", closed_port_url(), api_key_env="RETORT_TEST_KEY")
    with pytest.raises(EndpointUnreachable) as info:
        use(unreachable, lambda b: b.check())
    for shown in (repr(backend), backend.identity, str(err), repr(err), str(info.value)):
        assert KEY not in shown
    assert err.retryable is False


def test_without_a_key_no_authorization_is_sent(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK would otherwise pick up OPENAI_API_KEY and send it to whatever base_url this is.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for transport in TRANSPORTS:
        backend = OpenAIBackend("stub", stub.url, transport=transport)  # type: ignore[arg-type]
        use(backend, lambda b: b.complete(Request(messages=[{"role": "user", "content": "x"}])))
        assert "Authorization" not in stub.state.last_headers


def test_a_missing_key_variable_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETORT_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="RETORT_TEST_KEY"):
        OpenAIBackend("m", api_key_env="RETORT_TEST_KEY")


def test_from_config() -> None:
    backend = from_config({"backend": "openai", "name": "teacher", "model": "qwen", "base_url": "http://h:8000/v1/",
                           "max_concurrency": 8, "timeout": 5, "extra_body": {"top_k": 5},
                           "identity": "vllm:qwen-7b", "transport": "sdk", "api_key_env": None, "rpm": 600})
    assert (backend.model, backend.base_urls, backend.max_concurrency, backend.timeout) == (
        "qwen", ["http://h:8000/v1"], 8, 5)
    assert (backend.identity, backend.transport, backend.extra_body) == ("vllm:qwen-7b", "sdk", {"top_k": 5})
    assert from_config({"model": "gpt-4o-mini"}).base_urls == ["https://api.openai.com/v1"]
    assert from_config({"model": "gpt-4o-mini", "transport": "auto"}).transport == "fast"


def test_from_config_rejects_what_does_not_apply() -> None:
    with pytest.raises(SpecError, match="model_path"):
        from_config({"backend": "openai", "model": "m", "model_path": "/x.gguf"})
    with pytest.raises(SpecError, match="model"):
        from_config({"backend": "openai"})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_server_that_ignores_n_is_asked_one_sample_at_a_time(transport: str) -> None:
    bodies: list[dict[str, object]] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        text = f"sample seed={body.get('seed')}"
        return web.json_response({"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    async def scenario() -> list[str]:
        runner, url = await serve_chat(answer)
        backend = OpenAIBackend("m", url, transport=transport)  # type: ignore[arg-type]
        try:
            first = await backend.complete(Request([{"role": "user", "content": "x"}], {"seed": 7}, n=3))
            second = await backend.complete(Request([{"role": "user", "content": "x"}], {"seed": 7}, n=2))
            assert first.prompt_tokens == 15 and first.completion_tokens == 6
            return first.texts + second.texts
        finally:
            await backend.aclose()
            await runner.cleanup()

    texts = asyncio.run(scenario())
    assert texts == ["sample seed=7", "sample seed=8", "sample seed=9", "sample seed=8", "sample seed=9"]
    assert [b.get("n") for b in bodies] == [3, None, None, None, None]  # n is not sent again once ignored


# --- decoding: one function turns every reply into a well-typed Completion or the row's failure ---------------


def chat(*choices: dict[str, Any], usage: Any = None) -> dict[str, Any]:
    return {"choices": list(choices), **({"usage": usage} if usage is not None else {})}


def choice(content: Any, reason: Any = "stop", index: int | None = None) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": content}, "finish_reason": reason,
            **({"index": index} if index is not None else {})}


@pytest.mark.parametrize(("content", "text"), [
    ("plain", "plain"),
    ([{"type": "text", "text": "ab"}, "c", {"type": "image_url", "image_url": {"url": "x"}}, {"text": "d"}], "abcd"),
    (42, "42"), (0.5, "0.5"), (True, "true"), (None, ""), ([], ""),
])
def test_content_of_any_valid_shape_becomes_text(content: Any, text: str) -> None:
    assert decode_chat(chat(choice(content)), 1).texts == [text]


def test_null_content_keeps_its_finish_reason_and_reasons_are_text_or_none() -> None:
    got = decode_chat(chat(choice(None, "content_filter", 1), choice("x", {"type": "stop"}, 0), choice("y", None, 2)),
                      3)
    assert got.texts == ["x", "", "y"]  # in index order
    assert got.finish_reasons == ['{"type":"stop"}', "content_filter", None]


@pytest.mark.parametrize(("usage", "counts"), [
    ({"prompt_tokens": 2 ** 33, "completion_tokens": 2 ** 40}, (2 ** 33, 2 ** 40)),
    ({"prompt_tokens": 7.0, "completion_tokens": "12"}, (7, 12)),
    ({"prompt_tokens": -1, "completion_tokens": 1.5}, (0, 0)),
    ({"prompt_tokens": True, "completion_tokens": None}, (0, 0)),
    ({"prompt_tokens": 1e300, "completion_tokens": [3]}, (2 ** 63 - 1, 0)),
    ("lots", (0, 0)),
])
def test_token_counts_are_ints_whatever_the_server_says(usage: Any, counts: tuple[int, int]) -> None:
    got = decode_chat(chat(choice("x"), usage=usage), 1)
    assert (got.prompt_tokens, got.completion_tokens) == counts
    assert type(got.prompt_tokens) is int and type(got.completion_tokens) is int
    assert token_count(float("nan")) == 0


@pytest.mark.parametrize(("data", "n", "says"), [
    ([1, 2], 1, "not a chat completion: a JSON array"),
    ({"object": "error", "message": "overloaded"}, 1, "no `choices` list"),
    ({"choices": {"0": {}}}, 1, "`choices` is a object"),
    (chat(choice("a"), choice("b")), 1, "2 choices for a request of n=1"),
    (chat(choice("a"), choice("b")), 3, "2 choices for a request of n=3"),
    (chat(choice("a", index=0), choice("b", index=0)), 2, "entry indexes [0, 0] are not 0..1"),
    (chat("just text"), 1, "an entry is a JSON string"),
    (chat({"text": "legacy completion"}), 1, "choice 0 has no `message` object"),
    (chat(choice({"answer": 1})), 1, "content is a JSON object, not text"),
    (chat(choice([["nested"]])), 1, "a content part is a JSON array"),
])
def test_what_is_not_a_chat_completion_is_malformed(data: Any, n: int, says: str) -> None:
    with pytest.raises(Malformed) as info:
        decode_chat(data, n)
    assert says in str(info.value)


def test_one_choice_for_several_samples_is_a_server_ignoring_n() -> None:
    assert decode_chat(chat(choice("only")), 4).texts == ["only"]  # the backend asks for the other three


def test_embeddings_decode_in_index_order_or_fail() -> None:
    rows = [{"index": 1, "embedding": [1, 2]}, {"index": 0, "embedding": [0.5, 3]}]
    assert decode_embeddings({"data": rows, "usage": {"prompt_tokens": 2 ** 33}}, 2) == ([[0.5, 3.0], [1.0, 2.0]],
                                                                                        2 ** 33)
    for data, says in [({"data": rows}, "2 embeddings for 3 inputs"), ({"error": "x"}, "no `data` list"),
                       ({"data": [{"embedding": ["1"]}, {"embedding": [1]}, {}]}, "embedding 0 is not a list"),
                       ({"data": [{"embedding": [True]}] * 3}, "embedding 0 is not a list")]:
        with pytest.raises(Malformed, match=says.replace("`", ".")):
            decode_embeddings(data, 3)


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    with Hostile(lifetime=300) as server:
        yield server


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_decodes_the_same_hostile_replies(hostile: Hostile, transport: str) -> None:
    request = Request(messages=[{"role": "user", "content": "Q: x"}])
    seen = {}
    for mode in ("parts", "number", "null", "finish", "huge_tokens"):
        hostile.reset(mode)
        backend = OpenAIBackend("hostile", hostile.url, transport=transport)  # type: ignore[arg-type]
        seen[mode] = use(backend, lambda b: b.complete(request))
    assert seen["parts"] == Completion(["echo: Q: x"], 2, 3, ["stop"])
    assert seen["number"].texts == ["4.5"]
    assert (seen["null"].texts, seen["null"].finish_reasons) == ([""], ["content_filter"])
    assert seen["finish"].finish_reasons == ['{"type":"stop","stop":null}']
    assert (seen["huge_tokens"].prompt_tokens, seen["huge_tokens"].completion_tokens) == (2 ** 33, 2 ** 40 + 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_10_mb_error_page_is_quoted_in_one_line(hostile: Hostile, transport: str) -> None:
    hostile.reset("body_10mb")
    err = failure(OpenAIBackend("hostile", hostile.url, transport=transport),  # type: ignore[arg-type]
                  Request(messages=[{"role": "user", "content": "x"}]))
    assert str(err).startswith("model 'openai:hostile': malformed response, not JSON: Proxy response buffer overflow")
    assert str(err).endswith(" bytes)") and "10,485," in str(err) and len(str(err)) < 450
    assert not err.retryable


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_embeddings_replies_are_decoded_or_fail_with_the_servers_words(hostile: Hostile, transport: str) -> None:
    def embed(mode: str) -> tuple[list[list[float]], int] | BackendError:
        hostile.reset(mode)
        backend = OpenAIBackend("hostile", hostile.url, transport=transport)  # type: ignore[arg-type]
        try:
            return use(backend, lambda b: b.embed(["a", "bb", "ccc"]))
        except BackendError as e:
            return e

    assert embed("parts") == ([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]], 3)  # listed backwards, put in order by index
    assert embed("huge_tokens") == ([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]], 2 ** 33)
    for mode, says in [("number", "embedding 0 is not a list of numbers"), ("choices", "2 embeddings for 3 inputs"),
                       ("truncated", "not JSON (unexpected end of data"),
                       ("not_chat", "no `data` list: The model is overloaded"),
                       ("html_502", "HTTP 502: 502 Bad Gateway")]:
        err = embed(mode)
        assert isinstance(err, BackendError) and says in str(err), (mode, err)
        assert err.retryable == (mode == "html_502")
