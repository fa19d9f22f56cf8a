"""Any LangChain chat model (a langchain-core `BaseChatModel`) as a retort backend.

    models:
      default: {backend: langchain, factory: "mymodels:make_chat"}           # evaluators/mymodels.py
      gpt:     {backend: langchain, factory: "langchain_openai:ChatOpenAI", model: gpt-4o-mini}
      any:     {backend: langchain, factory: "langchain.chat_models:init_chat_model", model: "openai:gpt-4o-mini"}

`factory` is `module:attr`, resolved like an evaluator (the workspace's evaluators/
first, then sys.path): a chat model instance, a chat model class, or any callable
returning one. With `model` set, a factory that takes a `model` argument is called as
`factory(model=...)` (a `model` kept from another backend is otherwise not used).
The model is built on first use (or by `check()`, before a run).

Sampling parameters, and how portable each is across chat models:

    temperature, max_tokens,  set on a copy of the model when it has the field (temperature and
    top_p, seed               max_tokens are LangChain's standard init parameters, so most do;
                              max_tokens also matches max_completion_tokens, max_output_tokens,
                              num_predict, max_new_tokens; seed also random_seed); otherwise
                              invocation keyword arguments, which some providers forward and
                              some reject
    stop                      the standard `stop=` argument of every chat model
    extra_body                (stage or model) keyword arguments of every invocation
    n                         n concurrent calls; with a seed, sample i uses seed + i
    JSON schema               `with_structured_output(schema, method="json_schema")` (model
                              `structured_output: json_object` asks for method="json_mode")
                              where the model supports it; otherwise plain text, and the
                              stage's JSON parser does the rest

The model's own retries and rate limiter still apply: set `max_retries=0` in the factory
so the runner alone retries. Failures become `BackendError`: retryable for rate limits,
timeouts, connection errors and 408/409/429/5xx (by class name or `status_code`).

`identity` (the cache key's model part) defaults to `langchain:<factory>` plus the model's
`_identifying_params` as canonical JSON, without anything secret: a parameter whose name has
a part key, token, secret, password, auth, ... (so `api_key` and `access_token` go,
`max_tokens` stays) or whose value is a pydantic `SecretStr`. The same secrets are scrubbed
from error messages.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, SecretBytes, SecretStr

from retort.backends import LANGCHAIN_MISSING
from retort.backends.base import Completion, Request, backend_options, content_text, reason_text, token_count
from retort.errors import BackendError, NotFoundError, SpecError, UserError
from retort.workspace import Workspace, import_object

try:  # an extra: retort[langchain]
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.exceptions import OutputParserException
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
    from langchain_core.outputs import LLMResult
    from langchain_core.runnables import Runnable
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "langchain_core":
        raise
    raise ModuleNotFoundError(LANGCHAIN_MISSING, name=exc.name) from None

Factory = str | BaseChatModel | Callable[..., BaseChatModel]

_CONFIG_KEYS = frozenset({"factory", "model", "identity", "max_concurrency", "structured_output", "extra_body",
                          "workspace"})

# A request parameter → the model fields that carry it, first match wins.
_FIELDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "max_new_tokens"),
    "seed": ("seed", "random_seed"),
}
_METHODS = {"json_schema": "json_schema", "json_object": "json_mode"}
_ROLES: dict[str, type[BaseMessage]] = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}

# Whole name parts, so `max_tokens` (a count) is kept while `api_key` and `hf_token` are dropped.
_SECRET_PARTS = frozenset({"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwd", "pwd",
                           "credential", "credentials", "auth", "authorization", "cookie", "bearer", "signature"})
_SECRET_WORDS = ("secret", "password", "passwd", "apikey", "api_key", "credential")
_RETRYABLE_NAMES = ("ratelimit", "timeout", "timedout", "connection", "overloaded", "serviceunavailable",
                    "internalserver", "toomanyrequests", "throttl", "temporarilyunavailable")
_USERINFO = re.compile(r"(://)[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """`api_key`, `openaiApiKey`, `access_token`, `x-api-key`, `client_secret`: yes. `max_tokens`, `top_k`: no."""
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        return True
    parts = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(part in _SECRET_PARTS for part in parts)


def public_params(value: Any) -> Any:
    """JSON-safe, stable, secret-free: drops secret names, SecretStr values and anything without a stable form."""
    if isinstance(value, (SecretStr, SecretBytes)):
        return None
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or is_secret_name(k):
                continue
            clean = public_params(v)
            if clean is not None:
                out[k] = clean
        return out
    if isinstance(value, (list, tuple)):
        return [public_params(v) for v in value]
    if isinstance(value, str):
        return _USERINFO.sub(r"\1***@", value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return None  # a client, a callable, an enum of a provider SDK...: no stable, safe form


def retryable_error(exc: BaseException) -> tuple[bool, int | None]:
    """(retryable, status) by status code (`status_code`, `status`, `response.status_code`) or class name."""
    from retort.backends.openai import retryable_status

    status = None
    for candidate in (getattr(exc, "status_code", None), getattr(exc, "status", None),
                      getattr(getattr(exc, "response", None), "status_code", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool) and 100 <= candidate < 600:
            status = candidate
            break
    if status is not None:
        return retryable_status(status), status
    names = " ".join(cls.__name__.lower() for cls in type(exc).__mro__)
    return any(word in names for word in _RETRYABLE_NAMES), None


def to_messages(messages: list[dict[str, str]]) -> list[BaseMessage]:
    """system/user/assistant → SystemMessage/HumanMessage/AIMessage; another role → ChatMessage."""
    out: list[BaseMessage] = []
    for m in messages:
        cls = _ROLES.get(m["role"])
        out.append(cls(content=m["content"]) if cls else ChatMessage(role=m["role"], content=m["content"]))
    return out


def _text(message: BaseMessage) -> str:
    """Content as text, decoded as a server's reply is: a list of blocks joins its text blocks (not
    `message.text`: a method in langchain-core 0.3, whose `str()` is a repr). Malformed fails the call."""
    return content_text(message.content)


def _finish_reason(message: BaseMessage) -> str | None:
    meta = message.response_metadata or {}
    for name in ("finish_reason", "stop_reason", "done_reason"):
        if meta.get(name):
            return reason_text(meta[name])
    return None


def _usage(message: BaseMessage) -> tuple[int, int]:
    usage = getattr(message, "usage_metadata", None)
    usage = usage if isinstance(usage, Mapping) else {}
    return token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens"))


def _takes_model(factory: Callable[..., Any]) -> bool:
    """Whether `factory(model=...)` is a call it accepts (a chat model class, init_chat_model, a function)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any((p.name == "model" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD for p in params)


def _qualname(obj: Any) -> str:
    target = type(obj) if isinstance(obj, BaseChatModel) else obj
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


class _LastMessage(BaseCallbackHandler):
    """Keeps the chat model's raw message when a structured-output chain hides it (usage, unparsed text)."""

    run_inline = True

    def __init__(self) -> None:
        self.message: BaseMessage | None = None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                if isinstance(message, BaseMessage):
                    self.message = message


class LangChainBackend:
    """A LangChain chat model behind the backend contract; see the module docstring."""

    def __init__(self, factory: Factory, *, model: str | None = None, identity: str | None = None,
                 max_concurrency: int = 8, structured_output: str = "json_schema",
                 extra_body: dict[str, Any] | None = None, workspace: Workspace | str | Path | None = None) -> None:
        if structured_output not in _METHODS:
            raise ValueError(f"structured_output must be 'json_schema' or 'json_object', not {structured_output!r}")
        self.factory = factory
        self.ref = factory if isinstance(factory, str) else _qualname(factory)
        self.model = model
        self.max_concurrency = max_concurrency
        self.structured_output = structured_output
        self.extra_body = dict(extra_body or {})
        self.workspace = workspace if isinstance(workspace, Workspace) or workspace is None else Workspace(workspace)
        self._identity = identity
        self._chat: BaseChatModel | None = None
        self._secrets: list[str] = []
        self._variants: dict[bytes, BaseChatModel] = {}  # copies of the model with sampling fields set
        self._structured: dict[tuple[int, bytes], Runnable[Any, Any] | None] = {}

    def __repr__(self) -> str:
        return f"LangChainBackend(factory={self.ref!r})"

    # --- the model and its identity -------------------------------------------------------

    @property
    def chat(self) -> BaseChatModel:
        """The chat model, built on first use."""
        if self._chat is None:
            self._chat = self._build()
            self._secrets = sorted(_secret_values(self._chat), key=len, reverse=True)
        return self._chat

    def _build(self) -> BaseChatModel:
        obj: Any = self.factory
        if isinstance(obj, str):
            try:
                obj = import_object(obj, self.workspace)
            except NotFoundError as exc:
                if self.workspace is not None:
                    raise
                raise NotFoundError(f"{exc} (evaluators/ is looked up in the current directory's workspace, "
                                    f"{Path.cwd()})") from None
        if not isinstance(obj, BaseChatModel):
            if not callable(obj):
                raise UserError(f"langchain factory {self.ref!r} is a {type(obj).__name__}, not a chat model "
                                "or a callable returning one")
            try:
                obj = obj(model=self.model) if self.model and _takes_model(obj) else obj()
            except Exception as exc:
                raise UserError(f"langchain factory {self.ref!r} failed: {type(exc).__name__}: "
                                f"{'; '.join(line.strip() for line in str(exc).splitlines() if line.strip())}",
                                ) from None
        if not isinstance(obj, BaseChatModel):
            raise UserError(f"langchain factory {self.ref!r} returned a {type(obj).__name__}, not a langchain-core "
                            "BaseChatModel")
        return obj

    @property
    def identity(self) -> str:
        """`langchain:<factory>` plus the model's public identifying params, canonical JSON."""
        if self._identity is None:
            chat = self.chat
            try:
                raw: dict[str, Any] = dict(chat._identifying_params)
            except Exception:  # a model whose params need a live client
                raw = {}
            if not {"model", "model_name", "model_id"} & raw.keys():
                for attr in ("model_name", "model", "model_id"):
                    value = getattr(chat, attr, None)
                    if isinstance(value, str) and value:
                        raw["model"] = value
                        break
            if self.extra_body:
                raw["extra_body"] = self.extra_body
            params = public_params(raw)
            suffix = " " + orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode() if params else ""
            self._identity = self._scrub(f"langchain:{self.ref}{suffix}")
        return self._identity

    @identity.setter
    def identity(self, value: str) -> None:
        self._identity = value

    # --- the contract -----------------------------------------------------------------------

    async def complete(self, request: Request) -> Completion:
        params = {k: v for k, v in request.params.items() if v is not None}
        stop = params.pop("stop", None)
        kwargs = {**self.extra_body, **(params.pop("extra_body", None) or {})}
        seed = params.pop("seed", None)
        messages = to_messages(request.messages)
        try:
            if request.n == 1:
                results = [await self._one(messages, params, seed, stop, kwargs, request.schema)]
            else:
                async with asyncio.TaskGroup() as group:  # a failed sample cancels its siblings
                    tasks = [group.create_task(self._one(messages, params, None if seed is None else seed + i,
                                                         stop, kwargs, request.schema))
                             for i in range(request.n)]
                results = [t.result() for t in tasks]
        except BaseExceptionGroup as group:
            first = next((e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)),
                         group.exceptions[0])
            raise self._error(first) from first
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        return Completion(texts=[r[0] for r in results], prompt_tokens=sum(r[1] for r in results),
                          completion_tokens=sum(r[2] for r in results), finish_reasons=[r[3] for r in results])

    async def check(self) -> None:
        """Build the model (import the factory, call it) so a broken factory fails before the run."""
        _ = self.identity

    async def aclose(self) -> None:
        return None

    # --- one call -----------------------------------------------------------------------------

    async def _one(self, messages: list[BaseMessage], params: dict[str, Any], seed: int | None,
                   stop: list[str] | None, kwargs: dict[str, Any], schema: dict[str, Any] | None,
                   ) -> tuple[str, int, int, str | None]:
        chat, extra = self._variant({**params, **({} if seed is None else {"seed": seed})})
        call_kwargs = {**extra, **kwargs}
        if stop:
            call_kwargs["stop"] = stop
        structured = self._structured_for(chat, schema) if schema is not None else None
        if structured is None:
            message = await chat.ainvoke(messages, **call_kwargs)
            prompt_tokens, completion_tokens = _usage(message)
            return _text(message), prompt_tokens, completion_tokens, _finish_reason(message)
        capture = _LastMessage()
        try:
            parsed = await structured.ainvoke(messages, config={"callbacks": [capture]}, **call_kwargs)
            text = None if parsed is None else _dump(parsed)
        except OutputParserException:
            text = None  # the model answered, not in the schema: the stage's parser reports it
        raw = capture.message
        if text is None:
            if raw is None:
                raise BackendError("structured output returned nothing", model=self.identity)
            text = _text(raw)
        prompt_tokens, completion_tokens = _usage(raw) if raw is not None else (0, 0)
        return text, prompt_tokens, completion_tokens, _finish_reason(raw) if raw is not None else None

    def _variant(self, params: dict[str, Any]) -> tuple[BaseChatModel, dict[str, Any]]:
        """The model with the sampling params it has fields for; the rest become invocation kwargs."""
        chat = self.chat
        fields = type(chat).model_fields
        update, extra = {}, {}
        for name, value in params.items():
            target = next((f for f in _FIELDS.get(name, ()) if f in fields), None)
            if target is None:
                extra[name] = value
            else:
                update[target] = value
        if not update:
            return chat, extra
        key = orjson.dumps(update, option=orjson.OPT_SORT_KEYS)
        if key not in self._variants:
            self._variants[key] = chat.model_copy(update=update)
        return self._variants[key], extra

    def _structured_for(self, chat: BaseChatModel, schema: dict[str, Any]) -> Runnable[Any, Any] | None:
        """`chat.with_structured_output(schema)`, or None when this model does not support it."""
        key = (id(chat), orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))  # variants live as long as self
        if key in self._structured:
            return self._structured[key]
        overridden = type(chat).with_structured_output is not BaseChatModel.with_structured_output
        with_tools = type(chat).bind_tools is not BaseChatModel.bind_tools
        runnable = None
        if overridden or with_tools:
            titled = schema if "title" in schema else {"title": "output", **schema}  # tool and format names
            try:
                runnable = chat.with_structured_output(titled, method=_METHODS[self.structured_output])
            except (NotImplementedError, TypeError, ValueError, KeyError):
                runnable = None
        self._structured[key] = runnable
        return runnable

    # --- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        retryable, status = retryable_error(exc)
        retry_after = None
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if retryable and isinstance(headers, Mapping):
            from retort.backends.openai import parse_retry_after

            retry_after = parse_retry_after(headers)
        message = self._scrub(f"{type(exc).__name__}: {exc}".strip())
        return BackendError(message[:1000], model=self.identity if self._chat is not None else f"langchain:{self.ref}",
                            status=status, retryable=retryable, retry_after=retry_after)


