"""Throughput control per model: a concurrency limit that adapts, and rate budgets.

One `Limiter` per model, shared by every stage of a run. Every attempt at a
call (first tries and retries alike) passes through it:

- concurrency adapts like TCP's AIMD: a 429 halves the limit (at most once a
  second, so a burst of 429s from one overload counts once), and it grows back
  by one after `limit` successes, never above `max_concurrency`;
- `Retry-After` is honoured by the retry of the request that got it (the runner
  waits at least that long); it does not stop the other requests, because
  fault-injection runs showed a global pause turning a 10% 429 rate into a crawl;
- `rpm` and `tpm` budgets are token buckets refilled continuously (a minute's
  budget, spread over the minute); a request's tokens are estimated before the
  call (prompt characters / 4 + max_tokens) and settled with the real usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque


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


MAX_RETRY_AFTER = 120.0  # seconds
CUT_INTERVAL = 1.0  # seconds between two halvings of the limit


class Limiter:
    """Admission for one model's calls. Single-threaded asyncio: no locks, a queue of waiter futures.

    A release wakes as many waiters as there are free slots; a woken waiter checks
    again (a budget may still hold it back) and queues again if it lost the slot.
    A budget is waited out with a sleep of exactly its length.
    """

    def __init__(self, max_concurrency: int, rpm: float | None = None, tpm: float | None = None,
                 max_retry_after: float | None = None) -> None:
        self.ceiling = max(1, max_concurrency)
        # The longest Retry-After the runner waits out; past it the call fails (the openai SDK's cap).
        self.max_retry_after = MAX_RETRY_AFTER if max_retry_after is None else max_retry_after
        self.limit = self.ceiling
        self.active = 0
        self._successes = 0
        self._last_cut = -1e9
        self._requests = _Bucket(rpm) if rpm else None
        self._tokens = _Bucket(tpm) if tpm else None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.throttled = 0  # how many 429s were seen, for the run's accounting

    @property
    def budgets_tokens(self) -> bool:
        return self._tokens is not None

    def try_acquire(self, tokens: float = 0.0) -> bool:
        """Take a slot now if one is free and no budget holds it back (the hot path, no await)."""
        if self.active >= self.limit or self._waiters:
            return False
        if self._requests is not None and self._requests.wait_time(1) > 0:
            return False
        if self._tokens is not None and tokens and self._tokens.wait_time(tokens) > 0:
            return False
        self.active += 1
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None and tokens:
            self._tokens.take(tokens)
        return True

    async def acquire(self, tokens: float = 0.0) -> None:
        while True:
            wait = 0.0
            if self._requests is not None:
                wait = max(wait, self._requests.wait_time(1))
            if self._tokens is not None and tokens:
                wait = max(wait, self._tokens.wait_time(tokens))
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.active < self.limit:
                self.active += 1  # no await between the check and the take
                if self._requests is not None:
                    self._requests.take(1)
                if self._tokens is not None and tokens:
                    self._tokens.take(tokens)
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():  # cancelled while queued
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def release(self, *, ok: bool, throttled: bool = False, estimated: float = 0.0,
                used: float | None = None) -> None:
        self.active -= 1
        if ok and not self._waiters and self.limit == self.ceiling and self._tokens is None:
            return  # the hot path: nothing to settle, nobody to wake
        if self._tokens is not None and used is not None:
            self._tokens.take(used - estimated)
        if throttled:
            self.throttled += 1
            now = time.monotonic()
            if now - self._last_cut >= CUT_INTERVAL:
                self.limit = max(1, self.limit // 2)
                self._successes = 0
                self._last_cut = now
        elif ok and self.limit < self.ceiling:
            self._successes += 1
            if self._successes >= self.limit:
                self.limit += 1
                self._successes = 0
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
