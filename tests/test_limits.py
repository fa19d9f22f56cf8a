from __future__ import annotations

import asyncio

import pytest

from retort import limits
from retort.limits import Limiter, _Bucket


def test_429_halves_the_limit_once_a_second_and_successes_grow_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])

    async def scenario() -> list[int]:
        lim = Limiter(8)
        seen = [lim.limit]

        async def throttled() -> None:
            await lim.acquire()
            lim.release(ok=False, throttled=True)

        await throttled()
        seen.append(lim.limit)
        await throttled()  # the same second: one overload, one cut
        seen.append(lim.limit)
        clock[0] += 1.5
        await throttled()
        seen.append(lim.limit)
        for _ in range(2):  # `limit` successes add one
            await lim.acquire()
            lim.release(ok=True)
        seen.append(lim.limit)
        for _ in range(100):
            await lim.acquire()
            lim.release(ok=True)
        seen.append(lim.limit)
        return seen

    assert asyncio.run(scenario()) == [8, 4, 4, 2, 3, 8]  # never above max_concurrency


def test_concurrency_never_exceeds_the_current_limit() -> None:
    async def scenario() -> tuple[int, int]:
        lim = Limiter(6)
        lim.limit = 2
        active, peak = 0, 0

        async def task() -> None:
            nonlocal active, peak
            await lim.acquire()
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            lim.release(ok=False)

        await asyncio.gather(*(task() for _ in range(20)))
        return peak, lim.active

    assert asyncio.run(scenario()) == (2, 0)


def test_waiters_are_woken_when_slots_free_up() -> None:
    async def scenario() -> list[int]:
        lim = Limiter(2)
        order: list[int] = []

        async def task(i: int) -> None:
            await lim.acquire()
            order.append(i)
            await asyncio.sleep(0.001)
            lim.release(ok=True)

        await asyncio.gather(*(task(i) for i in range(10)))
        return order

    assert sorted(asyncio.run(scenario())) == list(range(10))


def test_token_bucket_waits_for_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    bucket = _Bucket(per_minute=120)  # 2 per second, 120 of burst
    assert bucket.wait_time(100) == 0.0
    bucket.take(100)
    assert bucket.wait_time(30) == pytest.approx(5.0)  # 20 left, 10 more at 2/s
    clock[0] += 5.0
    assert bucket.wait_time(30) == 0.0
    bucket.take(500)  # a request that used more than estimated drives the level negative
    assert bucket.wait_time(1) > 200
