"""Under 256-connection load with connections churning (clients giving up mid-request),
every response belongs to its own request: the echoed X-Request-Id and the granted user
match what that request sent. uvloop is pinned at 0.23.0, which carries the fix for
MagicStack/uvloop#645 (a closed descriptor reused by a new connection; fixed by #740)."""

from __future__ import annotations

import asyncio
import itertools
from importlib.metadata import version

import aiohttp

from tests.conftest import create_campaign
from tests.servers import Gateway

CONNECTIONS = 256
REQUESTS = 4000


def test_uvloop_has_the_fix() -> None:
    assert tuple(int(p) for p in version("uvloop").split(".")[:2]) >= (0, 23)


async def test_every_response_belongs_to_its_request(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=1500)
    url = f"{gateway.base}/v1/campaigns/{c['id']}/claims"
    n = itertools.count()
    tokens = {f"ri-{i}": gateway.token(f"ri-{i}") for i in range(REQUESTS // 2)}
    users = list(tokens)
    checked = aborted = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> None:
            nonlocal checked, aborted
            i = next(n)
            user = users[i % len(users)]
            rid = f"req-{i}"
            headers = {"Authorization": f"Bearer {tokens[user]}", "X-Request-Id": rid}
            # every 7th client gives up almost at once: its connection closes mid-request
            timeout = aiohttp.ClientTimeout(total=0.002 if i % 7 == 0 else 30)
            try:
                async with s.post(url, json={}, headers=headers, timeout=timeout) as r:
                    body = await r.json(content_type=None)
            except TimeoutError:
                aborted += 1
                return
            assert r.headers["X-Request-Id"] == rid
            if r.status == 201:
                assert body["user_id"] == user, (rid, body)
            else:
                assert r.status in (409, 410), (r.status, body)
                if r.status == 409:
                    assert all(cid.startswith(c["id"]) for cid in body["claims"])
            checked += 1

        async def worker() -> None:
            while checked + aborted < REQUESTS:
                await one()

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    assert checked >= REQUESTS * 0.8, (checked, aborted)
