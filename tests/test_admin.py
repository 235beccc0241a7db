"""The admin API (create, list, show, pause/resume/end, restock), OpenAPI docs and eligibility."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import campaign_id, claim, create_campaign, spec
from tests.servers import Gateway

ADMIN_PATHS = [
    "/v1/campaigns", "/v1/campaigns/{id}", "/v1/campaigns/{id}/pause",
    "/v1/campaigns/{id}/resume", "/v1/campaigns/{id}/end", "/v1/campaigns/{id}/restock",
    "/v1/blocks/{kind}",
]


async def admin(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None,
) -> tuple[int, Any]:
    async with http.request(method, gw.base + path, json=body, headers=gw.admin_headers) as r:
        return r.status, await r.json(content_type=None)


async def show(http: aiohttp.ClientSession, gw: Gateway, cid: str) -> dict[str, Any]:
    status, body = await admin(http, gw, "GET", f"/v1/campaigns/{cid}")
    assert status == 200, body
    return dict(body)


async def act(http: aiohttp.ClientSession, gw: Gateway, cid: str, verb: str,
              body: Any = None) -> tuple[int, Any]:
    return await admin(http, gw, "POST", f"/v1/campaigns/{cid}/{verb}", body)


async def claim_until(
    http: aiohttp.ClientSession, gw: Gateway, cid: str, user: str, want: int,
    body: Any = None, timeout_s: float = 5.0,
) -> dict[str, Any]:
    """Claims as `user` until the answer is `want`: workers learn of an operator's change
    through pub/sub, a moment after the admin call returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, got, _ = await claim(http, gw, cid, gw.token(user), body)
        assert status < 500, got
        if status == want:
            return got
        assert time.monotonic() < deadline, f"still {status} {got}, want {want}"


# ---- create, list, show ------------------------------------------------------------------

async def test_create_returns_live_numbers(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    doc = spec(stock=7, limits={"per_user": 2}, eligibility={"channels": ["app"]})
    status, body = await admin(http, gateway, "POST", "/v1/campaigns", doc)
    assert status == 201, body
    assert body["id"] == doc["id"]
    assert (body["stock"], body["remaining"], body["claimed"]) == (7, 7, 0)
    assert body["status"] == "live"
    assert body["name"] == doc["name"]
    assert body["limits"]["per_user"] == 2
    assert body["eligibility"]["channels"] == ["app"]
    assert body["coupons"][0]["threshold"] == 10000
    assert await show(http, gateway, doc["id"]) == body


async def test_duplicate_id_conflicts(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway, stock=3)
    status, body = await admin(http, gateway, "POST", "/v1/campaigns",
                               spec(id=c["id"], stock=999, name="Impostor"))
    assert (status, body["code"]) == (409, "conflict"), body
    after = await show(http, gateway, c["id"])
    assert (after["name"], after["stock"]) == (c["name"], 3)


async def test_create_without_id_generates_one(
    http: aiohttp.ClientSession, gateway: Gateway,
) -> None:
    doc = {k: v for k, v in spec(name="No id given").items() if k != "id"}
    status, made = await admin(http, gateway, "POST", "/v1/campaigns", doc)
    assert status == 201, made
    cid = made["id"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", cid), cid
    status, again = await admin(http, gateway, "POST", "/v1/campaigns", doc)
    assert status == 201 and again["id"] != cid, again
    status, listed = await admin(http, gateway, "GET", "/v1/campaigns")
    assert status == 200, listed
    by_id = {c["id"]: c for c in listed["campaigns"]}
    assert cid in by_id and again["id"] in by_id
    assert by_id[cid]["name"] == "No id given"
    assert await show(http, gateway, cid) == made
    status, _, _ = await claim(http, gateway, cid, gateway.token("gen-user"))
    assert status == 201


async def test_show_unknown_is_404(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    status, body = await admin(http, gateway, "GET", f"/v1/campaigns/{campaign_id('nope')}")
    assert (status, body["code"]) == (404, "not_found")


# ---- pause, resume, end ------------------------------------------------------------------

async def test_pause_and_resume(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=10))["id"]
    status, body = await act(http, gateway, cid, "pause")
    assert (status, body["status"]) == (200, "paused"), body
    # The claim script checks the status itself: no claim is granted once pause returned.
    for i in range(6):
        status, got, headers = await claim(http, gateway, cid, gateway.token(f"p{i}"))
        assert (status, got["code"]) == (409, "paused"), got
        assert headers.get("Retry-After")
    assert (await show(http, gateway, cid))["claimed"] == 0
    status, body = await act(http, gateway, cid, "pause")  # pausing twice is harmless
    assert (status, body["status"]) == (200, "paused")
    status, body = await act(http, gateway, cid, "resume")
    assert (status, body["status"]) == (200, "live"), body
    grant = await claim_until(http, gateway, cid, "after-resume", 201)
    assert grant["campaign_id"] == cid
    info = await show(http, gateway, cid)
    assert (info["status"], info["claimed"], info["remaining"]) == ("live", 1, 9)


async def test_end_is_final(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=10))["id"]
    status, _, _ = await claim(http, gateway, cid, gateway.token("early"))
    assert status == 201
    status, body = await act(http, gateway, cid, "end")
    assert (status, body["status"]) == (200, "ended"), body
    for i in range(6):
        status, got, _ = await claim(http, gateway, cid, gateway.token(f"late{i}"))
        assert (status, got["code"]) == (410, "ended"), got
    for verb, body_ in (("resume", None), ("pause", None), ("restock", {"quantity": 5})):
        status, got = await act(http, gateway, cid, verb, body_)
        assert (status, got["code"]) == (409, "ended"), (verb, got)
        assert got["status"] == 409
    status, body = await act(http, gateway, cid, "end")  # ending twice is harmless
    assert (status, body["status"]) == (200, "ended")
    info = await show(http, gateway, cid)
    assert (info["status"], info["stock"], info["remaining"], info["claimed"]) == (
        "ended", 10, 9, 1)


async def test_restock_of_a_campaign_past_its_window_conflicts(
    http: aiohttp.ClientSession, gateway: Gateway,
) -> None:
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(minutes=1)).isoformat()
    end = (now - dt.timedelta(seconds=1)).isoformat()
    cid = (await create_campaign(http, gateway, starts_at=start, ends_at=end))["id"]
    status, got = await act(http, gateway, cid, "restock", {"quantity": 5})
    assert (status, got["code"]) == (409, "ended"), got
    assert (await show(http, gateway, cid))["stock"] == 100


