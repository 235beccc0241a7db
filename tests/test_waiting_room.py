"""The waiting room: 5,000 users arrive in the seconds before the start; their positions are
a keyed shuffle, not arrival order; admission follows positions at the admission rate; with
stock 1,000 exactly 1,000 grants; every other ticket holder hears 410 on its next poll after
the sell-out; forged tickets and other users' tickets are refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time
from typing import Any

import aiohttp

from gateway.admission.waitingroom import SHUFFLED, admitted_at_ms
from gateway.domain import to_ms
from gateway.redis.keys import CampaignKeys
from tests.conftest import create_campaign
from tests.servers import Gateway, RedisServer

USERS, STOCK, RATE, BURST = 5000, 1000, 500, 50


def spearman(xs: list[int], ys: list[int]) -> float:
    def ranks(v: list[int]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0] * len(v)
        for r, i in enumerate(order):
            out[i] = r
        return out
    return statistics.correlation(ranks(xs), ranks(ys))


async def test_waiting_room_release(gateway: Gateway, redis_server: RedisServer) -> None:
    starts = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as http:
        c = await create_campaign(
            http, gateway, stock=STOCK, starts_at=starts.isoformat(),
            admission={"admit_per_s": RATE, "burst": BURST, "waiting_room": True})
        cid = c["id"]
        url = f"{gateway.base}/v1/campaigns/{cid}/claims"
        tokens = [gateway.token(f"wr-{i}") for i in range(USERS)]

        async def post(i: int, ticket: str | None = None) -> tuple[int, Any, float]:
            headers = {"Authorization": f"Bearer {tokens[i]}"}
            if ticket is not None:
                headers["Waiting-Room-Ticket"] = ticket
            async with http.post(url, headers=headers) as r:
                return r.status, await r.json(content_type=None), time.time()

        # everybody arrives in the seconds before the start, in index order (5,000 entries
        # take 2-3 s on a slow day of this 2-core machine: 6 s of lead)
        await asyncio.sleep(max(0.0, starts.timestamp() - 6 - time.time()))
        entered = await asyncio.gather(*(post(i) for i in range(USERS)))
        assert time.time() < starts.timestamp(), "arrivals must all come before the start"
        assert {s for s, _, _ in entered} == {202}
        tickets = [doc["ticket"] for _, doc, _ in entered]

        # forged, and somebody else's, tickets are refused
        forged = tickets[0].split(".")[0] + ".00000000000000000000000"
        assert (await post(0, forged))[1]["code"] == "bad_ticket"
        assert (await post(1, tickets[0]))[1]["code"] == "bad_ticket"

        finals: list[tuple[int, Any, float]] = [(0, None, 0.0)] * USERS
        last_wait = [0.0] * USERS  # the Retry-After each user slept before its last poll

        async def poll(i: int, first: dict[str, Any]) -> None:
            retry = first["retry_after_s"]
            while True:
                last_wait[i] = retry
                await asyncio.sleep(retry)
                status, doc, at = await post(i, tickets[i])
                if status != 202:
                    finals[i] = (status, doc, at)
                    return
                retry = int(doc["retry_after_s"])

        await asyncio.gather(*(poll(i, doc) for i, (_, doc, _) in enumerate(entered)))

    statuses = [s for s, _, _ in finals]
    assert statuses.count(201) == STOCK, {s: statuses.count(s) for s in set(statuses)}
    assert set(statuses) == {201, 410}, set(statuses)

    r = redis_server.client()
    try:
        room = CampaignKeys.of(cid).room
        ranks = {u: int(rank) for rank, u in enumerate(r.zrange(room, 0, -1))}
        scores = [int(s) for _, s in r.zrange(room, 0, -1, withscores=True)]
    finally:
        r.close()
    assert max(scores) < SHUFFLED, "every arrival was in the pre-queue"
    rank_of = [ranks[f"wr-{i}"] for i in range(USERS)]
    assert abs(spearman(list(range(USERS)), rank_of)) < 0.05, "positions follow arrival order"

    starts_ms = to_ms(starts)
    sold_out_at = 0.0
    for i, (status, doc, _) in enumerate(finals):
        if status == 201:  # nobody claimed before the room admitted their position (give
            # or take the worker's estimate of Redis's clock, which the gate reads)
            granted_ms = to_ms(dt.datetime.fromisoformat(doc["granted_at"]))
            assert granted_ms >= admitted_at_ms(rank_of[i], starts_ms, RATE, BURST) - 50
            sold_out_at = max(sold_out_at, granted_ms / 1000)
    for i, (status, doc, at) in enumerate(finals):
        if status == 410:  # heard on the first poll after the sell-out
            assert doc["code"] == "sold_out", doc
            assert at <= sold_out_at + last_wait[i] + 1.0, (at - sold_out_at, last_wait[i])
