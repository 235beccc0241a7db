"""Campaign-wide answers: what every caller of a campaign would hear right now (ended, sold
out, paused, not started, between rounds), decided from the worker's view and its cached
Redis clock, before anything about the caller is looked at."""

from __future__ import annotations

from gateway import errors
from gateway.domain import Rounds, from_ms, round_at
from gateway.errors import Problem
from gateway.http.room import uses_room
from gateway.redis.campaigns import CampaignState

# Pre-answer window questions from the cached Redis clock only this far from a boundary;
# nearer than that, the claim script decides on Redis TIME.
WINDOW_MARGIN_MS = 100


def next_drop(state: CampaignState, now_ms: int) -> int | None:
    rounds = state.spec.rounds
    return None if rounds is None else round_at(rounds, state.starts_ms, now_ms).next_ms


def campaign_wide(state: CampaignState, now_ms: int | None) -> Problem | None:
    """The answer every caller would get right now, if there is one. (A waiting-room
    campaign takes callers into its queue before the start instead of `not_started`.)"""
    cid = state.id
    past_end = now_ms is not None and now_ms >= state.ends_ms + WINDOW_MARGIN_MS
    if state.status == "ended" or past_end:
        return fixed_answer(cid, errors.Ended)
    if state.remaining <= 0:  # state.sold_out
        return fixed_answer(cid, errors.SoldOut)
    if state.status == "paused":
        return fixed_answer(cid, errors.Paused)
    if now_ms is not None and now_ms < state.starts_ms - WINDOW_MARGIN_MS and not uses_room(state):
        return not_started(cid, state.starts_ms, now_ms)
    if state.spec.rounds is not None and now_ms is not None and now_ms >= state.starts_ms:
        return between_rounds(state, state.spec.rounds, now_ms)
    return None


_FIXED = {errors.Ended: ("Campaign {} has ended", None),
          errors.SoldOut: ("Campaign {} is sold out", None),
          errors.Paused: ("Campaign {} is paused", 5)}
_fixed: dict[tuple[str, type[Problem]], Problem] = {}


def fixed_answer(cid: str, kind: type[Problem]) -> Problem:
    """Ended, sold out, paused: the same problem for every caller, made once per campaign
    (a release's sold-out wave asks for it tens of thousands of times a second)."""
    p = _fixed.get((cid, kind))
    if p is None:
        if len(_fixed) > 10_000:
            _fixed.clear()
        detail, retry_after = _FIXED[kind]
        p = _fixed[(cid, kind)] = kind(detail.format(cid), retry_after=retry_after)
    return p


def between_rounds(state: CampaignState, rounds: Rounds, now_ms: int) -> Problem | None:
    """A rounds campaign's answer for everyone: the round's window has closed, or its stock
    is gone (a later round still has stock, so never the campaign's `sold_out` flag) —
    both with Retry-After to the next drop. Only away from a boundary; nearer, Redis
    decides."""
    pos = round_at(rounds, state.starts_ms, now_ms)
    if pos.next_ms is not None and now_ms >= pos.next_ms - WINDOW_MARGIN_MS:
        return None
    closes = pos.opens_ms + rounds.open_ms
    if rounds.open_ms and now_ms >= closes + WINDOW_MARGIN_MS:
        if pos.next_ms is None:
            return errors.Ended(f"The last round of campaign {state.id} has closed")
        return next_round(state.id, pos.next_ms, now_ms)
    if state.round_sold_out(pos.idx) and pos.next_ms is not None:
        return round_sold_out(state.id, pos.idx, pos.next_ms, now_ms)
    return None


def next_round(cid: str, next_ms: int, now_ms: int) -> Problem:
    return errors.NotStarted(
        f"The next round of campaign {cid} starts in {(next_ms - now_ms) / 1000:.3f}s",
        retry_after=(next_ms - now_ms) / 1000, next_round_at=from_ms(next_ms))


def round_sold_out(cid: str, index: int, next_ms: int, now_ms: int) -> Problem:
    return errors.SoldOut(
        f"Round {index + 1} of campaign {cid} is sold out; the next round has stock",
        retry_after=(next_ms - now_ms) / 1000, next_round_at=from_ms(next_ms))


def not_started(cid: str, starts_ms: int, now_ms: int) -> Problem:
    return errors.NotStarted(
        f"Campaign {cid} starts in {(starts_ms - now_ms) / 1000:.3f}s",
        retry_after=(starts_ms - now_ms) / 1000,
    )
