"""Idempotency-Key on claims: retries get the original grant back, never a second coupon."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import claim, create_campaign
from tests.servers import Gateway


async def mine(
    http: aiohttp.ClientSession, gw: Gateway, cid: str, token: str
) -> list[dict[str, Any]]:
    url = f"{gw.base}/v1/campaigns/{cid}/claims/mine"
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == 200, body
    assert "claims" in body, body
    claims: list[dict[str, Any]] = body["claims"]
    return claims


async def numbers(http: aiohttp.ClientSession, gw: Gateway, cid: str) -> tuple[int, int]:
    """The admin view's (claimed, remaining)."""
    async with http.get(f"{gw.base}/v1/campaigns/{cid}", headers=gw.admin_headers) as r:
        view: dict[str, Any] = await r.json()
        assert r.status == 200, view
    return view["claimed"], view["remaining"]


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def test_same_key_bare_or_quoted_returns_the_original_grant(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10, limits={"per_user": 3})
    cid, token = c["id"], gateway.token("idem-u1")

    status, first, _ = await claim(http, gateway, cid, token, headers=keyed("order-1"))
    assert status == 201, first
    for form in ('"order-1"', "order-1", ' "order-1" '):
        status, again, _ = await claim(http, gateway, cid, token, headers=keyed(form))
        assert (status, again) == (201, first), form

    assert await numbers(http, gateway, cid) == (1, 9)
    assert await mine(http, gateway, cid, token) == [first]


async def test_different_keys_grant_up_to_the_limit_and_replays_survive_it(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10, limits={"per_user": 3})
    cid, token = c["id"], gateway.token("idem-u2")

    grants = []
    for key in ("k1", "k2", "k3"):
        status, body, _ = await claim(http, gateway, cid, token, headers=keyed(key))
        assert status == 201, body
        grants.append(body)
    assert len({g["claim_id"] for g in grants}) == 3
    assert [g["seq"] for g in grants] == sorted(g["seq"] for g in grants)

    ids = [g["claim_id"] for g in grants]
    for headers in (keyed("k4"), None):
        status, body, _ = await claim(http, gateway, cid, token, headers=headers)
        assert (status, body["code"]) == (409, "limit_reached"), body
        assert sorted(body["claims"]) == sorted(ids)

    status, body, _ = await claim(http, gateway, cid, token, headers=keyed('"k2"'))
    assert (status, body) == (201, grants[1])

    assert await numbers(http, gateway, cid) == (3, 7)
    assert await mine(http, gateway, cid, token) == grants


async def test_same_key_from_another_user_or_campaign_is_independent(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10)
    other = await create_campaign(http, gateway, stock=10)
    cid = c["id"]
    alice, bob = gateway.token("idem-alice"), gateway.token("idem-bob")

    status, a, _ = await claim(http, gateway, cid, alice, headers=keyed("shared"))
    assert status == 201, a
    status, b, _ = await claim(http, gateway, cid, bob, headers=keyed("shared"))
    assert status == 201, b
    assert b["user_id"] == "idem-bob"
    assert b["claim_id"] != a["claim_id"]
    status, a_other, _ = await claim(http, gateway, other["id"], alice, headers=keyed("shared"))
    assert status == 201, a_other
    assert a_other["campaign_id"] == other["id"]

    for token, original in ((alice, a), (bob, b)):
        status, again, _ = await claim(http, gateway, cid, token, headers=keyed("shared"))
        assert (status, again) == (201, original)
    assert await numbers(http, gateway, cid) == (2, 8)
    assert await mine(http, gateway, cid, alice) == [a]
    assert await mine(http, gateway, cid, bob) == [b]


async def test_an_invalid_key_is_a_400_problem_and_grants_nothing(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10)
    cid, token = c["id"], gateway.token("idem-bad")

    for key in ("x" * 300, '"' + "y" * 300 + '"'):
        status, body, headers = await claim(http, gateway, cid, token, headers=keyed(key))
        assert status == 400, body
        assert headers["Content-Type"].startswith("application/problem+json")
        assert {"type", "title", "status", "detail", "code"} <= set(body)
        assert body["status"] == 400

    assert await numbers(http, gateway, cid) == (0, 10)
    assert await mine(http, gateway, cid, token) == []
    uuid_key = keyed("3f2c9a4e-0b7d-4c1e-9f55-2d8e6a1b7c90")
    status, body, _ = await claim(http, gateway, cid, token, headers=uuid_key)
    assert status == 201, body


async def test_concurrent_identical_keys_yield_one_grant(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10, limits={"per_user": 3})
    cid, token = c["id"], gateway.token("idem-burst")

    # A new connection per request, so the retries land on both workers.
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as fresh:
        answers = await asyncio.gather(
            *(claim(fresh, gateway, cid, token, headers=keyed("burst")) for _ in range(10))
        )

    statuses = [status for status, _, _ in answers]
    assert statuses == [201] * 10, [body for _, body, _ in answers]
    bodies = [body for _, body, _ in answers]
    assert all(body == bodies[0] for body in bodies)
    assert await numbers(http, gateway, cid) == (1, 9)
    assert await mine(http, gateway, cid, token) == [bodies[0]]
