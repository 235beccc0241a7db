"""A small circuit breaker around Redis: after a failure, claims fail fast with 503 for a
short cool-down instead of each waiting on a dead socket; the next call afterwards probes."""

from __future__ import annotations

import time
from collections.abc import Callable

COOL_DOWN_S = 0.25


class RedisHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_until = 0.0
        self.scripts_loaded = False

    def failed(self) -> None:
        self._down_until = self._clock() + COOL_DOWN_S

    def ok(self) -> None:
        self._down_until = 0.0

    @property
    def cooling_down(self) -> bool:
        return self._clock() < self._down_until
