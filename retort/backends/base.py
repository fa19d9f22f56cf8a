"""The one narrow backend contract: turn a request into completions.

Cache, concurrency, rate limits, retries and accounting wrap every backend in
one place, the runner. A backend raises `BackendError(retryable=...)` and
nothing else on a failed call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
    finish_reasons: list[str] | None = None


@runtime_checkable
class Backend(Protocol):
    identity: str  # what enters the cache key: names the model, never a key or a secret
    max_concurrency: int

    async def complete(self, request: Request) -> Completion: ...

    async def check(self) -> None:
        """Fail fast before a run (an unreachable endpoint raises EndpointUnreachable)."""

    async def aclose(self) -> None: ...
