"""The campaign admission rate: a token bucket in lua/claim.lua on Redis TIME, exact across
gateway workers, changeable live; over it, `429 admission` with Retry-After and RateLimit
fields."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time

import aiohttp

from tests.conftest import claim, create_campaign
from tests.servers import Gateway

POLICY = re.compile(r'^"campaign";q=\d+;w=\d+$')
RATELIMIT = re.compile(r'^"campaign";r=0;t=\d+$')


async def test_over_the_rate_is_429_with_headers(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=1000,
                              admission={"admit_per_s": 2, "burst": 5})
    tokens = [gateway.token(f"adm-{i}") for i in range(40)]
    answers = await asyncio.gather(*(claim(http, gateway, c["id"], t) for t in tokens))
    granted = [a for a in answers if a[0] == 201]
    limited = [a for a in answers if a[0] == 429]
    assert 5 <= len(granted) <= 7, [a[0] for a in answers]  # burst, plus what refilled
    assert len(granted) + len(limited) == 40
    for _, body, headers in limited:
        assert body["code"] == "admission"
        assert int(headers["Retry-After"]) >= 1
        assert POLICY.match(headers["RateLimit-Policy"]), headers["RateLimit-Policy"]
        assert RATELIMIT.match(headers["RateLimit"]), headers["RateLimit"]


async def test_admission_is_exact_across_workers(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """500/s across 2 workers: the admitted rate, measured on Redis time, within 5 %."""
    rate, burst = 500, 50
    c = await create_campaign(http, gateway, stock=100_000,
                              admission={"admit_per_s": rate, "burst": burst})
    users = iter(range(10**9))
    grants: list[dt.datetime] = []
    deadline = time.monotonic() + 4.0

    async def client() -> None:
        while time.monotonic() < deadline:
            status, body, _ = await claim(http, gateway, c["id"], gateway.token(f"g-{next(users)}"))
            if status == 201:
                grants.append(dt.datetime.fromisoformat(body["granted_at"]))
            else:
                assert (status, body["code"]) == (429, "admission"), body

    await asyncio.gather(*(client() for _ in range(48)))
    grants.sort()
    span = (grants[-1] - grants[0]).total_seconds()
    measured = (len(grants) - burst) / span
    assert abs(measured - rate) / rate < 0.05, (len(grants), span, measured)


async def test_admission_changes_live(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    c = await create_campaign(http, gateway, stock=1000,
                              admission={"admit_per_s": 1, "burst": 1})
    tokens = [gateway.token(f"live-{i}") for i in range(20)]
    first = await asyncio.gather(*(claim(http, gateway, c["id"], t) for t in tokens[:10]))
    assert sum(a[0] == 201 for a in first) <= 2
    async with http.put(f"{gateway.base}/v1/campaigns/{c['id']}/admission",
                        json={"admit_per_s": 100_000, "burst": 100},
                        headers=gateway.admin_headers) as r:
        view = await r.json()
        assert r.status == 200, view
        assert view["admission"] == {"admit_per_s": 100_000.0, "burst": 100}
    # the bucket keeps its (spent) tokens and now refills at 100k/s: one claim after
    # another all pass, where at 1/s nine of ten were refused
    second = [await claim(http, gateway, c["id"], t) for t in tokens[10:]]
    assert all(a[0] == 201 for a in second), [a[0] for a in second]


async def test_a_waiting_room_needs_a_rate(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    c = await create_campaign(http, gateway, stock=10)
    async with http.put(f"{gateway.base}/v1/campaigns/{c['id']}/admission",
                        json={"waiting_room": True}, headers=gateway.admin_headers) as r:
        doc = await r.json(content_type=None)
    assert (r.status, doc["code"]) == (422, "invalid"), doc
    status, _, _ = await claim(http, gateway, c["id"], gateway.token("after-422"))
    assert status == 201
