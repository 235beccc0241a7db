"""The grants this worker handed out lately, by campaign and user: so that a winner who asks
again hears `limit_reached` naming their claims from memory — their repeat clicks before any
rate limit or Redis call, and once the campaign is sold out even before their token is
verified (a token this worker verified lately): DESIGN's precedence, the identity limit
outranks admission and sold out, where the worker knows it."""

from __future__ import annotations

MAX_USERS = 200_000  # per worker, over all campaigns: then it starts afresh


class Winners:
    def __init__(self, max_users: int = MAX_USERS) -> None:
        self._max = max_users
        self._size = 0
        self._seqs: dict[str, dict[str, tuple[int, ...]]] = {}  # campaign -> user -> seqs

    def __len__(self) -> int:
        return self._size

    def any_in(self, campaign_id: str) -> bool:
        return campaign_id in self._seqs

    def seqs(self, campaign_id: str, user_id: str) -> tuple[int, ...]:
        """The claim numbers of `user_id` this worker knows of (maybe not all of them)."""
        users = self._seqs.get(campaign_id)
        return () if users is None else users.get(user_id, ())

    def granted(self, campaign_id: str, user_id: str, seq: int) -> None:
        known = self.seqs(campaign_id, user_id)
        if seq not in known:
            self._put(campaign_id, user_id, (*known, seq))

    def holds(self, campaign_id: str, user_id: str, seqs: tuple[int, ...]) -> None:
        """Redis said the user holds these (their limit is reached): the whole set."""
        if seqs:
            self._put(campaign_id, user_id, seqs)

    def _put(self, campaign_id: str, user_id: str, seqs: tuple[int, ...]) -> None:
        users = self._seqs.setdefault(campaign_id, {})
        if user_id not in users:
            if self._size >= self._max:
                self._seqs.clear()
                self._size = 0
                users = self._seqs.setdefault(campaign_id, {})
            self._size += 1
        users[user_id] = seqs
