"""Any OpenAI-compatible /v1/chat/completions endpoint: OpenAI, `vllm serve`, llama.cpp server.

    OpenAIBackend("gpt-4o-mini", api_key_env="OPENAI_API_KEY")
    OpenAIBackend("Qwen/Qwen2.5-7B-Instruct", base_url="http://gpu1:8000/v1",
                  extra_body={"top_k": 20})

Three transports speak the same wire format, and every reply of each is decoded by the same
function (`decode_chat`/`decode_embeddings` in backends/base.py, through `_decode`): a
well-typed Completion, or that row's BackendError quoting the server's words in one line.

- "fast": retort's own keep-alive HTTP/1.1 client (`retort.backends.wire`, docs/http.md),
  orjson both ways. About half the CPU per request of a bare aiohttp loop, so one client
  keeps up with a local vLLM server; http:// proxies from the environment, ALL_PROXY too.
- "aiohttp": one shared aiohttp session; honours HTTP(S)_PROXY (not ALL_PROXY).
- "sdk": the `openai` SDK (`with_raw_response`, so the body is decoded by our code
  too). The reference path, for when the SDK's own HTTP stack is wanted. Its
  per-request overhead caps one client at a few hundred requests/s here.

"auto" (the default) is "fast": it honours the same proxy variables (docs/http.md).

Neither retries (the SDK runs with max_retries=0): the runner owns retries, and a
backend only classifies a failure as retryable or not.

The API key is read from the environment variable named by `api_key_env` at
construction. It is kept only in the request headers: never in `identity`, `repr`,
or an error message (a server that echoes it back has it scrubbed).
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import html
import inspect
import os
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp
import orjson

from retort.backends.base import Completion, Malformed, Request, backend_options, decode_chat, decode_embeddings
from retort.backends.wire import Pool, ResponseTooLarge
from retort.errors import BackendError, EndpointUnreachable, NotFoundError, SpecError, UserError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

Transport = Literal["auto", "fast", "aiohttp", "sdk"]
T = TypeVar("T")

QUOTED = 300  # characters of a server's reply quoted in an error message
HEAD = 64 * 1024  # bytes of a reply read for those words (an HTML page's text can follow a long <head>)
MAX_PARSED_ERROR = 1 << 20  # an error body larger than this is quoted, not parsed for its message
_SCRIPTS = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_MARKUP = re.compile(r"<[^>]*>")
CHECK_TIMEOUT = 3.0  # seconds; preflight should fail fast, not hang on a black-holed host
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_CONFIG_KEYS = frozenset({"model", "base_url", "api_key_env", "max_concurrency", "timeout", "extra_body",
                          "identity", "transport", "structured_output", "max_response_mb"})


def retryable_status(status: int) -> bool:
    """Timeouts, conflicts, rate limits and server errors pass; other 4xx are the request's fault."""
    return status in (408, 409, 429) or status >= 500


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date).

    `headers` must be case-insensitive (aiohttp's and httpx's are) or have lower-case keys.
    """
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it does not say so
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_message(status: int, content: bytes) -> str:
    """The server's own words, at most a line: OpenAI and vLLM nest them in "error", FastAPI servers in
    "detail"; an HTML error page gives its text. Bodies can be megabytes, so only the head is read."""
    try:
        data = orjson.loads(content) if len(content) <= MAX_PARSED_ERROR else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _clip(str(error["message"]), len(content))
        for candidate in (error, data.get("message"), data.get("detail")):
            if isinstance(candidate, str) and candidate:
                return _clip(candidate, len(content))
    text = _clip(_text_of(content[:HEAD]), len(content))
    if text:
        return text
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _text_of(head: bytes) -> str:
    """The start of a body as one line of text: an HTML page by its text, not its markup."""
    text = head.decode("utf-8", "replace")
    if text.lstrip()[:1] == "<":
        text = html.unescape(_MARKUP.sub(" ", _SCRIPTS.sub(" ", text)))
    return " ".join(text.split())


def _clip(text: str, size: int) -> str:
    """At most QUOTED characters of a server's words, saying how long the whole body was when cut."""
    words = " ".join(text[:HEAD].split())
    if len(words) <= QUOTED and size <= HEAD:
        return words
    return f"{words[:QUOTED].rstrip()}… ({size:,} bytes)"


