"""The worker's live view of campaigns (spec, status, window, sold-out) and of Redis's clock,
kept fresh by pub/sub invalidation plus a periodic refresh (pub/sub is at-most-once), so
most of a release's answers need no Redis round trip."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.exceptions import RedisError

from gateway.domain import CampaignSpec, face_value
from gateway.metrics import (
    BUDGET_CAP,
    BUDGET_ISSUED,
    BUDGET_USED,
    STOCK_ISSUED,
    STOCK_REMAINING,
    WRITER_BACKLOG,
)
from gateway.redis.client import RedisClient
from gateway.redis.keys import CHANGES, CampaignKeys
from gateway.redis.shards import confirmed_empty, read_shards, stock_left

log = logging.getLogger(__name__)

REFRESH_S = 1.0
NEGATIVE_TTL_S = 1.0
_spec_decoder = msgspec.json.Decoder(CampaignSpec)


@dataclass(slots=True)
class CampaignState:
    spec: CampaignSpec
    id: str
    status: str  # live | paused | ended
    starts_ms: int
    ends_ms: int
    remaining: int
    total: int
    claimed: int
    version: int
    unwritten: int
    round_idx: int = 0  # rounds campaigns: the round Redis last decided in...
    round_left: int = 0  # ...and its units left (a later round has its own)

    @property
    def sold_out(self) -> bool:
        """The whole campaign; a sold-out round is `round_sold_out`."""
        return self.remaining <= 0

    def round_sold_out(self, index: int) -> bool:
        return self.spec.rounds is not None and index == self.round_idx and self.round_left <= 0


def parse_meta(campaign_id: str, meta: Mapping[Any, Any]) -> CampaignState | None:
    if not meta or "spec" not in meta:
        return None
    return CampaignState(
        spec=_spec_decoder.decode(meta["spec"]),
        id=campaign_id,
        status=meta["status"],
        starts_ms=int(meta["starts"]),
        ends_ms=int(meta["ends"]),
        remaining=int(meta["remaining"]),
        total=int(meta["total"]),
        claimed=int(meta.get("seq", 0)),
        version=int(meta.get("version", 0)),
        unwritten=int(meta.get("unwritten", 0)),
        round_idx=int(meta.get("r_idx", 0)),
        round_left=int(meta.get("r_left", 0)),
    )


async def add_shards(client: RedisClient, state: CampaignState) -> None:
    """A sharded campaign's numbers are the sum over its shards (shard 0's meta, read
    already, holds only its share); units in transit between shards count as left."""
    shards = state.spec.shards
    if shards <= 1:
        return
    parts = await read_shards(client, state.id, shards)
    state.total = sum(p.total + p.lent for p in parts)
    state.claimed = sum(p.seq for p in parts)
    state.unwritten = sum(p.unwritten for p in parts)
    state.remaining = stock_left(parts)
    if state.remaining == 0 and not await confirmed_empty(client, state.id, shards, parts):
        state.remaining = 1  # stock moved while we read: not sold out


class CampaignViews:
    """`get()` answers from memory; `run()` keeps memory fresh until `close()`."""

    def __init__(
        self,
        client: RedisClient,
        clock: Callable[[], float] = time.time,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._on_reconnect = on_reconnect  # after Redis came back: drop stale connections
        self._clock = clock
        self._states: dict[str, CampaignState] = {}
        self._absent: dict[str, float] = {}  # id -> until when "no such campaign" is cached
        self._offset_ms: float | None = None  # Redis TIME minus our clock
        self._stop = asyncio.Event()
        self.synced = asyncio.Event()

    def redis_now_ms(self) -> int | None:
        """Redis's clock as this worker estimates it; None until first measured."""
        if self._offset_ms is None:
            return None
        return int(self._clock() * 1000 + self._offset_ms)

    def states(self) -> list[CampaignState]:
        return list(self._states.values())

    def cached(self, campaign_id: str) -> CampaignState | None:
        """The hot path: memory only."""
        return self._states.get(campaign_id)

    async def get(self, campaign_id: str) -> CampaignState | None:
        state = self._states.get(campaign_id)
        if state is not None:
            return state
        if self._absent.get(campaign_id, 0.0) > time.monotonic():
            return None
        return await self.load(campaign_id)

    async def load(self, campaign_id: str) -> CampaignState | None:
        meta = await self._client.hgetall(CampaignKeys.of(campaign_id).meta)
        state = parse_meta(campaign_id, meta)
        if state is None:
            self._states.pop(campaign_id, None)
            if len(self._absent) > 10_000:
                self._absent.clear()
            self._absent[campaign_id] = time.monotonic() + NEGATIVE_TTL_S
        else:
            await add_shards(self._client, state)
            self._absent.pop(campaign_id, None)
            self._states[campaign_id] = state
        return state


    def observe_remaining(self, campaign_id: str, remaining: int, version: int) -> None:
        """A claim verdict told us the stock left; a sold-out flag needs no pub/sub. A verdict
        from before a restock (an older meta version) must not close the campaign again."""
        state = self._states.get(campaign_id)
        if state is not None and version >= state.version and remaining < state.remaining:
            state.remaining = remaining

    def observe_round_out(self, campaign_id: str, index: int, version: int) -> None:
        """Round `index` sold out (a verdict or a `roundout` message); only the round: the
        campaign's `remaining` still counts later rounds. News from before a restock (an
        older meta version) must not close the round again."""
        state = self._states.get(campaign_id)
        if state is not None and version >= state.version and index >= state.round_idx:
            state.round_idx, state.round_left = index, 0

    def forget(self, campaign_id: str) -> None:
        self._states.pop(campaign_id, None)

    async def sync_clock(self) -> None:
        before = self._clock()
        sec, usec = await self._client.time()
        after = self._clock()
        redis_ms = sec * 1000 + usec / 1000
        self._offset_ms = redis_ms - (before + after) / 2 * 1000

    async def refresh_all(self) -> None:
        ids = list(self._states)
        if not ids:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hgetall(CampaignKeys.of(cid).meta)
            metas = await pipe.execute()
        for cid, meta in zip(ids, metas, strict=True):
            state = parse_meta(cid, meta)
            if state is None:
                self._states.pop(cid, None)
            else:
                await add_shards(self._client, state)
                self._states[cid] = state
                STOCK_ISSUED.labels(cid).set(state.total)
                STOCK_REMAINING.labels(cid).set(max(state.remaining, 0))
                WRITER_BACKLOG.labels(cid).set(state.unwritten)
                face = face_value(state.spec)
                BUDGET_ISSUED.labels(cid).set(state.total * face)
                BUDGET_USED.labels(cid).set(state.claimed * face)
                if state.spec.budget_cap is not None:
                    BUDGET_CAP.labels(cid).set(state.spec.budget_cap)

    async def _on_message(self, data: str) -> None:
        kind, _, rest = data.partition(" ")
        cid, *args = rest.split(" ")
        state = self._states.get(cid)
        if kind == "soldout":
            if state is not None:
                self.observe_remaining(cid, 0, state.version)
        elif kind == "roundout":
            self.observe_round_out(cid, int(args[0]), int(args[1]))
        elif kind == "restock" and state is not None and state.spec.rounds is not None:
            await self.load(cid)  # the units went to the current round: reload its numbers
        elif kind in ("status", "restock"):
            # applied on receipt: the new numbers travel in the message
            version = int(args[0])
            if state is not None and version > state.version:
                state.version = version
                if kind == "status":
                    state.status = args[1]
                else:
                    state.remaining, state.total = int(args[1]), int(args[2])
        elif kind == "changed":
            self._absent.pop(cid, None)
            if cid in self._states:
                await self.load(cid)

    async def run(self) -> None:
        backoff = 0.05
        lost = False
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES)
                if lost and self._on_reconnect is not None:
                    await self._on_reconnect()
                lost = False
                await self.sync_clock()
                await self.refresh_all()  # catch up on what we missed while unsubscribed
                self.synced.set()
                backoff = 0.05
                next_refresh = time.monotonic() + REFRESH_S
                while not self._stop.is_set():
                    timeout = max(0.0, next_refresh - time.monotonic())
                    msg = await pubsub.get_message(timeout=timeout)
                    if msg is not None and msg["type"] == "message":
                        await self._on_message(msg["data"])
                    if time.monotonic() >= next_refresh:
                        await self.sync_clock()
                        await self.refresh_all()
                        next_refresh = time.monotonic() + REFRESH_S
            except (RedisError, OSError) as e:
                self.synced.clear()
                lost = True
                log.warning("campaign view lost Redis: %r; retrying in %.2fs", e, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._stop.set()
