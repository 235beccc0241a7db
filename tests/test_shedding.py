"""gateway.admission.shedding: concurrency limit, bounded FIFO with deadlines, CoDel-like
overload mode and cancellation safety, on a real event loop with an injected clock."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable

import pytest

from gateway.admission.shedding import ConcurrencyLimiter
from gateway.errors import Overloaded


class FakeClock:
    def __init__(self, t: float = 500.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


async def until(cond: Callable[[], bool]) -> None:
    """Let the loop run until `cond` holds (fails after one real second)."""
    end = time.monotonic() + 1.0
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0)


async def queued(lim: ConcurrencyLimiter, n: int) -> None:
    await until(lambda: lim.queued == n)


def waiter(lim: ConcurrencyLimiter, deadline: float | None = None) -> asyncio.Task[None]:
    return asyncio.create_task(lim.acquire(deadline))


async def test_limit_holds_under_a_thousand_concurrent_acquirers() -> None:
    lim = ConcurrencyLimiter(10, queue_max=1000, max_wait_s=30, clock=FakeClock())
    active = peak = done = 0

    async def work() -> None:
        nonlocal active, peak, done
        async with lim.slot():
            active += 1
            peak = max(peak, active)
            assert lim.in_use <= 10
            for _ in range(3):
                await asyncio.sleep(0)
            active -= 1
        done += 1

    await asyncio.gather(*(work() for _ in range(1000)))
    assert done == 1000 and peak == 10
    assert (lim.in_use, lim.queued, lim.shed_total) == (0, 0, 0)


async def test_waiters_are_served_first_come_first_served() -> None:
    lim = ConcurrencyLimiter(1, queue_max=50, clock=FakeClock())
    await lim.acquire()
    order: list[int] = []

    async def one(i: int) -> None:
        async with lim.slot():
            order.append(i)

    tasks = []
    for i in range(20):
        tasks.append(asyncio.create_task(one(i)))
        await queued(lim, i + 1)
    lim.release()
    await asyncio.gather(*tasks)
    assert order == list(range(20))
    assert (lim.in_use, lim.queued) == (0, 0)


async def test_full_queue_sheds_at_once() -> None:
    lim = ConcurrencyLimiter(1, queue_max=3, retry_after_s=2, clock=FakeClock())
    await lim.acquire()
    tasks = [waiter(lim) for _ in range(3)]
    await queued(lim, 3)
    started = time.perf_counter()
    with pytest.raises(Overloaded) as exc:
        await lim.acquire()
    assert time.perf_counter() - started < 0.010
    assert exc.value.status == 503 and exc.value.code == "overloaded"
    assert exc.value.retry_after == 2
    assert lim.shed_by_reason["queue_full"] == 1 and lim.queued == 3
    for _ in range(4):
        lim.release()
    await asyncio.gather(*tasks)
    assert lim.in_use == 0


async def test_deadline_expiry_sheds_and_frees_the_position() -> None:
    clock = FakeClock()
    lim = ConcurrencyLimiter(1, queue_max=1, max_wait_s=30, clock=clock)
    await lim.acquire()
    with pytest.raises(Overloaded):  # a deadline already past: no queueing at all
        await lim.acquire(deadline=clock() - 1)
    started = time.perf_counter()
    with pytest.raises(Overloaded):  # waits 20 ms of its own deadline, then is shed
        await lim.acquire(deadline=clock() + 0.02)
    assert 0.015 < time.perf_counter() - started < 0.5
    assert lim.queued == 0 and lim.shed_by_reason == {
        "queue_full": 0,
        "deadline": 1,
        "timeout": 1,
    }
    late = waiter(lim)  # the freed position takes a new waiter
    await queued(lim, 1)
    lim.release()
    await late
    assert lim.in_use == 1


async def test_a_shed_waiter_leaves_no_reference_cycle() -> None:
    """Freed by reference counting alone: under overload thousands are shed a second, and
    cyclic garbage holding their requests would pile up into a collection pausing the
    worker for tens of ms."""
    lim = ConcurrencyLimiter(1, queue_max=1, max_wait_s=0.01, target_s=0.01)
    await lim.acquire()
    gc.collect()
    gc.disable()
    try:
        try:
            await lim.acquire()
        except Overloaded as e:
            shed = weakref.ref(e)
        await asyncio.sleep(0)  # the loop lets go of the callback that woke this task
        assert shed() is None
    finally:
        gc.enable()


async def test_a_waiter_past_its_deadline_never_gets_the_slot() -> None:
    clock = FakeClock()
    lim = ConcurrencyLimiter(1, queue_max=10, max_wait_s=30, clock=clock)
    await lim.acquire()
    gone = waiter(lim, deadline=clock() + 5)  # 5 s on the limiter's clock
    fresh = waiter(lim)
    await queued(lim, 2)
    clock.advance(6)  # the deadline passes before its (real-time) timer fires
    lim.release()
    with pytest.raises(Overloaded):
        await gone
    await fresh  # the slot skipped the expired waiter
    assert (lim.in_use, lim.queued, lim.shed_total) == (1, 0, 1)


async def test_sustained_overload_shortens_waits_then_recovers() -> None:
    clock = FakeClock()
    lim = ConcurrencyLimiter(
        1, queue_max=100, max_wait_s=30, target_s=0.01, interval_s=0.1, clock=clock
    )
    await lim.acquire()

    async def served_after(wait: float) -> None:
        t = waiter(lim)
        await queued(lim, 1)
        clock.advance(wait)
        lim.release()
        await t

    await served_after(0.05)  # above target: the stretch starts
    assert not lim.overloaded
    await served_after(0.05)  # still above, but for less than one interval
    assert not lim.overloaded
    await served_after(0.06)  # above target for a whole interval
    assert lim.overloaded

    # Overloaded: a new arrival only gets target_s (10 ms), not max_wait_s (30 s).
    started = time.perf_counter()
    with pytest.raises(Overloaded):
        await lim.acquire()
    assert time.perf_counter() - started < 0.5
    t = waiter(lim)  # the same for a waiter whose 10 ms run out on the limiter's clock
    await queued(lim, 1)
    clock.advance(0.02)
    with pytest.raises(Overloaded):
        await t
    assert lim.overloaded  # shed waiters keep the overload going
    assert lim.shed_by_reason["timeout"] == 2

    clock.advance(0.1)  # one interval with no sojourn at target: back to normal
    assert not lim.overloaded
    t = waiter(lim)
    await queued(lim, 1)
    clock.advance(0.02)  # would have been shed in overload mode
    lim.release()
    await t
    lim.release()
    assert lim.in_use == 0


async def test_an_empty_queue_ends_overload_at_once() -> None:
    clock = FakeClock()
    lim = ConcurrencyLimiter(1, target_s=0.01, interval_s=0.1, max_wait_s=30, clock=clock)
    await lim.acquire()
    for wait in (0.05, 0.1):
        t = waiter(lim)
        await queued(lim, 1)
        clock.advance(wait)
        lim.release()
        await t
    assert lim.overloaded
    lim.release()
    await lim.acquire()  # no queue, free slot: sojourn 0
    assert not lim.overloaded
    lim.release()


async def test_cancelled_waiter_leaves_no_trace() -> None:
    lim = ConcurrencyLimiter(1, queue_max=10, clock=FakeClock())
    await lim.acquire()
    t = waiter(lim)
    await queued(lim, 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert (lim.in_use, lim.queued) == (1, 0)
    lim.release()
    assert lim.in_use == 0


async def test_cancelled_after_being_served_hands_the_slot_on() -> None:
    lim = ConcurrencyLimiter(1, queue_max=10, clock=FakeClock())
    await lim.acquire()
    first, second = waiter(lim), waiter(lim)
    await queued(lim, 2)
    lim.release()  # the slot goes to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert (lim.in_use, lim.queued) == (1, 0)
    lim.release()
    assert lim.in_use == 0


async def test_cancellation_through_a_caller_timeout() -> None:
    lim = ConcurrencyLimiter(2, queue_max=100, clock=FakeClock())
    await lim.acquire()
    await lim.acquire()
    tasks = [asyncio.create_task(asyncio.wait_for(lim.acquire(), 0.01)) for _ in range(50)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert (lim.in_use, lim.queued) == (2, 0)
    lim.release()
    lim.release()
    assert lim.in_use == 0


async def test_raising_the_limit_serves_waiters() -> None:
    lim = ConcurrencyLimiter(1, queue_max=10, clock=FakeClock())
    await lim.acquire()
    tasks = [waiter(lim) for _ in range(3)]
    await queued(lim, 3)
    lim.limit = 3
    await asyncio.gather(tasks[0], tasks[1])
    assert (lim.in_use, lim.queued) == (3, 1)
    lim.release()
    await tasks[2]
    assert lim.in_use == 3


def test_release_without_acquire_is_an_error() -> None:
    lim = ConcurrencyLimiter(1)
    with pytest.raises(RuntimeError):
        lim.release()