def _proxy_configured() -> bool:
    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                                  "ALL_PROXY", "all_proxy"))


@functools.cache
def _sdk_named_params() -> frozenset[str]:
    """Parameters `chat.completions.create` takes by name; anything else goes through `extra_body`."""
    from openai.resources.chat.completions import AsyncCompletions

    return frozenset(inspect.signature(AsyncCompletions.create).parameters) - {
        "self", "extra_headers", "extra_query", "extra_body", "timeout"}


class OpenAIBackend:
    """A model behind an OpenAI-compatible endpoint, or several replicas of one (round robin)."""

    def __init__(self, model: str, base_url: str | list[str] = DEFAULT_BASE_URL, *,
                 api_key_env: str | None = None, max_concurrency: int = 64, timeout: float = 60,
                 extra_body: dict[str, Any] | None = None, identity: str | None = None,
                 transport: Transport = "auto", structured_output: str = "json_schema",
                 max_response_mb: float = 64) -> None:
        if transport not in ("auto", "fast", "aiohttp", "sdk"):
            raise ValueError(f"transport must be 'auto', 'fast', 'aiohttp' or 'sdk', not {transport!r}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url needs at least one URL")
        if structured_output not in ("json_schema", "json_object"):
            raise ValueError(f"structured_output must be 'json_schema' or 'json_object', not {structured_output!r}")
        self.model = model  # "": the one model the endpoint serves, found by check() (see use_model)
        # Server-side parameters set on the model change completions, so they are part of its identity.
        self._suffix = "+" + hashlib.sha256(orjson.dumps(extra_body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8] \
            if extra_body else ""
        self._own_identity = identity is not None
        self.identity = identity or f"openai:{model}{self._suffix}"
        self.structured_output = structured_output
        self._single_n = False  # set once the server is seen to ignore `n`
        self.base_urls = [u.rstrip("/") for u in urls]
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self.max_response_mb = max_response_mb  # the fast transport's cap on a response body
        self.transport: Literal["fast", "aiohttp", "sdk"] = "fast" if transport == "auto" else transport
        self.served_models: list[str] | None = None  # filled by check() when the server lists them

        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(f"environment variable {api_key_env} is not set; it should hold the API key "
                                f"for model {self.identity!r}")
        self._key = key
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        # Replicas: requests outstanding, requests sent, consecutive failures, and out-of-rotation deadlines.
        self._outstanding = [0] * len(self.base_urls)
        self.served = [0] * len(self.base_urls)
        self._strikes = [0] * len(self.base_urls)
        self._out_until = [0.0] * len(self.base_urls)
        # Created on first use, inside the running event loop (aiohttp binds a session to its loop).
        self._pools: list[Pool] | None = None  # our HTTP client's connections, one pool per replica
        self._session: aiohttp.ClientSession | None = None
        self._sdk_clients: list[AsyncOpenAI] | None = None

    def use_model(self, served: list[str] | None) -> None:
        """A backend made without a model name takes the endpoint's only model; several (or none
        listed) is an error that names them."""
        if self.model:
            return
        urls = ", ".join(self.base_urls)
        if not served or len(served) != 1:
            listed = f"it serves {len(served)}: {', '.join(served[:10])}" if served else "it lists no models"
            raise NotFoundError(f"{urls}: no model named and {listed}; name one as URL#MODEL "
                                "(e.g. --model default=http://host:8000/v1#MODEL)")
        self.model = served[0]
        if not self._own_identity:
            self.identity = f"openai:{self.model}{self._suffix}"

    def __repr__(self) -> str:
        urls = self.base_urls[0] if len(self.base_urls) == 1 else self.base_urls
        return f"OpenAIBackend(identity={self.identity!r}, base_url={urls!r}, transport={self.transport!r})"

    # --- the contract -------------------------------------------------------------------

    async def complete(self, request: Request) -> Completion:
        body = self._body(request)
        if self._single_n and request.n > 1:
            return await self._one_by_one(request, body)
        completion = self._completion(await self._send(body), request.n)
        if len(completion.texts) < request.n:
            # The server ignores `n` (llama-cpp-python's does): ask for the rest one at a time, from now on too.
            self._single_n = True
            rest = await self._one_by_one(Request(request.messages, request.params, request.n - len(completion.texts),
                                                  request.schema, request.model), body)
            return _merge([completion, rest])
        return completion

    async def _one_by_one(self, request: Request, body: dict[str, Any]) -> Completion:
        seed = body.get("seed")
        parts = []
        for i in range(request.n):
            single = {k: v for k, v in body.items() if k != "n"}
            if seed is not None:
                single["seed"] = seed + i + 1  # distinct samples; the first request used the seed itself
            parts.append(self._completion(await self._send(single), 1))
        return _merge(parts)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for `texts` from `/v1/embeddings` (vLLM and llama.cpp's server serve it), and the tokens used."""
        content = await self._send({"model": self.model, "input": texts, **self.extra_body}, "/embeddings")
        return self._decode(content, lambda data: decode_embeddings(data, len(texts)))

    async def _send(self, body: dict[str, Any], path: str = "/chat/completions") -> bytes:
        """POST to one replica: the healthy one with the fewest requests outstanding.

        A replica whose request fails with a connection error, a timeout or a 5xx is
        taken out for a while (5 s, doubling with each consecutive failure, at most
        60 s); the runner's retry then lands on another one. With every replica out,
        the one due back first is tried.
        """
        if len(self.base_urls) == 1:
            return await self._post(0, body, path)
        i = self._pick()
        self._outstanding[i] += 1
        self.served[i] += 1
        try:
            content = await self._post(i, body, path)
        except BackendError as exc:
            if exc.retryable and exc.status != 429:  # a 429 is the server pacing us, not a sick replica
                self._strikes[i] += 1
                self._out_until[i] = time.monotonic() + min(60.0, 5.0 * 2 ** (self._strikes[i] - 1))
            raise
        finally:
            self._outstanding[i] -= 1
        self._strikes[i] = 0
        return content

    def _pick(self) -> int:
        now = time.monotonic()
        candidates = [i for i, until in enumerate(self._out_until) if until <= now]
        if not candidates:
            return min(range(len(self.base_urls)), key=self._out_until.__getitem__)
        return min(candidates, key=lambda i: (self._outstanding[i], self.served[i]))

    async def check(self) -> list[str] | None:
        """Reach every base URL; return the served model ids when the server lists them.

        Unreachable (refused, DNS, timeout) raises EndpointUnreachable. Any HTTP answer means the
        server is up: some servers have no /models or guard it, so a 401 or 404 is not fatal.
        """
        served: list[str] | None = None
        for url in self.base_urls:
            ids = self._model_ids(await (self._list_wire(url) if self.transport == "fast" else self._list_aiohttp(url)))
            if ids is not None:
                served = served or []
                served += [i for i in ids if i not in served]
        self.served_models = served
        return served

    async def _list_wire(self, url: str) -> bytes:
        """GET {url}/models over our own client (what the calls will use): b"" unless it answers 200."""
        try:
            pool = Pool(url, headers=self._headers, limit=1, max_response=int(self.max_response_mb * 2 ** 20))
        except ValueError as e:  # not an http(s) URL, or a proxy it cannot use
            raise self._unreachable(url, str(e)) from None
        try:
            status, _, content = await pool.request("GET", "/models", timeout=CHECK_TIMEOUT)
        except TimeoutError:
            raise self._unreachable(url, f"no answer within {CHECK_TIMEOUT:g}s") from None
        except OSError as e:
            raise self._unreachable(url, str(e) or type(e).__name__) from e
        finally:
            await pool.close()
        return content if status == 200 else b""

    async def _list_aiohttp(self, url: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers,
                                         trust_env=_proxy_configured()) as session:
            try:
                async with session.get(f"{url}/models") as resp:
                    return await resp.read() if resp.status == 200 else b""
            except TimeoutError:
                raise self._unreachable(url, f"no answer within {CHECK_TIMEOUT:g}s") from None
            except aiohttp.ClientConnectorError as e:
                raise self._unreachable(url, str(e.os_error)) from e
            except (aiohttp.ClientError, OSError) as e:
                raise self._unreachable(url, f"{type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        if self._pools is not None:
            for pool in self._pools:
                await pool.close()
            self._pools = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._sdk_clients is not None:
            for client in self._sdk_clients:
                await client.close()
            self._sdk_clients = None

    # --- request and response -----------------------------------------------------------

    def _body(self, request: Request) -> dict[str, Any]:
        """The JSON body both transports send. Later sources win: params, backend extra_body, stage extra_body."""
        params = {k: v for k, v in request.params.items() if v is not None}
        stage_extra = params.pop("extra_body", None) or {}
        body: dict[str, Any] = {"model": self.model, "messages": request.messages, **params}
        if request.n != 1:  # only when asked: servers without `n` then still serve single samples
            body["n"] = request.n
        if request.schema is not None:
            if self.structured_output == "json_object":  # llama.cpp's server: a schema-constrained json_object
                body["response_format"] = {"type": "json_object", "schema": request.schema}
            else:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": request.schema, "strict": True}}
        body.update(self.extra_body)
        body.update(stage_extra)
        return body

    def _completion(self, content: bytes, n: int) -> Completion:
        return self._decode(content, lambda data: decode_chat(data, n))

    def _decode(self, content: bytes, decode: Callable[[Any], T]) -> T:
        """Every 200 reply of every transport passes here: a well-typed result, or this row's failure with the
        server's words. A 200 that is not what was asked for (a proxy's page, an error object, a cut-off
        body) is not retried: the same request would most likely get the same answer."""
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError as e:
            if not content.strip():
                raise self._error("malformed response: an empty body") from None
            # Where JSON breaks off says something about a cut-off reply; about an HTML page, nothing.
            detail = f" ({e})" if content.lstrip()[:1] in (b"{", b"[") else ""
            raise self._error(f"malformed response, not JSON{detail}: {_error_message(200, content)}") from None
        try:
            return decode(data)
        except Malformed as e:
            raise self._error(f"malformed response, {e}: {_error_message(200, content)}") from None

    @staticmethod
    def _model_ids(content: bytes) -> list[str] | None:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            return None
        return [str(e["id"]) for e in entries if isinstance(e, dict) and "id" in e]

    # --- transports ---------------------------------------------------------------------

    def _post(self, turn: int, body: dict[str, Any], path: str) -> Coroutine[Any, Any, bytes]:
        if self.transport == "fast":
            return self._post_wire(turn, body, path)
        if self.transport == "aiohttp":
            return self._post_aiohttp(self.base_urls[turn], body, path)
        return self._post_sdk(turn, body, path)

    async def _post_wire(self, turn: int, body: dict[str, Any], path: str = "/chat/completions") -> bytes:
        if self._pools is None:
            try:
                self._pools = [Pool(url, headers=self._headers, limit=self.max_concurrency,
                                    max_response=int(self.max_response_mb * 2 ** 20)) for url in self.base_urls]
            except ValueError as e:  # not an http(s) URL, or a proxy it cannot use
                raise self._error(str(e)) from e
        try:
            status, headers, content = await self._pools[turn].request("POST", path, orjson.dumps(body),
                                                                       timeout=self.timeout)
        except TimeoutError:
            raise self._error(f"no response within {self.timeout:g}s", retryable=True) from None
        except ResponseTooLarge:  # the same request would get the same answer: not retryable
            raise self._error(f"response from {self.base_urls[turn]} is larger than {self.max_response_mb:g} MiB; "
                              f"raise `max_response_mb` on the model to accept it") from None
        except OSError as e:  # refused, reset, dropped mid-body, TLS: the next attempt may succeed
            raise self._error(f"connection to {self.base_urls[turn]} failed: {type(e).__name__}: {e}",
                              retryable=True) from e
        if status >= 300:
            raise self._http_error(status, headers, content)
        return content

    async def _post_aiohttp(self, base_url: str, body: dict[str, Any], path: str = "/chat/completions") -> bytes:
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_concurrency),
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                # Honour HTTPS_PROXY like the SDK does, but only when one is set: aiohttp's trust_env
                # costs two thread-pool hops per request (proxy and netrc lookups).
                trust_env=_proxy_configured())
        try:
            async with session.post(f"{base_url}{path}", data=orjson.dumps(body)) as resp:
                content = await resp.read()
                if resp.status >= 300:
                    raise self._http_error(resp.status, resp.headers, content)
                return content
        except TimeoutError:
            raise self._error(f"no response within {self.timeout:g}s", retryable=True) from None
        except aiohttp.InvalidURL as e:
            raise self._error(f"invalid URL {e}") from e
        except aiohttp.ClientError as e:  # refused, reset, dropped mid-body: the next attempt may succeed
            raise self._error(f"connection to {base_url} failed: {type(e).__name__}: {e}", retryable=True) from e

    async def _post_sdk(self, turn: int, body: dict[str, Any], path: str = "/chat/completions") -> bytes:
        import openai

        if self._sdk_clients is None:
            self._sdk_clients = [self._sdk_client(url) for url in self.base_urls]
        named = _sdk_named_params() if path == "/chat/completions" else frozenset({"model", "input"})
        kwargs = {k: v for k, v in body.items() if k in named}
        extra = {k: v for k, v in body.items() if k not in named}
        # Without a key, keep the SDK from sending OPENAI_API_KEY from the environment to another server.
        headers = None if self._key else {"Authorization": openai.omit}
        try:
            client = self._sdk_clients[turn]
            endpoint = client.chat.completions if path == "/chat/completions" else client.embeddings
            raw = await endpoint.with_raw_response.create(**kwargs, extra_body=extra or None, extra_headers=headers)
        except openai.APITimeoutError:
            raise self._error(f"no response within {self.timeout:g}s", retryable=True) from None
        except openai.APIConnectionError as e:
            raise self._error(f"connection to {self.base_urls[turn]} failed: {e.__cause__ or e}",
                              retryable=True) from e
        except openai.APIStatusError as e:
            raise self._http_error(e.status_code, e.response.headers, e.response.content) from e
        except openai.OpenAIError as e:
            raise self._error(f"{type(e).__name__}: {e}") from e
        return raw.http_response.content

    def _sdk_client(self, base_url: str) -> AsyncOpenAI:
        import httpx2
        import openai

        limits = httpx2.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return openai.AsyncOpenAI(api_key=self._key or "unused", base_url=base_url, max_retries=0,
                                  timeout=self.timeout, http_client=openai.DefaultAsyncHttpxClient(limits=limits))

    # --- errors -------------------------------------------------------------------------

    def _scrub(self, message: str) -> str:
        return message.replace(self._key, "***") if self._key else message

    def _error(self, message: str, *, status: int | None = None, retryable: bool = False,
               retry_after: float | None = None) -> BackendError:
        return BackendError(self._scrub(message), model=self.identity, status=status, retryable=retryable,
                            retry_after=retry_after)

    def _http_error(self, status: int, headers: Mapping[str, str], content: bytes) -> BackendError:
        return self._error(_error_message(status, content), status=status, retryable=retryable_status(status),
                           retry_after=parse_retry_after(headers))

    def _unreachable(self, url: str, reason: str) -> EndpointUnreachable:
        return EndpointUnreachable(self._scrub(f"cannot reach {url}: {reason}"), model=self.identity)


def _merge(parts: list[Completion]) -> Completion:
    return Completion(texts=[t for p in parts for t in p.texts],
                      prompt_tokens=sum(p.prompt_tokens for p in parts),
                      completion_tokens=sum(p.completion_tokens for p in parts),
                      finish_reasons=[r for p in parts for r in (p.finish_reasons or [None] * len(p.texts))])


def from_config(config: dict[str, Any]) -> OpenAIBackend:
    """Build from a YAML model entry. Keys set to None count as absent. Without `model` (a bare
    `--model NAME=http://host:8000/v1`), the model is the one the endpoint serves (see use_model)."""
    given = backend_options(config, "openai", _CONFIG_KEYS)
    given.setdefault("model", "")
    if not given["model"] and given.get("base_url", DEFAULT_BASE_URL) == DEFAULT_BASE_URL:
        raise SpecError("backend 'openai' needs `model`, the served model name", field="model")
    return OpenAIBackend(**given)
