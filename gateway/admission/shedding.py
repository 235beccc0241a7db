"""In-process concurrency limit with a short, bounded FIFO of waiters in front of Redis.

Each waiter has a deadline; a waiter past it is shed and never served. Under sustained
overload (CoDel-like) new arrivals only get `target_s` to wait, so excess load is shed fast
instead of queueing; a shed request gets `Overloaded` (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.errors import Overloaded


class _Waiter:
    __slots__ = ("enqueued", "fut", "timer", "until")

    def __init__(self, fut: asyncio.Future[None], enqueued: float, until: float) -> None:
        self.fut = fut
        self.enqueued = enqueued
        self.until = until  # deadline on the limiter's clock
        self.timer: asyncio.TimerHandle | None = None


class ConcurrencyLimiter:
    """At most `limit` holders; up to `queue_max` waiters served first come, first served.

    Deadlines and `target_s`/`interval_s` are on the injected `clock`. A waiter waits at
    most `max_wait_s` (or `target_s` while overloaded), and never past its own `deadline`.

    Overload, after CoDel (Nichols & Jacobson, RFC 8289): sojourn time is observed when a
    waiter leaves the queue (served or shed). When it has stayed at or above `target_s`
    for a whole `interval_s`, the limiter is overloaded. It returns to normal when an
    arrival finds no queue and a free slot, or when no sojourn has reached `target_s` for
    an `interval_s` (a waiter shed after a wait of `target_s` or more counts as reaching it,
    so a steady stream of short-wait sheds keeps the overload mode on).
    """

    def __init__(
        self,
        limit: int,
        *,
        queue_max: int = 256,
        max_wait_s: float = 1.0,
        target_s: float = 0.05,
        interval_s: float = 0.5,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or queue_max < 0:
            raise ValueError("limit must be >= 1 and queue_max >= 0")
        if not (0 < target_s <= max_wait_s and interval_s > 0):
            raise ValueError("need 0 < target_s <= max_wait_s and interval_s > 0")
        self._limit = limit
        self.queue_max = queue_max
        self.max_wait_s = max_wait_s
        self.target_s = target_s
        self.interval_s = interval_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._in_use = 0
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        self._overloaded = False
        self._first_above: float | None = None  # start of the current above-target stretch
        self._last_above = float("-inf")
        self.shed_total = 0
        self.shed_by_reason: dict[str, int] = {"queue_full": 0, "deadline": 0, "timeout": 0}

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        """Change the limit live; raising it serves waiters at once."""
        if value < 1:
            raise ValueError("limit must be >= 1")
        self._limit = value
        now = self._clock()
        while self._in_use < self._limit and self._grant_next(now):
            self._in_use += 1

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def overloaded(self) -> bool:
        return self._refresh(self._clock())

    def try_acquire(self) -> bool:
        """Take a free slot without waiting (no coroutine: the hot path), or say there is none."""
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            self._overloaded = False  # no standing queue at all
            self._first_above = None
            return True
        return False

    async def acquire(self, deadline: float | None = None) -> None:
        """Take a slot, waiting in line if needed; raise `Overloaded` when shed.

        `deadline` is an absolute time on the limiter's clock after which the caller no
        longer wants the slot (its client has given up). One already past is shed at
        once; without one, only `max_wait_s` (or `target_s` when overloaded) bounds the wait.
        """
        if self.try_acquire():
            return
        now = self._clock()
        until = now + (self.target_s if self._refresh(now) else self.max_wait_s)
        if deadline is not None and deadline < until:
            until = deadline
        if until <= now:
            raise self._shed("deadline", "the request's deadline has passed")
        if len(self._waiters) >= self.queue_max:
            raise self._shed("queue_full", "too many requests waiting")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(fut, now, until)
        waiter.timer = loop.call_later(until - now, self._expire, waiter)
        self._waiters[waiter] = None
        try:
            await fut
        except BaseException:
            waiter.timer.cancel()
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Served, then cancelled before it could run: hand the slot on.
                self.release()
            else:
                self._waiters.pop(waiter, None)
            raise
        else:
            waiter.timer.cancel()
        finally:
            # A shed waiter's future holds the exception, whose traceback holds this frame:
            # without this, that cycle keeps the request and its frames alive until a
            # cyclic collection, a pause of tens of ms when thousands are shed.
            del fut, waiter

    def release(self) -> None:
        """Give a slot back; the oldest waiter still within its deadline gets it."""
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        if not self._grant_next(self._clock()):
            self._in_use -= 1

    @asynccontextmanager
    async def slot(self, deadline: float | None = None) -> AsyncIterator[None]:
        await self.acquire(deadline)
        try:
            yield
        finally:
            self.release()

    def _grant_next(self, now: float) -> bool:
        """Hand one slot to the oldest live waiter; False when nobody is waiting."""
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.fut.done():  # cancelled, its task has not cleaned up yet
                continue
            if now >= waiter.until:  # deadline passed before its timer fired
                self._fail(waiter, now)
                continue
            self._observe(now - waiter.enqueued, now)
            waiter.fut.set_result(None)
            return True
        return False

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.fut.done() or waiter not in self._waiters:
            return
        del self._waiters[waiter]
        self._fail(waiter, self._clock())

    def _fail(self, waiter: _Waiter, now: float) -> None:
        # A shed waiter waited at least its whole budget (the timer may run ahead of the
        # clock). That is a lower bound: it shows sojourn above target only if the budget
        # reached target, and says nothing otherwise.
        sojourn = max(now - waiter.enqueued, waiter.until - waiter.enqueued)
        if sojourn >= self.target_s:
            self._observe(sojourn, now)
        waiter.fut.set_exception(self._shed("timeout", "waited too long for capacity"))

    def _shed(self, reason: str, detail: str) -> Overloaded:
        self.shed_total += 1
        self.shed_by_reason[reason] += 1
        return Overloaded(f"Overloaded: {detail}", retry_after=self.retry_after_s)

    def _observe(self, sojourn: float, now: float) -> None:
        if sojourn < self.target_s:
            self._first_above = None
            return
        self._last_above = now
        if self._first_above is None:
            self._first_above = now
        elif now - self._first_above >= self.interval_s:
            self._overloaded = True

    def _refresh(self, now: float) -> bool:
        if self._overloaded and now - self._last_above >= self.interval_s:
            self._overloaded = False
            self._first_above = None
        return self._overloaded
