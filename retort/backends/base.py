"""The one narrow backend contract: turn a request into completions.

Cache, concurrency, rate limits, retries and accounting wrap every backend in
one place, the runner. A backend raises `BackendError(retryable=...)` and
nothing else on a failed call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from retort.errors import SpecError

# Keys of a model entry that the runner reads (routing, rate limits, prices), never a backend.
RUNNER_KEYS = frozenset({"backend", "name", "rpm", "tpm", "price_input", "price_output"})


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
