"""Budgets: the face value put up and granted, live in the admin view and as metrics; a
campaign capped by budget as well as by count (at creation, on restock, under a rush)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.domain import CampaignSpec, SpecError, effective_stock, validate_spec
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway

FACE = 3000  # the default spec's threshold coupon: 30.00 off


def domain_spec(**over: Any) -> CampaignSpec:
    return msgspec.convert(spec(**over), CampaignSpec)


def test_effective_stock_is_what_the_cap_pays_for() -> None:
    assert effective_stock(domain_spec(stock=100)) == 100
    assert effective_stock(domain_spec(stock=100, budget_cap=10 * FACE)) == 10
    assert effective_stock(domain_spec(stock=100, budget_cap=10 * FACE + FACE - 1)) == 10
    assert effective_stock(domain_spec(stock=5, budget_cap=10 * FACE)) == 5
    two = [{"kind": "amount_off", "value": 500, "valid_days": 7},
           {"kind": "percent_off", "value": 10, "valid_days": 7},
           {"kind": "amount_off", "value": 700, "valid_days": 7}]
    assert effective_stock(domain_spec(stock=100, coupons=two, budget_cap=6000)) == 5


@pytest.mark.parametrize("over, message", [
    ({"budget_cap": FACE - 1}, "face value"),
    ({"budget_cap": 10_000, "coupons": [{"kind": "percent_off", "value": 10,
                                         "valid_days": 7}]}, "fixed face value"),
])
def test_a_cap_that_pays_for_nothing_is_refused(over: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        validate_spec(domain_spec(**over))
    assert e.value.field == "budget_cap"


async def admin(http: aiohttp.ClientSession, gw: Gateway, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    async with http.request(method, gw.base + path, json=body, headers=gw.admin_headers) as r:
        return r.status, await r.json(content_type=None)


async def test_budget_shown_live(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway, stock=10)
    assert c["budget"] == {"face_value": FACE, "issued": 10 * FACE, "used": 0,
                           "remaining": 10 * FACE}
    for i in range(3):
        status, body, _ = await claim(http, gateway, c["id"], gateway.token(f"b-{i}"))
        assert status == 201, body
    status, shown = await admin(http, gateway, "GET", f"/v1/campaigns/{c['id']}")
    assert shown["budget"]["used"] == 3 * FACE
    assert shown["budget"]["remaining"] == 7 * FACE


async def test_budget_cap_cuts_stock_and_restock(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    c = await create_campaign(http, gateway, stock=100, budget_cap=5 * FACE + 10)
    assert (c["stock"], c["remaining"]) == (5, 5)
    assert c["budget"]["cap"] == 5 * FACE + 10
    status, body = await admin(http, gateway, "POST", f"/v1/campaigns/{c['id']}/restock",
                               {"quantity": 1})
    assert (status, body["code"]) == (409, "budget_cap"), body
    status, body = await admin(http, gateway, "GET", f"/v1/campaigns/{c['id']}")
    assert (body["stock"], body["remaining"]) == (5, 5)  # the refused restock changed nothing

    # a campaign whose cap pays for more than its stock may be restocked up to the cap
    d = await create_campaign(http, gateway, stock=2, budget_cap=4 * FACE)
    status, body = await admin(http, gateway, "POST", f"/v1/campaigns/{d['id']}/restock",
                               {"quantity": 2})
    assert (status, body["stock"]) == (200, 4), body
    status, body = await admin(http, gateway, "POST", f"/v1/campaigns/{d['id']}/restock",
                               {"quantity": 1})
    assert (status, body["code"]) == (409, "budget_cap"), body


async def test_bad_caps_are_422(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    for cap in (FACE - 1, 0, "lots"):
        status, body = await admin(http, gateway, "POST", "/v1/campaigns",
                                   spec(budget_cap=cap))
        assert status == 422, body
        assert "budget_cap" in body["field"], body


async def test_rush_never_grants_past_the_cap(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    cap = 12 * FACE + 1
    c = await create_campaign(http, gateway, stock=1000, budget_cap=cap)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> int:
        async with sem:
            status, _, _ = await claim(http, gateway, c["id"], gateway.token(f"rush-{i}"))
            return status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses.count(201) * FACE <= cap
    assert statuses.count(201) == 12
    _, body = await admin(http, gateway, "GET", f"/v1/campaigns/{c['id']}")
    assert body["budget"]["used"] == 12 * FACE <= body["budget"]["cap"]


async def test_budget_metrics(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway, stock=4, budget_cap=3 * FACE)
    status, _, _ = await claim(http, gateway, c["id"], gateway.token("metric-user"))
    assert status == 201
    label = f'campaign="{c["id"]}"'
    want = {f"flashclaim_budget_cap{{{label}}} {float(3 * FACE)}",
            f"flashclaim_budget_used{{{label}}} {float(FACE)}",
            f"flashclaim_budget_issued{{{label}}} {float(3 * FACE)}"}
    for _ in range(100):  # every worker refreshes its view once a second
        async with http.get(gateway.base + "/metrics") as r:
            lines = set((await r.text()).splitlines())
        if want <= lines:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(want - lines)
