"""The waiting room's rules, pure: keyed shuffle scores for the pre-queue, signed tickets,
the serving counter (advancing at the campaign's admission rate from the start), and the
worker's cache of queue scores that answers polls without Redis."""

from __future__ import annotations

import bisect
import hmac
import math

SHUFFLED = 1 << 48  # pre-start scores are below this; later arrivals are SHUFFLED + n
ADMIT_WINDOW_MS = 30_000  # an admitted ticket must claim within this, or its turn passes


def shuffle_score(key: bytes, campaign_id: str, user_id: str) -> int:
    """Where a user who came before the start stands: keyed pseudo-random, so being first
    to click at 09:59:59.999 buys nothing and the order cannot be computed from outside."""
    digest = hmac.digest(key, f"room\x00{campaign_id}\x00{user_id}".encode(), "sha256")
    return int.from_bytes(digest[:6], "big")


def _mac(key: bytes, campaign_id: str, user_id: str, score: int) -> str:
    msg = f"ticket\x00{campaign_id}\x00{user_id}\x00{score}".encode()
    return hmac.digest(key, msg, "sha256")[:12].hex()


def make_ticket(key: bytes, campaign_id: str, user_id: str, score: int) -> str:
    return f"{score}.{_mac(key, campaign_id, user_id, score)}"


def read_ticket(key: bytes, campaign_id: str, user_id: str, ticket: str) -> int | None:
    """The ticket's score, or None when it is forged or another user's."""
    score, _, mac = ticket.strip().partition(".")
    if not score.isascii() or not score.isdigit() or len(score) > 16:
        return None
    if not hmac.compare_digest(mac, _mac(key, campaign_id, user_id, int(score))):
        return None
    return int(score)


def serving(starts_ms: int, now_ms: int, rate: float, burst: int) -> int:
    """How many queue positions are admitted at `now_ms` (positions are 0-based)."""
    if now_ms < starts_ms:
        return 0
    return burst + math.floor(rate * (now_ms - starts_ms) / 1000)


def admission_limit(starts_ms: int, now_ms: int, rate: float, burst: int, claimed: int,
                    remaining: int) -> int:
    """Positions admitted now: the serving counter, but never more turns open than units
    left. Turns older than the admission window are settled (claimed or expired), so the
    queue never stalls on those who did not come back."""
    settled = max(claimed, serving(starts_ms, now_ms - ADMIT_WINDOW_MS, rate, burst))
    return min(serving(starts_ms, now_ms, rate, burst), settled + max(remaining, 0))


def admitted_at_ms(position: int, starts_ms: int, rate: float, burst: int) -> int:
    """When `position` is admitted."""
    return starts_ms + max(0, math.ceil((position - burst + 1) * 1000 / rate))


class RoomCache:
    """Per campaign, the sorted queue scores as of the last refresh."""

    def __init__(self) -> None:
        self._scores: dict[str, list[int]] = {}

    def update(self, campaign_id: str, scores: list[int]) -> None:
        self._scores[campaign_id] = sorted(scores)

    def position(self, campaign_id: str, score: int) -> int:
        """0-based rank of `score` (where it would stand if not seen yet)."""
        return bisect.bisect_left(self._scores.get(campaign_id, []), score)