# ---- restock and the numbers -------------------------------------------------------------

async def test_claimed_counts_grants(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=3))["id"]
    grants = 0
    for i in range(5):
        status, got, _ = await claim(http, gateway, cid, gateway.token(f"n{i}"))
        assert status in (201, 410), got
        grants += status == 201
        # A repeat by the same user is refused and must not count.
        status, got, _ = await claim(http, gateway, cid, gateway.token(f"n{i}"))
        assert status in (409, 410), got
    assert grants == 3
    info = await show(http, gateway, cid)
    assert (info["stock"], info["remaining"], info["claimed"]) == (3, 0, 3)
    status, listed = await admin(http, gateway, "GET", "/v1/campaigns")
    assert status == 200
    mine = next(c for c in listed["campaigns"] if c["id"] == cid)
    assert (mine["stock"], mine["remaining"], mine["claimed"]) == (3, 0, 3)


async def test_restock_adds_stock(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=2))["id"]
    for i in range(2):
        status, got, _ = await claim(http, gateway, cid, gateway.token(f"r{i}"))
        assert status == 201, got
    status, got, _ = await claim(http, gateway, cid, gateway.token("r-late"))
    assert (status, got["code"]) == (410, "sold_out"), got
    status, body = await act(http, gateway, cid, "restock", {"quantity": 3})
    assert status == 200, body
    assert (body["stock"], body["remaining"], body["claimed"]) == (5, 3, 2)
    # Every worker drops its sold-out flag: the late user gets a coupon now.
    grant = await claim_until(http, gateway, cid, "r-late", 201)
    assert grant["seq"] == 3
    status, body = await act(http, gateway, cid, "restock", {"quantity": 10})
    assert (status, body["stock"], body["remaining"], body["claimed"]) == (200, 15, 12, 3)
    assert await show(http, gateway, cid) == body


# ---- OpenAPI documents -------------------------------------------------------------------

