"""A scripted backend shipped in the package, for tests (ours and users').

    ScriptedBackend(replies=["a", "b"])          # a reply queue, consumed in call order
    ScriptedBackend(function=lambda req: "...")  # a reply computed from the request

In a pipeline: `backend: scripted` with `replies: [...]` or `function: module:attr`.
A function may return a string, a list of `n` strings, or raise BackendError to
simulate a failed call. A function with `constrains_choices = True` set on it gets a
choice stage's options in `request.choices`, as a backend that constrains decoding does.

`parsable` (`--model '*=scripted:retort.backends.scripted:parsable'`) answers any built-in
pipeline offline with replies its parsers accept: one of the choices, a JSON value of the
schema, or else the prompt followed by a final answer.

The identity (what enters every cache key and stage fingerprint) is `scripted:NAME`; a
model entry with `function:` adds the function and a digest of its code (its module and
the workspace modules that one imports), so that another function, or an edited one, is
another model: its calls are made, not answered from the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from retort.backends.base import Completion, Request
from retort.errors import BackendError

Reply = str | list[str]


class ScriptedBackend:
    def __init__(self, replies: Iterable[str] | None = None,
                 function: Callable[[Request], Reply] | None = None, *,
                 name: str = "scripted", cycle: bool = False, max_concurrency: int = 64,
                 delay: float = 0.0, identity: str | None = None, record: bool = True) -> None:
        if (replies is None) == (function is None):
            raise ValueError("ScriptedBackend takes replies or a function, not both")
        self.identity = identity or f"scripted:{name}"
        self.constrains_choices = bool(getattr(function, "constrains_choices", False))
        self.max_concurrency = max_concurrency
        self.delay = delay
        self.calls: list[Request] = []  # every request seen, for assertions in tests (with `record`)
        self.record = record  # off for pipelines run from a spec: a million requests kept would be a leak
        self.embedded: list[str] = []  # every text embedded
        self._function = function
        if replies is not None:
            replies = list(replies)
            self._replies: Iterable[str] = itertools.cycle(replies) if cycle else iter(replies)

    async def complete(self, request: Request) -> Completion:
        if self.record:
            self.calls.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._function is not None:
            out = self._function(request)
            texts = [out] * request.n if isinstance(out, str) else list(out)
        else:
            try:
                texts = [next(self._replies) for _ in range(request.n)]  # type: ignore[call-overload]
            except StopIteration:
                raise BackendError("scripted reply queue is empty", model=self.identity) from None
        if len(texts) != request.n:
            raise BackendError(f"scripted function returned {len(texts)} replies, expected {request.n}",
                               model=self.identity)
        words = sum(len(m["content"].split()) for m in request.messages)
        return Completion(texts=texts, prompt_tokens=words,
                          completion_tokens=sum(len(t.split()) for t in texts))

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Deterministic bag-of-words vectors (hashed words, L2-normalised): texts sharing words are close."""
        self.embedded.extend(texts)
        return [_hashed_bag(t) for t in texts], sum(len(t.split()) for t in texts)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _hashed_bag(text: str, dims: int = 64) -> list[float]:
    vector = [0.0] * dims
    for word in text.lower().split():
        vector[int(hashlib.blake2b(word.encode(), digest_size=4).hexdigest(), 16) % dims] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def echo(request: Request) -> str:
    """A function for `function: retort.backends.scripted:echo`: replies with the last user message."""
    return next(m["content"] for m in reversed(request.messages) if m["role"] == "user")


def parsable(request: Request) -> str:
    """A reply the stage's parser accepts: a choice, a JSON value of the schema, or the prompt with a
    final number (for answer parsers). Picks vary with the prompt, deterministically."""
    prompt = echo(request)
    pick = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "big")
    if request.choices:
        return request.choices[pick % len(request.choices)]
    if request.schema is not None:
        return json.dumps(_example(request.schema, request.schema, pick))
    return f"{prompt}\n\nThe answer is \\boxed{{{pick % 10}}}."


parsable.constrains_choices = True  # type: ignore[attr-defined]


def _example(schema: Any, root: dict[str, Any], pick: int) -> Any:
    """A value of JSON Schema `schema`: enums pick, strings fit their length bounds."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:  # "#/$defs/Name", as pydantic writes them
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _example(target, root, pick)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][pick % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _example(schema[key][0], root, pick)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: _example(sub, root, pick) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_example(schema.get("items", {}), root, pick)] * max(1, int(schema.get("minItems", 1)))
    if kind == "string":
        text = "example" * max(1, int(schema.get("minLength", 0)))
        return text[: int(schema.get("maxLength", len(text)))]
    if kind in ("integer", "number"):
        return max(int(schema.get("minimum", 1)), min(1, int(schema.get("maximum", 1))))
    return {"boolean": True, "null": None}.get(kind)


def from_config(config: dict[str, Any]) -> ScriptedBackend:
    from retort.workspace import code_digest, import_object

    name = config.get("name", "scripted")
    fn, identity = None, config.get("identity")
    if config.get("function"):
        ref = config["function"]
        fn = import_object(ref, config.get("workspace"))
        identity = identity or f"scripted:{name}:{ref}@{code_digest(fn)}"
    return ScriptedBackend(replies=config.get("replies"), function=fn, name=name, identity=identity,
                           cycle=bool(config.get("cycle", False)),
                           max_concurrency=int(config.get("max_concurrency") or 64),
                           delay=float(config.get("delay") or 0.0), record=False)
