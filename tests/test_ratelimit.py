"""gateway.admission.ratelimit: GCRA maths on an injected clock, bounded memory, and the
RateLimit / RateLimit-Policy fields."""

from __future__ import annotations

import math
import random
import re

import pytest

from gateway.admission.ratelimit import Decision, Gcra, ratelimit_headers


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# RFC 9651 Item: sf-string bare item, then parameters key=integer (all this module emits).
SF_ITEM = re.compile(
    r'^(?P<name>"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*")'
    r"(?P<params>(?:;[a-z*][a-z0-9_.*-]*=-?[0-9]{1,15})*)$"
)
SF_PARAM = re.compile(r";([a-z*][a-z0-9_.*-]*)=(-?[0-9]{1,15})")


def parse_item(value: str) -> tuple[str, dict[str, int]]:
    m = SF_ITEM.match(value)
    assert m, f"not a structured-field item: {value!r}"
    name = re.sub(r"\\(.)", r"\1", m["name"][1:-1])
    return name, {k: int(v) for k, v in SF_PARAM.findall(m["params"])}


def test_allows_exactly_burst_then_rate() -> None:
    clock = FakeClock()
    g = Gcra(10, 5, clock=clock)
    first = [g.check("u") for _ in range(5)]
    assert all(d.allowed for d in first)
    assert [d.remaining for d in first] == [4, 3, 2, 1, 0]
    assert not g.check("u").allowed
    # Then exactly the rate: one request every millisecond for one second gets 10 through.
    allowed = 0
    for _ in range(1000):
        clock.advance(0.001)
        allowed += g.check("u").allowed
    assert allowed == 10


def test_retry_after_is_exact_and_refusals_cost_nothing() -> None:
    clock = FakeClock()
    g = Gcra(2, 3, clock=clock)
    for _ in range(3):
        assert g.check("u").allowed
    refused = g.check("u")
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.retry_after_s == refused.reset_s == pytest.approx(0.5)
    # Hammering while refused does not push the next allowed time further out.
    for _ in range(1000):
        assert g.check("u").retry_after_s == pytest.approx(0.5)
    clock.advance(0.5 - 1e-4)
    almost = g.check("u")
    assert not almost.allowed
    assert almost.retry_after_s == pytest.approx(1e-4)
    clock.advance(1e-4)
    ok = g.check("u")
    assert ok.allowed and ok.remaining == 0 and ok.retry_after_s == 0.0
    assert ok.reset_s == pytest.approx(0.5)  # next unit of quota in one emission interval


def test_recovers_full_burst_after_idle() -> None:
    clock = FakeClock()
    g = Gcra(5, 4, clock=clock)
    while g.check("u").allowed:
        pass
    clock.advance(0.4)  # 2 units back, not 4
    assert [g.check("u").allowed for _ in range(3)] == [True, True, False]
    clock.advance(4 / 5)  # burst / rate: completely refilled
    got = [g.check("u") for _ in range(5)]
    assert [d.allowed for d in got] == [True, True, True, True, False]
    assert got[0].remaining == 3


def test_keys_are_independent() -> None:
    clock = FakeClock()
    g = Gcra(1, 2, clock=clock)
    assert [g.check("a").allowed for _ in range(3)] == [True, True, False]
    assert [g.check("b").allowed for _ in range(3)] == [True, True, False]
    clock.advance(1.0)
    assert g.check("a").allowed
    assert not g.check("a").allowed
    assert g.check("b").allowed


def test_memory_stays_bounded_under_a_million_distinct_keys() -> None:
    clock = FakeClock()
    g = Gcra(10, 5, max_keys=10_000, clock=clock)
    check = g.check
    allowed = 0
    biggest = 0
    for i in range(1_000_000):
        clock.t += 1e-6
        allowed += check(f"k{i}").allowed
        if i % 4096 == 0:
            biggest = max(biggest, len(g))
    assert allowed == 1_000_000  # a fresh key is never refused, whatever was evicted
    assert biggest <= 10_000 and len(g) == 10_000
    clock.advance(1.0)  # every TAT is now in the past: sweeping empties the table
    for _ in range(1_000):
        check("late")
    assert len(g) <= 1


def test_expired_keys_are_swept_before_the_bound_is_needed() -> None:
    clock = FakeClock()
    g = Gcra(1000, 1, clock=clock)  # a key's state lives 1 ms; keys arrive every 1 µs
    worst = 0
    for i in range(100_000):
        clock.t += 1e-6
        g.check(str(i))
        worst = max(worst, len(g))
    assert worst <= 1_000 + 128  # live keys plus one sweep period of lag


def test_eviction_never_admits_less_than_the_exact_limiter() -> None:
    rng = random.Random(4)
    clock = FakeClock()
    bounded = Gcra(5, 3, max_keys=8, clock=clock)
    exact = Gcra(5, 3, max_keys=10**6, clock=clock)
    got_bounded: dict[str, int] = {}
    got_exact: dict[str, int] = {}
    for _ in range(50_000):
        clock.advance(rng.expovariate(400))
        key = f"k{rng.randrange(40)}"
        b, e = bounded.check(key), exact.check(key)
        got_bounded[key] = got_bounded.get(key, 0) + b.allowed
        got_exact[key] = got_exact.get(key, 0) + e.allowed
        assert got_bounded[key] >= got_exact[key], key
    assert len(bounded) <= 8
    assert sum(got_bounded.values()) > sum(got_exact.values())  # eviction did happen


def test_headers_are_well_formed_structured_fields() -> None:
    clock = FakeClock()
    g = Gcra(10, 10, clock=clock)
    d = g.check("u")
    h = ratelimit_headers("per-user", 10, 1, d)
    assert set(h) == {"RateLimit-Policy", "RateLimit"}
    assert h["RateLimit-Policy"] == '"per-user";q=10;w=1'
    assert parse_item(h["RateLimit-Policy"]) == ("per-user", {"q": 10, "w": 1})
    name, params = parse_item(h["RateLimit"])
    assert name == "per-user" and params == {"r": 9, "t": 1}

    for _ in range(9):
        g.check("u")
    refused = g.check("u")
    assert not refused.allowed
    h = ratelimit_headers("per-user", 10, 1, refused)
    assert h["RateLimit"] == '"per-user";r=0;t=1'
    # t never ends after the Retry-After a caller derives the usual way (max(1, ceil)).
    slow = Decision(False, 0, 2.3, 2.3)
    _, params = parse_item(ratelimit_headers("per-ip", 30, 60, slow)["RateLimit"])
    assert params["t"] == max(1, math.ceil(slow.retry_after_s)) == 3


def test_header_policy_names_are_escaped_and_validated() -> None:
    d = Decision(True, 1, 0.0, 0.2)
    h = ratelimit_headers('odd"name\\', 2, 1, d)
    assert h["RateLimit-Policy"] == '"odd\\"name\\\\";q=2;w=1'
    assert parse_item(h["RateLimit-Policy"])[0] == 'odd"name\\'
    with pytest.raises(ValueError):
        ratelimit_headers("pér-user", 1, 1, d)
    with pytest.raises(ValueError):
        ratelimit_headers("per-user", 1, 0, d)  # the draft forbids a zero window
    with pytest.raises(ValueError):
        ratelimit_headers("per-user", 10**16, 1, d)


def test_rejects_nonsense_configuration() -> None:
    for rate, burst, keys in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError):
            Gcra(rate, burst, max_keys=keys)
