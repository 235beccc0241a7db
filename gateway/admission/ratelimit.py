"""Per-key request rate limits (GCRA) kept in worker memory, bounded in size, and the
`RateLimit` / `RateLimit-Policy` response fields that describe them. Approximate and local:
it protects capacity; the invariants (stock, identity limits) live in Redis."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

# Float slack when comparing times: rate maths in seconds accumulates rounding error, and
# a request arriving exactly on its theoretical time must be allowed.
_EPS = 1e-9
# Expired keys are swept every _SWEEP_EVERY checks, at most _SWEEP_MAX per sweep, so the
# work per check stays constant however many keys expire at once.
_SWEEP_EVERY = 64
_SWEEP_MAX = 1024
_SF_INT_MAX = 999_999_999_999_999  # RFC 9651 §3.3.1: at most 15 digits


class Decision(NamedTuple):
    """One answer of the limiter.

    `remaining`: requests allowed right now after this one. `retry_after_s`: seconds until
    a refused request would be allowed (0 when allowed). `reset_s`: seconds until one more
    unit of quota is available, which is what the draft's `t` parameter conveys.
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_s: float


class Gcra:
    """Generic cell rate algorithm per key: `burst` requests at once, then `rate_per_s`.

    State is one theoretical arrival time (TAT) per key. A key whose TAT is in the past
    carries no information (a fresh key behaves the same), so it is dropped; and when
    `max_keys` is reached, the least recently admitted keys are forgotten. Forgetting only
    ever resets a key to "full quota", so bounding memory can over-admit a little, never
    refuse a request the exact limiter would have allowed.
    """

    __slots__ = ("_burst", "_checks", "_clock", "_interval", "_max_keys", "_tat", "_tau")

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._interval = 1.0 / rate_per_s  # emission interval T
        self._burst = burst
        self._tau = burst * self._interval  # how far TAT may run ahead of now (burst * T)
        self._max_keys = max_keys
        self._clock = clock
        # key -> TAT, ordered by last admission (refusals do not change the TAT)
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._checks = 0

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: str) -> Decision:
        """Count one request of `key` if it conforms; say how it stands either way."""
        now = self._clock()
        self._checks += 1
        if self._checks >= _SWEEP_EVERY:
            self._checks = 0
            self._sweep(now)
        tats = self._tat
        tat = tats.get(key)
        base = now if tat is None or tat < now else tat
        new_tat = base + self._interval
        allow_at = new_tat - self._tau
        if allow_at - now > _EPS:
            wait = allow_at - now
            return Decision(False, 0, wait, wait)
        if tat is None:
            if len(tats) >= self._max_keys:
                tats.popitem(last=False)
            tats[key] = new_tat
        else:
            tats[key] = new_tat
            tats.move_to_end(key)
        slack = now - allow_at  # seconds of quota still unused, >= 0
        remaining = min(self._burst - 1, int(slack / self._interval + _EPS))
        reset = (remaining + 1) * self._interval - slack
        return Decision(True, remaining, 0.0, max(reset, 0.0))

    def _sweep(self, now: float) -> None:
        # Keys are ordered by last admission and an admission sets TAT > now, so the
        # oldest entries are the likeliest to have expired; stop at the first live one.
        tats = self._tat
        for _ in range(_SWEEP_MAX):
            if not tats:
                return
            key, tat = next(iter(tats.items()))
            if tat > now:
                return
            del tats[key]


def _sf_string(value: str) -> str:
    """Serialise an RFC 9651 String: printable ASCII, with `"` and `\\` escaped."""
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in value):
        raise ValueError(f"policy name must be printable ASCII: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sf_int(value: int, name: str) -> int:
    if not 0 <= value <= _SF_INT_MAX:
        raise ValueError(f"{name} out of range for a structured-field integer: {value}")
    return value


def ratelimit_headers(policy_name: str, limit: int, window_s: int, d: Decision) -> dict[str, str]:
    """The `RateLimit-Policy` and `RateLimit` fields for one policy and one decision.

    Syntax of draft-ietf-httpapi-ratelimit-headers-11 (May 2026; unchanged from -10):
    both fields are Structured-Field Lists of String Items with parameters,
        RateLimit-Policy: "per-user";q=10;w=1      q = quota, w = window in seconds (> 0)
        RateLimit: "per-user";r=0;t=1              r = available quota, t = seconds until
                                                   more quota is available
    `t` is rounded up, the way Retry-After is, so a refused response's Retry-After (set by
    the caller from `retry_after_s`) is never earlier than the end of `t` (draft §6).
    """
    if window_s < 1:
        raise ValueError("window_s must be >= 1 (the draft forbids a zero window)")
    name = _sf_string(policy_name)
    q = _sf_int(limit, "limit")
    w = _sf_int(window_s, "window_s")
    r = _sf_int(d.remaining, "remaining")
    t = _sf_int(max(1, math.ceil(round(d.reset_s, 6))), "reset")
    return {
        "RateLimit-Policy": f"{name};q={q};w={w}",
        "RateLimit": f"{name};r={r};t={t}",
    }
