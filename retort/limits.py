"""Throughput control per model: a concurrency limit that adapts, and rate budgets.

One `Limiter` per model, shared by every stage of a run. Every attempt at a
call (first tries and retries alike) passes through it:

- concurrency adapts like TCP's AIMD: a 429 halves the limit, and it grows
  back by one after `limit` successes, never above `max_concurrency`;
- a `Retry-After` pauses every request to that model until it has passed;
- `rpm` and `tpm` budgets are token buckets refilled continuously (a minute's
  budget, spread over the minute); a request's tokens are estimated before the
  call (prompt characters / 4 + max_tokens) and settled with the real usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class _Bucket:
    """A token bucket holding at most one minute of budget (so a burst never exceeds the per-minute rate)."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, amount: float) -> float:
        self._refill()
        amount = min(amount, self.capacity)  # a request larger than the bucket waits for a full bucket
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount  # may go negative: settles a request that used more than estimated


class Limiter:
    def __init__(self, max_concurrency: int, rpm: float | None = None, tpm: float | None = None) -> None:
        self.ceiling = max(1, max_concurrency)
        self.limit = self.ceiling
        self.active = 0
        self.paused_until = 0.0
        self._successes = 0
        self._requests = _Bucket(rpm) if rpm else None
        self._tokens = _Bucket(tpm) if tpm else None
        self._changed = asyncio.Condition()
        self.throttled = 0  # how many 429s were seen, for the run's accounting
        self._waiting = 0

    @property
    def budgets_tokens(self) -> bool:
        return self._tokens is not None

    async def acquire(self, tokens: float = 0.0) -> None:
        # The hot path: no budgets, no pause, a free slot. No await between check and take.
        if (self._requests is None and self._tokens is None and self.active < self.limit
                and not self._waiting and time.monotonic() >= self.paused_until):
            self.active += 1
            return
        self._waiting += 1
        try:
            await self._acquire_slow(tokens)
        finally:
            self._waiting -= 1

    async def _acquire_slow(self, tokens: float) -> None:
        async with self._changed:
            while True:
                now = time.monotonic()
                wait = max(0.0, self.paused_until - now)
                if self._requests:
                    wait = max(wait, self._requests.wait_time(1))
                if self._tokens and tokens:
                    wait = max(wait, self._tokens.wait_time(tokens))
                if wait == 0.0 and self.active < self.limit:
                    break
                if wait == 0.0:
                    await self._changed.wait()  # a slot frees on release
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=wait)
            self.active += 1
            if self._requests:
                self._requests.take(1)
            if self._tokens and tokens:
                self._tokens.take(tokens)

    async def release(self, *, ok: bool, throttled: bool = False, retry_after: float | None = None,
                      estimated: float = 0.0, used: float | None = None) -> None:
        if not self._waiting and not throttled and not retry_after and self._tokens is None \
                and self.limit == self.ceiling:
            self.active -= 1  # the hot path: nobody to wake, nothing to adjust
            return
        async with self._changed:
            self.active -= 1
            if self._tokens and used is not None:
                self._tokens.take(used - estimated)
            if throttled:
                self.throttled += 1
                self.limit = max(1, self.limit // 2)
                self._successes = 0
            elif ok and self.limit < self.ceiling:
                self._successes += 1
                if self._successes >= self.limit:
                    self.limit += 1
                    self._successes = 0
            if retry_after:
                self.paused_until = max(self.paused_until, time.monotonic() + retry_after)
            self._changed.notify_all()
