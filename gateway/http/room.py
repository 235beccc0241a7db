"""The waiting room at the HTTP edge: a claim on a waiting-room campaign without a ticket
enters the queue (`202` with a signed ticket, position, ETA and a jittered Retry-After);
polls with the ticket are answered from the worker's cache; an admitted ticket goes on to
claim, once (its Idempotency-Key is the ticket), and only for its owner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admission.waitingroom import (
    ADMIT_WINDOW_MS,
    RoomCache,
    admission_limit,
    admitted_at_ms,
    make_ticket,
    read_ticket,
    serving,
    shuffle_score,
)
from gateway.domain import Admission, Identity
from gateway.http.context import Gateway
from gateway.http.problems import ANSWER_CODE
from gateway.metrics import ROOM_SERVING, ROOM_TICKETS
from gateway.redis.batcher import redis_unavailable
from gateway.redis.campaigns import CampaignState, CampaignViews
from gateway.redis.client import RedisClient
from gateway.redis.keys import CampaignKeys
from gateway.schemas import encoder

log = logging.getLogger(__name__)
TICKET_HEADER = "Waiting-Room-Ticket"
REFRESH_S = 0.5


def uses_room(state: CampaignState) -> bool:
    return state.spec.admission is not None and state.spec.admission.waiting_room


def _waiting(cid: str, ticket: str, position: int, now_ms: int, starts_ms: int,
             rate: float, burst: int) -> web.Response:
    eta_ms = max(0, admitted_at_ms(position, starts_ms, rate, burst) - now_ms)
    # jittered, so a queue polls as a trickle rather than in waves
    retry = max(1, min(30, round(eta_ms / 1000 * random.uniform(0.8, 1.0))))
    doc: dict[str, Any] = {
        "code": "waiting", "campaign_id": cid, "ticket": ticket, "position": position + 1,
        "serving": serving(starts_ms, now_ms, rate, burst), "eta_s": round(eta_ms / 1000, 3),
        "retry_after_s": retry,
    }
    resp = web.Response(body=encoder.encode(doc), status=202, content_type="application/json",
                        headers={"Retry-After": str(retry), TICKET_HEADER: ticket})
    resp[ANSWER_CODE] = "waiting"
    return resp


async def gate(gw: Gateway, state: CampaignState, who: Identity,
               ticket: str | None) -> web.Response | str:
    """A `202` to keep waiting, or the Idempotency-Key an admitted claim goes on with."""
    cid, key = state.id, gw.settings.signing_key
    rate, burst = (state.spec.admission or Admission()).bucket
    now = gw.views.redis_now_ms()
    if now is None:
        raise redis_unavailable()
    try:
        if ticket is None:
            score = await gw.scripts.room_enter(cid, who.user_id,
                                                shuffle_score(key, cid, who.user_id))
            return _waiting(cid, make_ticket(key, cid, who.user_id, score),
                            gw.room.position(cid, score), now, state.starts_ms, rate, burst)
        held = read_ticket(key, cid, who.user_id, ticket)
        if held is None:
            raise errors.BadTicket("That waiting-room ticket is not yours or not valid")
        limit = admission_limit(state.starts_ms, now, rate, burst, state.claimed,
                                state.remaining)
        position = gw.room.position(cid, held)
        if position >= limit:  # answered from the cache
            return _waiting(cid, ticket, position, now, state.starts_ms, rate, burst)
        found: Any = await gw.client.zrank(CampaignKeys.of(cid).room, who.user_id)  # exact
    except (RedisError, OSError):
        raise redis_unavailable() from None
    if found is None:
        raise errors.BadTicket("That waiting-room ticket is not in this queue")
    rank = int(found)
    if rank >= limit:
        return _waiting(cid, ticket, rank, now, state.starts_ms, rate, burst)
    if now > admitted_at_ms(rank, state.starts_ms, rate, burst) + ADMIT_WINDOW_MS:
        raise errors.TicketExpired(
            "Your turn in the waiting room has passed; claim without the ticket to rejoin")
    return f"room:{held}"  # one claim per turn, whatever key the client sent


class RoomRefresher:
    """Keeps the worker's RoomCache of every waiting-room campaign it knows fresh."""

    def __init__(self, client: RedisClient, views: CampaignViews, cache: RoomCache) -> None:
        self._client, self._views, self._cache = client, views, cache
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                now = self._views.redis_now_ms()
                for state in self._views.states():
                    if uses_room(state):
                        pairs: Any = await self._client.zrange(
                            CampaignKeys.of(state.id).room, 0, -1, withscores=True)
                        self._cache.update(state.id, [int(s) for _, s in pairs])
                        ROOM_TICKETS.labels(state.id).set(len(pairs))
                        if now is not None:
                            rate, burst = (state.spec.admission or Admission()).bucket
                            ROOM_SERVING.labels(state.id).set(
                                min(len(pairs), serving(state.starts_ms, now, rate, burst)))
            except (RedisError, OSError) as e:
                log.warning("waiting-room refresh failed: %r", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), REFRESH_S)

    def close(self) -> None:
        self._stop.set()
