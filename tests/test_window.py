"""The claim window (not_started + Retry-After, ended), decided on Redis time, not a worker's."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.domain import to_ms
from gateway.http.app import create_app
from gateway.http.context import GATEWAY
from gateway.identity import mint_token
from gateway.settings import Settings
from tests.conftest import campaign_id, claim, create_campaign
from tests.servers import Gateway, RedisServer

# Redis and the tests share this host's clock; this only absorbs reading jitter.
SLACK_MS = 10
POLL_S = 0.05


def at(seconds: float) -> str:
    """RFC 3339 for now + `seconds`."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


def ms_of(rfc3339: str) -> int:
    """An instant the gateway gave in whole milliseconds (granted_at)."""
    return round(dt.datetime.fromisoformat(rfc3339).timestamp() * 1000)


def bound_ms(rfc3339: str) -> int:
    """A window bound in ms exactly as the gateway stores it."""
    return to_ms(dt.datetime.fromisoformat(rfc3339))


def now_ms() -> int:
    return int(time.time() * 1000)


def retry_after(headers: Any) -> int:
    raw = headers.get("Retry-After")
    assert raw is not None, "a not_started answer carries Retry-After"
    assert raw.isdigit(), f"Retry-After must be integer seconds, got {raw!r}"
    value = int(raw)
    assert value >= 1
    return value


def user() -> str:
    return "w-" + secrets.token_hex(6)


# --- the shared 2-worker gateway -------------------------------------------------------


async def test_before_start_is_not_started_with_retry_after(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, starts_at=at(60), ends_at=at(3600))
    for _ in range(4):  # more than one answer, so both workers are likely asked
        status, body, headers = await claim(http, gateway, c["id"], gateway.token(user()))
        assert (status, body["code"]) == (409, "not_started"), body
        assert 55 <= retry_after(headers) <= 61, headers.get("Retry-After")


async def test_after_end_is_ended(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    c = await create_campaign(http, gateway, starts_at=at(-7200), ends_at=at(-3600))
    for _ in range(4):
        status, body, _ = await claim(http, gateway, c["id"], gateway.token(user()))
        assert (status, body["code"]) == (410, "ended"), body


async def test_claims_open_when_the_campaign_starts(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=1000, starts_at=at(1.5), ends_at=at(3600))
    starts_ms = bound_ms(c["starts_at"])
    token = gateway.token(user())
    sent = now_ms()
    status, body, headers = await claim(http, gateway, c["id"], token)
    assert (status, body["code"]) == (409, "not_started"), body
    assert sent < starts_ms
    assert 1 <= retry_after(headers) <= 2
    deadline = time.monotonic() + 10
    while True:
        sent = now_ms()
        status, body, _ = await claim(http, gateway, c["id"], token)
        if status == 201:
            break
        assert (status, body["code"]) == (409, "not_started"), body
        assert sent < starts_ms + SLACK_MS, "not_started answered after the start"
        assert time.monotonic() < deadline, "the campaign never opened"
        await asyncio.sleep(POLL_S)
    assert now_ms() + SLACK_MS >= starts_ms, "granted before the start"
    assert ms_of(body["granted_at"]) >= starts_ms
    for _ in range(4):  # and it stays open, on every worker
        status, body, _ = await claim(http, gateway, c["id"], gateway.token(user()))
        assert status == 201, body


# --- an in-process gateway whose own clock is an hour off ------------------------------


@dataclass
class Skewed:
    client: TestClient[Any, Any]
    admin_headers: dict[str, str]
    identity_secret: str
    skew_s: float

    def token(self, sub: str) -> str:
        # The issuer's clock is right; exp must outlive the gateway's skew either way.
        return mint_token(self.identity_secret, sub, ttl_s=3 * 3600)

    async def create(self, **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": campaign_id("skew"),
            "name": "Skewed clock",
            "stock": 1000,
            "coupons": [{"kind": "amount_off", "value": 500, "currency": "CNY",
                         "valid_days": 7}],
            **over,
        }
        async with self.client.post("/v1/campaigns", json=doc,
                                    headers=self.admin_headers) as r:
            body: dict[str, Any] = await r.json(content_type=None)
            assert r.status == 201, body
            return body

    async def claim(self, cid: str, sub: str) -> tuple[int, dict[str, Any], Any]:
        headers = {"Authorization": f"Bearer {self.token(sub)}"}
        async with self.client.post(f"/v1/campaigns/{cid}/claims", json={},
                                    headers=headers) as r:
            return r.status, await r.json(content_type=None), r.headers


@pytest.fixture(params=[3600.0, -3600.0], ids=["clock+1h", "clock-1h"])
async def skewed(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[Skewed]:
    skew_s: float = request.param
    settings = Settings(
        redis_url=redis_server.url,
        admin_token=secrets.token_urlsafe(16),
        identity_secret=secrets.token_urlsafe(24),
        signing_secret=secrets.token_urlsafe(24),
    )
    app = create_app(settings, clock=lambda: time.time() + skew_s)
    async with TestClient(TestServer(app)) as client:
        views = app[GATEWAY].views
        await asyncio.wait_for(views.synced.wait(), 10)
        assert settings.identity_secret is not None
        yield Skewed(client, {"Authorization": f"Bearer {settings.admin_token}"},
                     settings.identity_secret, skew_s)


async def test_skewed_gateway_measures_redis_clock(skewed: Skewed) -> None:
    views = skewed.client.app[GATEWAY].views
    estimate = views.redis_now_ms()
    assert estimate is not None
    assert abs(estimate - now_ms()) < 250, "the view's Redis clock is off by the skew"


async def test_skewed_gateway_says_not_started(skewed: Skewed) -> None:
    # By its own clock, +1h would call this open and -1h would ask to wait an hour.
    c = await skewed.create(starts_at=at(60), ends_at=at(7200))
    for _ in range(3):
        status, body, headers = await skewed.claim(c["id"], user())
        assert (status, body["code"]) == (409, "not_started"), body
        assert 55 <= retry_after(headers) <= 61, headers.get("Retry-After")


async def test_skewed_gateway_grants_an_open_campaign(skewed: Skewed) -> None:
    # By its own clock, +1h would call this ended and -1h not started.
    c = await skewed.create(starts_at=at(-5), ends_at=at(1800))
    status, body, _ = await skewed.claim(c["id"], user())
    assert status == 201, body
    granted = ms_of(body["granted_at"])
    assert abs(granted - now_ms()) < 5000, "granted_at is Redis time, not the gateway's"


async def test_skewed_gateway_ends_on_redis_time(skewed: Skewed) -> None:
    c = await skewed.create(starts_at=at(-5), ends_at=at(1.5))
    ends_ms = bound_ms(c["ends_at"])
    sent = now_ms()
    status, body, _ = await skewed.claim(c["id"], user())
    assert status == 201, body
    assert sent < ends_ms
    deadline = time.monotonic() + 10
    while True:
        sent = now_ms()
        status, body, _ = await skewed.claim(c["id"], user())
        if status != 201:
            break
        assert ms_of(body["granted_at"]) < ends_ms
        assert time.monotonic() < deadline, "the campaign never ended"
        await asyncio.sleep(POLL_S)
    assert (status, body["code"]) == (410, "ended"), body
    assert now_ms() + SLACK_MS >= ends_ms, "ended before ends_at by Redis time"
    status, body, _ = await skewed.claim(c["id"], user())
    assert (status, body["code"]) == (410, "ended"), body