def _dump(parsed: Any) -> str:
    if isinstance(parsed, BaseModel):
        parsed = parsed.model_dump(mode="json")
    if isinstance(parsed, (AIMessage, AIMessageChunk)):
        return _text(parsed)
    return orjson.dumps(parsed, default=str).decode()


def _secret_values(chat: BaseChatModel) -> set[str]:
    """Secret strings a model holds (SecretStr fields, secret-named string fields), to scrub from messages."""
    found = set()
    for name in type(chat).model_fields:
        value = getattr(chat, name, None)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif not (isinstance(value, str) and is_secret_name(name)):
            continue
        if isinstance(value, str) and len(value) >= 6:
            found.add(value)
    return found


def from_config(config: dict[str, Any]) -> LangChainBackend:
    """Build from a YAML model entry (or a `model_targets` entry, whose factory may be a model object)."""
    given = backend_options(config, "langchain", _CONFIG_KEYS)
    if "factory" not in given:
        raise SpecError("backend 'langchain' needs `factory`, a module:attr naming a chat model or a function "
                        "returning one", field="factory")
    factory = given.pop("factory")
    if isinstance(factory, str) and ":" not in factory:
        raise SpecError(f"factory {factory!r}: expected module:attr", field="factory")
    if "max_concurrency" in given:
        given["max_concurrency"] = int(given["max_concurrency"])
    return LangChainBackend(factory, **given)
