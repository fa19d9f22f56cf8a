"""One model call as every backend gets it: through the model's limiter, retried with tenacity."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from retort.errors import BackendError
from retort.limits import Limiter

T = TypeVar("T")
A = TypeVar("A")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.retryable


def _backoff(state: Any) -> float:
    """Exponential backoff with full jitter, but never sooner than the server's Retry-After."""
    exc = state.outcome.exception() if state.outcome else None
    after = getattr(exc, "retry_after", None) or 0.0
    return max(after, random.uniform(0, min(30.0, 0.5 * 2 ** state.attempt_number)))


async def call_with_retries(fn: Callable[[A], Awaitable[T]], arg: A, limiter: Limiter, max_retries: int,
                            estimate: float = 0.0, tokens: Callable[[T], float] | None = None,
                            on_wait: Callable[[float, str], None] | None = None) -> T:
    """One model call, `fn(arg)`, as every backend gets it: through the model's limiter, retried with tenacity.

    The first try runs inline (the hot path: no closure, no tenacity); a retryable failure
    (429, 5xx, timeout, connection) is retried with exponential backoff and jitter, never
    sooner than Retry-After. A Retry-After above the model's `max_retry_after` fails the call
    at once with the server's words (a day's wait is not a retry). Every try passes the
    limiter: a 429 halves the model's concurrency and token budgets settle on real usage
    (`tokens(result)`). A wait of LONG_WAIT or more is told to `on_wait(seconds, reason)`.
    """
    try:
        return await _attempt(fn, arg, limiter, estimate, tokens)
    except BackendError as exc:
        if not _capped(exc, limiter.max_retry_after).retryable or max_retries <= 0:
            raise
        first_wait = max(exc.retry_after or 0.0, random.uniform(0, 0.5))
        if on_wait is not None and first_wait >= LONG_WAIT:
            on_wait(first_wait, str(exc))
    await asyncio.sleep(first_wait)
    async for retry in AsyncRetrying(stop=stop_after_attempt(max_retries), wait=_backoff,
                                     retry=retry_if_exception(_retryable), reraise=True,
                                     before_sleep=lambda state: _announce(on_wait, state)):
        with retry:
            try:
                return await _attempt(fn, arg, limiter, estimate, tokens)
            except BackendError as exc:
                raise _capped(exc, limiter.max_retry_after) from None
    raise AssertionError("unreachable")


LONG_WAIT = 3.0  # seconds: a retry's wait at least this long shows in the progress


def _capped(exc: BackendError, cap: float) -> BackendError:
    """`exc`, made final when the server asks for a wait above `cap` (its message and status kept)."""
    if exc.retryable and exc.retry_after is not None and exc.retry_after > cap:
        exc.retryable = False
        exc.args = (f"{exc} (Retry-After {exc.retry_after:,.0f}s is above max_retry_after {cap:g}s: "
                    "not retried)",)
    return exc


def _announce(on_wait: Callable[[float, str], None] | None, state: Any) -> None:
    """tenacity's before_sleep: tell `on_wait` of a long wait before the next try."""
    if on_wait is not None and state.next_action is not None and state.next_action.sleep >= LONG_WAIT:
        on_wait(state.next_action.sleep, str(state.outcome.exception()))


async def _attempt(fn: Callable[[A], Awaitable[T]], arg: A, limiter: Limiter, estimate: float,
                   tokens: Callable[[T], float] | None) -> T:
    if not limiter.try_acquire(estimate):
        await limiter.acquire(estimate)
    try:
        result = await fn(arg)
    except BackendError as exc:
        limiter.release(ok=False, throttled=exc.status == 429, estimated=estimate, used=estimate)
        raise
    except BaseException:
        limiter.release(ok=False, estimated=estimate, used=estimate)
        raise
    limiter.release(ok=True, estimated=estimate, used=tokens(result) if tokens else None)
    return result