async def test_public_openapi(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    async with http.get(gateway.base + "/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert "post" in paths["/v1/campaigns/{id}/claims"]
    assert "/v1/campaigns/{id}/claims/mine" in paths
    for admin_path in ADMIN_PATHS:
        assert admin_path not in paths, admin_path
    assert "CampaignSpec" not in doc.get("components", {}).get("schemas", {})


async def test_admin_openapi(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    async with http.get(gateway.base + "/openapi-admin.json") as r:
        assert r.status == 401
        assert (await r.json(content_type=None))["code"] == "unauthorized"
    status, doc = await admin(http, gateway, "GET", "/openapi-admin.json")
    assert status == 200
    for admin_path in ADMIN_PATHS:
        assert admin_path in doc["paths"], admin_path
    assert "post" in doc["paths"]["/v1/campaigns/{id}/restock"]


# ---- eligibility -------------------------------------------------------------------------

ELIGIBILITY: list[Any] = [
    pytest.param({"require_tags": ["verified"]}, {}, None, {"tags": ["verified", "vip"]}, None,
                 id="tags-missing"),
    pytest.param({"require_tags": ["verified", "new_user"]}, {"tags": ["verified"]}, None,
                 {"tags": ["new_user", "verified"]}, None, id="tags-partial"),
    pytest.param({"regions": ["sh", "bj"]}, {"region": "gz"}, None, {"region": "bj"}, None,
                 id="region-other"),
    pytest.param({"regions": ["sh"]}, {}, None, {"region": "sh"}, None, id="region-none"),
    pytest.param({"channels": ["app"]}, {}, None, {}, {"channel": "app"}, id="channel-none"),
    pytest.param({"channels": ["app", "mini"]}, {}, {"channel": "web"}, {},
                 {"channel": "mini"}, id="channel-other"),
]


@pytest.mark.parametrize(("rule", "bad_claims", "bad_body", "good_claims", "good_body"),
                         ELIGIBILITY)
async def test_eligibility(
    http: aiohttp.ClientSession, gateway: Gateway, rule: dict[str, Any],
    bad_claims: dict[str, Any], bad_body: Any, good_claims: dict[str, Any], good_body: Any,
) -> None:
    cid = (await create_campaign(http, gateway, stock=5, eligibility=rule))["id"]
    status, got, _ = await claim(http, gateway, cid, gateway.token("who", **bad_claims), bad_body)
    assert (status, got["code"]) == (403, "not_eligible"), got
    assert got["status"] == 403 and got["detail"]
    status, got, _ = await claim(http, gateway, cid, gateway.token("who", **good_claims),
                                 good_body)
    assert status == 201, got
    assert got["user_id"] == "who"
    info = await show(http, gateway, cid)
    assert (info["remaining"], info["claimed"]) == (4, 1)


async def test_all_rules_together(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    rule = {"require_tags": ["verified"], "regions": ["sh"], "channels": ["app"]}
    cid = (await create_campaign(http, gateway, eligibility=rule))["id"]
    ok = {"tags": ["verified"], "region": "sh"}
    for claims_, body in [({**ok, "tags": []}, {"channel": "app"}),
                          ({**ok, "region": "bj"}, {"channel": "app"}),
                          (ok, {"channel": "web"}), (ok, None)]:
        status, got, _ = await claim(http, gateway, cid, gateway.token("all", **claims_), body)
        assert (status, got["code"]) == (403, "not_eligible"), (claims_, body, got)
    status, got, _ = await claim(http, gateway, cid, gateway.token("all", **ok),
                                 {"channel": "app"})
    assert status == 201, got


async def test_per_device_needs_a_device(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=5, limits={"per_device": 1}))["id"]
    status, got, _ = await claim(http, gateway, cid, gateway.token("nodev"))
    assert (status, got["code"]) == (403, "not_eligible"), got
    status, got, _ = await claim(http, gateway, cid, gateway.token("d1", dev="phone-a"))
    assert status == 201, got
    # Another user on the same device hits the device limit.
    status, got, _ = await claim(http, gateway, cid, gateway.token("d2", dev="phone-a"))
    assert (status, got["code"]) == (409, "limit_reached"), got
    status, got, _ = await claim(http, gateway, cid, gateway.token("d2", dev="phone-b"))
    assert status == 201, got
    assert (await show(http, gateway, cid))["claimed"] == 2


async def test_per_phone_needs_a_phone(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    cid = (await create_campaign(http, gateway, stock=5, limits={"per_phone": 1}))["id"]
    status, got, _ = await claim(http, gateway, cid, gateway.token("nophone"))
    assert (status, got["code"]) == (403, "not_eligible"), got
    status, got, _ = await claim(http, gateway, cid, gateway.token("f1", phone="+8613800000000"))
    assert status == 201, got
    status, got, _ = await claim(http, gateway, cid, gateway.token("f2", phone="+8613800000000"))
    assert (status, got["code"]) == (409, "limit_reached"), got


async def test_top_claimants_by_device_and_ip(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """The anomaly view counts grants per device (keyed hash) and per address."""
    c = await create_campaign(http, gateway, stock=50)
    cid = c["id"]
    for i in range(9):  # a farm: 9 accounts on one device
        assert (await claim(http, gateway, cid, gateway.token(f"farm-{i}", dev="rig-1")))[0] == 201
    assert (await claim(http, gateway, cid, gateway.token("human", dev="phone-7")))[0] == 201
    url = f"{gateway.base}/v1/campaigns/{cid}/top"
    async with http.get(url, params={"by": "device", "limit": "5"},
                        headers=gateway.admin_headers) as r:
        doc = await r.json()
    assert r.status == 200, doc
    assert [t["claims"] for t in doc["top"]] == [9, 1]
    assert "rig-1" not in str(doc)  # devices appear only as keyed hashes
    async with http.get(url, params={"by": "ip"}, headers=gateway.admin_headers) as r:
        doc = await r.json()
    assert doc["top"] == [{"key": "127.0.0.1", "claims": 10}]
    async with http.get(url, params={"by": "phone"}, headers=gateway.admin_headers) as r:
        assert r.status == 422
    async with http.get(url) as r:
        assert r.status == 401
