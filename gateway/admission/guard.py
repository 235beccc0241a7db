"""The worker's protective admission in front of Redis: per-user and per-IP request rates
(429 with RateLimit fields) and a concurrency limit with a bounded, deadline-aware queue
(503). Approximate and local by design: these protect capacity; invariants live in Redis."""

from __future__ import annotations

import math

from gateway.admission.ratelimit import Gcra, ratelimit_headers
from gateway.admission.shedding import ConcurrencyLimiter
from gateway.errors import Overloaded, TooManyRequests
from gateway.metrics import ADMISSION_REJECTED, REDIS_QUEUE
from gateway.settings import Settings


class Admission:
    def __init__(self, settings: Settings) -> None:
        s = settings
        self._user = Gcra(s.user_rate_per_s, s.user_burst) if s.user_rate_per_s > 0 else None
        self._ip = Gcra(s.ip_rate_per_s, s.ip_burst) if s.ip_rate_per_s > 0 else None
        self._policies = {
            "per-user": (s.user_burst, max(1, math.ceil(s.user_burst / (s.user_rate_per_s or 1)))),
            "per-ip": (s.ip_burst, max(1, math.ceil(s.ip_burst / (s.ip_rate_per_s or 1)))),
        }
        for reason in ("per-user", "per-ip", "shed"):
            ADMISSION_REJECTED.labels(reason)  # exported at 0
        self.slots = ConcurrencyLimiter(
            s.redis_inflight, queue_max=s.redis_queue, max_wait_s=s.redis_queue_wait_s
        )

    def check(self, user_id: str, ip: str) -> None:
        for name, limiter, key in (("per-user", self._user, user_id), ("per-ip", self._ip, ip)):
            if limiter is None or not key:
                continue
            d = limiter.check(key)
            if not d.allowed:
                ADMISSION_REJECTED.labels(name).inc()
                limit, window = self._policies[name]
                raise TooManyRequests(
                    f"Too many requests ({name}); retry after the Retry-After delay",
                    retry_after=d.retry_after_s,
                    headers=ratelimit_headers(name, limit, window, d),
                )

    async def wait_for_slot(self) -> None:
        """The slow path, when every Redis slot is taken: queue, or be shed (503)."""
        REDIS_QUEUE.inc()
        try:
            await self.slots.acquire()
        except Overloaded:
            ADMISSION_REJECTED.labels("shed").inc()
            raise
        finally:
            REDIS_QUEUE.dec()
