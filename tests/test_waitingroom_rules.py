"""The waiting room's pure rules: the serving counter and its cap, keyed shuffle scores,
and tickets bound to their owner."""

from __future__ import annotations

from gateway.admission.waitingroom import (
    ADMIT_WINDOW_MS,
    SHUFFLED,
    RoomCache,
    admission_limit,
    make_ticket,
    read_ticket,
    serving,
    shuffle_score,
)

KEY = b"k" * 32


def test_serving_advances_at_the_rate_from_the_start() -> None:
    start = 1_000_000
    assert serving(start, start - 1, 10, 5) == 0
    assert serving(start, start, 10, 5) == 5
    assert serving(start, start + 1000, 10, 5) == 15


def test_no_more_turns_open_than_units_left() -> None:
    start = 1_000_000
    # 100 s in at 10/s: 1,005 positions served, but only 20 units were ever there
    assert admission_limit(start, start + 100_000, 10, 5, claimed=0, remaining=20) == (
        serving(start, start + 100_000 - ADMIT_WINDOW_MS, 10, 5) + 20)
    assert admission_limit(start, start + 1000, 10, 5, claimed=3, remaining=2) == 5
    assert admission_limit(start, start + 1000, 10, 5, claimed=0, remaining=0) == 0


def test_shuffle_scores_are_keyed_and_below_the_fifo_range() -> None:
    a = [shuffle_score(KEY, "c", f"u{i}") for i in range(1000)]
    assert all(0 <= s < SHUFFLED for s in a)
    assert len(set(a)) == 1000
    assert a != sorted(a)  # not arrival order
    assert shuffle_score(b"x" * 32, "c", "u1") != a[1]


def test_tickets_belong_to_their_owner() -> None:
    t = make_ticket(KEY, "c", "alice", 42)
    assert read_ticket(KEY, "c", "alice", t) == 42
    assert read_ticket(KEY, "c", "bob", t) is None
    assert read_ticket(KEY, "d", "alice", t) is None
    assert read_ticket(b"y" * 32, "c", "alice", t) is None
    assert read_ticket(KEY, "c", "alice", "43." + t.split(".")[1]) is None
    for garbage in ("", ".", "x.y", "٤٢." + t.split(".")[1], "9" * 40 + ".00"):
        assert read_ticket(KEY, "c", "alice", garbage) is None


def test_cache_positions() -> None:
    cache = RoomCache()
    cache.update("c", [30, 10, 20])
    assert [cache.position("c", s) for s in (10, 20, 30, 25)] == [0, 1, 2, 2]
    assert cache.position("other", 5) == 0
