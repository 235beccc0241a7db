"""A worker's memory of its recent winners: what it knows, and that it stays bounded."""

from __future__ import annotations

from gateway.winners import Winners


def test_grants_add_up_and_a_limit_answer_replaces_them() -> None:
    w = Winners()
    assert not w.any_in("c1") and w.seqs("c1", "u") == ()
    w.granted("c1", "u", 7)
    w.granted("c1", "u", 7)  # a replay of the same grant
    w.granted("c1", "u", 9)
    assert w.any_in("c1") and w.seqs("c1", "u") == (7, 9) and len(w) == 1
    w.holds("c1", "u", (3, 7, 9))  # Redis's whole list
    assert w.seqs("c1", "u") == (3, 7, 9) and w.seqs("c2", "u") == ()


def test_bounded_it_starts_afresh() -> None:
    w = Winners(max_users=3)
    for i in range(3):
        w.granted("c1", f"u{i}", i)
    assert len(w) == 3
    w.granted("c1", "u0", 10)  # a known user does not grow it
    assert len(w) == 3
    w.granted("c2", "new", 1)
    assert len(w) == 1 and w.seqs("c2", "new") == (1,) and w.seqs("c1", "u0") == ()
