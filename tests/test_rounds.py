"""Rolling rounds: a schedule of drops decided on Redis TIME in lua/claim.lua, each round's
stock exact under concurrency, per-round and campaign-wide identity limits, carry-over, the
window between rounds, and a sold-out round that never closes the whole campaign."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.domain import CampaignSpec, Rounds, SpecError, round_at, round_left, validate_spec
from gateway.events import decode_event
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway, RedisServer
from tests.test_admin import admin, show
from tests.test_claims_concurrency import redis_state

EVERY_S = 2


def rounds_spec(count: int, stock: int, lead_s: float = 0.5, **rounds: Any) -> dict[str, Any]:
    """A campaign whose first drop is `lead_s` from now, `count` drops EVERY_S apart."""
    starts = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lead_s)
    return {
        "stock": count * stock,
        "starts_at": starts.isoformat(),
        "ends_at": (starts + dt.timedelta(seconds=EVERY_S * count + 5)).isoformat(),
        "rounds": {"every": EVERY_S, "count": count, "stock": stock, **rounds},
    }


def starts_of(c: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(c["starts_at"]).timestamp()


async def wait_until(t: float) -> None:
    """Redis runs on this machine: its clock is ours."""
    await asyncio.sleep(max(0.0, t - time.time()))


def events_by_round(redis_server: RedisServer, cid: str) -> list[dict[str, str]]:
    return redis_state(redis_server, cid)[2]


# ---- the pure rules ------------------------------------------------------------------------

def test_round_at_walks_the_schedule() -> None:
    r = Rounds(every=10, count=3, stock=5)
    assert round_at(r, 1000, 1000) == (0, 1000, 11_000, True)
    assert round_at(r, 1000, 10_999) == (0, 1000, 11_000, True)
    assert round_at(r, 1000, 11_000) == (1, 11_000, 21_000, True)
    assert round_at(r, 1000, 99_000) == (2, 21_000, None, True)  # the last one stays
    w = Rounds(every="hourly", count=2, stock=5, open_s=600)
    assert round_at(w, 0, 600_000 - 1).open
    assert round_at(w, 0, 600_000) == (0, 0, 3_600_000, False)
    assert round_at(w, 0, 3_600_000).open


def test_round_left_carries_over_or_lapses() -> None:
    carry = Rounds(every=10, count=5, stock=20, carry_over=True)
    lapse = Rounds(every=10, count=5, stock=20)
    assert round_left(carry, 0, 7, 0) == round_left(lapse, 0, 7, 0) == 7
    assert round_left(carry, 0, 7, 1) == 27
    assert round_left(carry, 0, 7, 3) == 67  # two untouched rounds carried too
    assert round_left(lapse, 0, 7, 3) == 20


@pytest.mark.parametrize(("over", "field"), [
    ({"stock": 59}, "stock"),
    ({"rounds": {"every": 3600, "count": 3, "stock": 20}}, "rounds.count"),
    ({"rounds": {"every": 2, "count": 3, "stock": 20, "open_s": 3}}, "rounds.open_s"),
    ({"admission": {"admit_per_s": 5, "waiting_room": True}}, "admission.waiting_room"),
])
def test_rounds_specs_that_make_no_sense(over: dict[str, Any], field: str) -> None:
    doc = spec(**{**rounds_spec(3, 20), **over})
    with pytest.raises(SpecError) as e:
        validate_spec(msgspec.convert(doc, CampaignSpec))
    assert e.value.field == field


def test_per_round_limit_needs_rounds() -> None:
    doc = spec(limits={"per_user_per_round": 1})
    with pytest.raises(SpecError, match="per_user_per_round"):
        validate_spec(msgspec.convert(doc, CampaignSpec))
    daily = spec(stock=60, rounds={"every": "daily", "count": 2, "stock": 30},
                 ends_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat())
    assert validate_spec(msgspec.convert(daily, CampaignSpec)).rounds == Rounds("daily", 2, 30)


# ---- against the gateway -------------------------------------------------------------------

async def test_each_round_grants_exactly_its_stock_under_load(
    gateway: Gateway, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, **rounds_spec(3, 20),
                              limits={"per_user": 2, "per_user_per_round": 1})
    cid, starts = c["id"], starts_of(c)
    users = [f"round-u{i}" for i in range(40)]
    tokens = {u: gateway.token(u) for u in users}
    answers: list[tuple[float, int, dict[str, Any], str | None]] = []

    async def clicker(user: str) -> None:
        conn = aiohttp.TCPConnector(force_close=True)  # new connections: every worker
        async with aiohttp.ClientSession(connector=conn) as s:
            while time.time() < starts + 3 * EVERY_S + 0.3:
                status, body, headers = await claim(s, gateway, cid, tokens[user])
                answers.append((time.time(), status, body, headers.get("Retry-After")))
                await asyncio.sleep(0.15)

    await asyncio.gather(*(clicker(u) for u in users))

    events = events_by_round(redis_server, cid)
    assert Counter(int(e["round"]) for e in events) == {0: 20, 1: 20, 2: 20}
    # subscribers see the round typed, as gateway.events decodes it
    assert Counter(decode_event(e).round for e in events) == {0: 20, 1: 20, 2: 20}
    for e in events:  # each grant in its own round's time
        r = int(e["round"])
        assert starts * 1000 + r * EVERY_S * 1000 - 5 <= int(e["granted_at"])
        if r < 2:
            assert int(e["granted_at"]) < starts * 1000 + (r + 1) * EVERY_S * 1000 + 5
    assert max(Counter((e["round"], e["user_id"]) for e in events).values()) == 1
    assert max(Counter(e["user_id"] for e in events).values()) == 2
    seen = Counter()
    for at, status, body, retry in answers:
        code = body.get("code")
        seen[(status, code, body.get("limit"), "next_round_at" in body)] += 1
        assert status in (201, 409, 410, 429), body
        if status == 410 and "next_round_at" in body:  # a round is out: come back later
            assert code == "sold_out"
            assert retry is not None and 1 <= int(retry) <= EVERY_S
            nxt = dt.datetime.fromisoformat(body["next_round_at"]).timestamp()
            assert at < nxt + 1.5 and nxt - at <= EVERY_S + 0.5  # (answers can arrive late)
        if body.get("limit") == "user_per_round":
            assert retry is not None and body["next_round_at"]
    assert seen[(410, "sold_out", None, True)] > 0, seen
    assert seen[(410, "sold_out", None, False)] > 0, seen  # the last round: all gone
    meta = redis_state(redis_server, cid)[0]
    assert (meta["remaining"], meta["seq"], meta.get("forfeited", "0")) == ("0", "60", "0")


@pytest.mark.parametrize("carry_over", [True, False])
async def test_leftover_carries_over_or_lapses(
    carry_over: bool, gateway: Gateway, redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    c = await create_campaign(http, gateway, **rounds_spec(3, 20, carry_over=carry_over),
                              limits={"per_user": 5, "per_user_per_round": 1})
    cid, starts = c["id"], starts_of(c)
    prefix = f"carry-{carry_over}"

    async def volley(tag: str, n: int) -> Counter[int]:
        got = await asyncio.gather(*(claim(http, gateway, cid, gateway.token(f"{prefix}-{tag}{i}"))
                                     for i in range(n)))
        return Counter(status for status, _, _ in got)

    await wait_until(starts + 0.3)
    assert await volley("a", 5) == {201: 5}
    await wait_until(starts + EVERY_S + 0.3)
    view = await show(http, gateway, cid)
    assert view["round"]["index"] == 1
    assert view["round"]["remaining"] == (35 if carry_over else 20)
    assert await volley("b", 50) == ({201: 35, 410: 15} if carry_over else {201: 20, 410: 30})
    await wait_until(starts + 2 * EVERY_S + 0.3)
    assert await volley("c", 50) == {201: 20, 410: 30}
    status, body, _ = await claim(http, gateway, cid, gateway.token(f"{prefix}-late"))
    assert (status, body["code"]) == (410, "sold_out")
    assert "next_round_at" not in body  # the campaign is over, not just a round
    events = events_by_round(redis_server, cid)
    assert Counter(int(e["round"]) for e in events) == (
        {0: 5, 1: 35, 2: 20} if carry_over else {0: 5, 1: 20, 2: 20})
    meta = redis_state(redis_server, cid)[0]
    lapsed = 0 if carry_over else 15
    assert (int(meta["remaining"]), int(meta.get("forfeited", 0))) == (0, lapsed)
    assert int(meta["total"]) - lapsed == int(meta["seq"]) == len(events)


async def test_between_rounds_answers_not_started_until_the_next_drop(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, **rounds_spec(2, 5, lead_s=0.3, open_s=1))
    cid, starts = c["id"], starts_of(c)
    await wait_until(starts + 0.3)
    status, body, _ = await claim(http, gateway, cid, gateway.token("gap-1"))
    assert status == 201, body
    await wait_until(starts + 1.3)  # round 1's window closed; round 2 drops at +2 s
    for i in range(4):  # both workers, pre-answered or from Redis
        status, body, headers = await claim(http, gateway, cid, gateway.token(f"gap-x{i}"))
        assert (status, body["code"]) == (409, "not_started"), body
        nxt = dt.datetime.fromisoformat(body["next_round_at"]).timestamp()
        assert abs(nxt - (starts + EVERY_S)) < 0.01
        assert 1 <= int(headers["Retry-After"]) <= 1
    await wait_until(starts + EVERY_S + 0.3)
    status, body, _ = await claim(http, gateway, cid, gateway.token("gap-2"))
    assert status == 201, body
    await wait_until(starts + EVERY_S + 1.3)  # the last round's window closed
    status, body, _ = await claim(http, gateway, cid, gateway.token("gap-3"))
    assert (status, body["code"]) == (410, "ended"), body


async def test_restock_goes_to_the_current_round(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, **rounds_spec(2, 2, lead_s=0.2))
    cid, starts = c["id"], starts_of(c)
    await wait_until(starts + 0.2)
    for i in range(2):
        status, body, _ = await claim(http, gateway, cid, gateway.token(f"rs-{i}"))
        assert status == 201, body
    status, body, _ = await claim(http, gateway, cid, gateway.token("rs-x"))
    assert (status, body["code"]) == (410, "sold_out"), body
    assert "next_round_at" in body
    status, view = await admin(http, gateway, "POST", f"/v1/campaigns/{cid}/restock",
                               {"quantity": 1})
    assert status == 200, view
    assert (view["round"]["index"], view["round"]["remaining"], view["remaining"]) == (0, 1, 3)
    deadline = time.monotonic() + 1.5
    while True:  # every worker reopens the round on the restock message
        status, body, _ = await claim(http, gateway, cid, gateway.token("rs-y"))
        if status == 201 or time.monotonic() > deadline:
            break
    assert status == 201, body


async def test_per_round_and_campaign_wide_limits(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, **rounds_spec(3, 20, lead_s=0.2),
                              limits={"per_user": 2, "per_user_per_round": 1})
    cid, starts = c["id"], starts_of(c)
    token = gateway.token("steady")
    await wait_until(starts + 0.2)
    status, first, _ = await claim(http, gateway, cid, token)
    assert status == 201, first
    status, body, headers = await claim(http, gateway, cid, token)
    assert (status, body["code"], body["limit"]) == (409, "limit_reached", "user_per_round")
    assert body["claims"] == [first["claim_id"]]
    assert 1 <= int(headers["Retry-After"]) <= EVERY_S
    nxt = dt.datetime.fromisoformat(body["next_round_at"]).timestamp()
    assert abs(nxt - (starts + EVERY_S)) < 0.01
    await wait_until(starts + EVERY_S + 0.2)
    status, second, _ = await claim(http, gateway, cid, token)
    assert status == 201, second
    await wait_until(starts + 2 * EVERY_S + 0.2)
    status, body, _ = await claim(http, gateway, cid, token)
    assert (status, body["code"], body["limit"]) == (409, "limit_reached", "user")
    assert body["claims"] == [first["claim_id"], second["claim_id"]]
