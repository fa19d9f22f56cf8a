"""The one narrow backend contract: turn a request into completions.

Cache, concurrency, rate limits, retries and accounting wrap every backend in
one place, the runner. A backend raises `BackendError(retryable=...)` and
nothing else on a failed call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

from retort.errors import SpecError

# Keys of a model entry that the runner reads (routing, rate limits, waits, prices), never a backend.
RUNNER_KEYS = frozenset({"backend", "name", "rpm", "tpm", "max_retry_after", "price_input", "price_output"})
MAX_COUNT = 2 ** 63 - 1  # a token count the store keeps (BIGINT); a server claiming more is clamped


@dataclass(slots=True)
class Request:
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed, stop, extra_body
    n: int = 1
    schema: dict[str, Any] | None = None  # JSON Schema for structured output, when the stage parses JSON
    model: str = ""  # the pipeline's name for the model (informational; identity is the backend's)
    choices: list[str] | None = None  # a choice stage's options, for backends that can constrain decoding


@dataclass(slots=True)
class Completion:
    texts: list[str]  # exactly `request.n` texts
    prompt_tokens: int = 0
    completion_tokens: int = 0  # summed over the n texts
    finish_reasons: list[str | None] | None = None  # per text: the server's word ("stop", "length"), None when silent


@runtime_checkable
class Backend(Protocol):
    identity: str  # what enters the cache key: names the model, never a key or a secret
    max_concurrency: int

    async def complete(self, request: Request) -> Completion: ...

    async def check(self) -> list[str] | None:
        """Fail fast before a run (an unreachable endpoint raises EndpointUnreachable); return the
        model names the endpoint serves when it lists them."""

    async def aclose(self) -> None: ...


def backend_options(config: dict[str, Any], kind: str, allowed: frozenset[str],
                    hints: dict[str, str] | None = None) -> dict[str, Any]:
    """A model entry's keys for backend `kind` (None counts as absent); a key it does not take is a SpecError."""
    given = {k: v for k, v in config.items() if v is not None and k not in RUNNER_KEYS}
    unknown = sorted(given.keys() - allowed)
    if unknown:
        hint = (hints or {}).get(unknown[0], "")
        raise SpecError(f"{unknown[0]!r} does not apply to backend {kind!r}{hint}; expected one of "
                        f"{', '.join(sorted(allowed - {'workspace'}))}", field=unknown[0])
    return given


# --- decoding replies ------------------------------------------------------------------------
#
# Every OpenAI-format reply (a server's JSON, llama-cpp-python's dicts) becomes a Completion here
# and only here: the runner and the store can then rely on the types. A reply that cannot be read
# as a chat completion raises Malformed, which the backend turns into that row's BackendError.


class Malformed(ValueError):
    """A reply that is not what the endpoint promises; the message says what is wrong with it."""


def decode_chat(data: Any, n: int) -> Completion:
    """A chat completion object (parsed JSON: dicts and lists) for a request of `n` samples, as a well-typed Completion.

    Content given as a list of parts is joined, a number becomes its JSON text, null is ""
    (its finish_reason kept); a finish_reason is a str or None; token counts are ints. A server
    that ignores `n` answers one choice: that one is returned, and the caller asks for the rest.
    """
    if not isinstance(data, dict):
        raise Malformed(f"not a chat completion: a JSON {_kind(data)}")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise Malformed("not a chat completion: no `choices` list" if choices is None
                        else f"not a chat completion: `choices` is a {_kind(choices)}")
    if len(choices) != n and not (n > 1 and len(choices) == 1):
        raise Malformed(f"{len(choices)} choices for a request of n={n}")
    ordered = _by_index(choices)
    texts, reasons = [], []
    for i, choice in enumerate(ordered):
        message = choice.get("message")
        if not isinstance(message, dict):
            raise Malformed(f"not a chat completion: choice {i} has no `message` object")
        texts.append(content_text(message.get("content"), f"choice {i}"))
        reasons.append(reason_text(choice.get("finish_reason")))
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Completion(texts=texts, prompt_tokens=token_count(usage.get("prompt_tokens")),
                      completion_tokens=token_count(usage.get("completion_tokens")), finish_reasons=reasons)


def decode_embeddings(data: Any, count: int) -> tuple[list[list[float]], int]:
    """An embeddings object (parsed JSON) for `count` inputs: the vectors in input order, and the tokens used."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise Malformed("not an embeddings reply: no `data` list")
    rows = data["data"]
    if len(rows) != count:
        raise Malformed(f"{len(rows)} embeddings for {count} inputs")
    vectors = []
    for i, row in enumerate(_by_index(rows)):
        vector = row.get("embedding")
        if not isinstance(vector, list) or not vector or not all(_is_number(x) for x in vector):
            raise Malformed(f"embedding {i} is not a list of numbers")
        vectors.append([float(x) for x in vector])
    usage = data.get("usage")
    return vectors, token_count(usage.get("prompt_tokens") if isinstance(usage, dict) else None)


def content_text(content: Any, where: str = "the message") -> str:
    """`message.content` as text: a string, a list of parts (joined), a number (its JSON text), or null ("")."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if _is_number(content) or isinstance(content, bool):
        return orjson.dumps(content).decode()
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):  # {"type": "text", "text": ...}; image and audio parts carry no text
                    parts.append(text)
                elif text is not None:
                    parts.append(content_text(text, where))
            else:
                raise Malformed(f"{where}: a content part is a JSON {_kind(part)}")
        return "".join(parts)
    raise Malformed(f"{where}: content is a JSON {_kind(content)}, not text")


def reason_text(reason: Any) -> str | None:
    """A finish_reason as the store keeps it: the server's string, None when absent, else its compact JSON."""
    if reason is None or isinstance(reason, str):
        return reason
    return orjson.dumps(reason, default=str).decode()[:100]


def token_count(value: Any) -> int:
    """A usage count as an int. Usage is accounting, not the answer: a count that is absent, negative
    or not a number counts 0 rather than costing the row its (paid) completion."""
    if type(value) is int and 0 <= value <= MAX_COUNT:  # the usual case, first
        return value
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit()):
            return 0
        value = int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return 0
        value = int(value)
    if not isinstance(value, int) or value < 0:
        return 0
    return min(value, MAX_COUNT)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if _is_number(value) else type(value).__name__)


def _by_index(items: list[Any]) -> list[Mapping[str, Any]]:
    """`choices` or `data` entries in their `index` order (0, 1, ...), or as listed when none has an index."""
    if not all(isinstance(item, dict) for item in items):
        raise Malformed(f"an entry is a JSON {_kind(next(i for i in items if not isinstance(i, dict)))}, "
                        "not an object")
    indexes = [item.get("index") for item in items]
    if indexes == [0] or all(i is None for i in indexes):
        return items
    if sorted(i for i in indexes if isinstance(i, int) and not isinstance(i, bool)) != list(range(len(items))):
        raise Malformed(f"entry indexes {indexes[:8]} are not 0..{len(items) - 1}")
    return sorted(items, key=lambda item: item["index"])
