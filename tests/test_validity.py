"""Coupon validity, relative (N days after the grant) or a fixed window: on each coupon of
the grant, and the same on the claim event with the caller's channel and region."""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiohttp
import msgspec

from gateway.domain import CampaignSpec, build_grant, from_ms, to_ms, validity_template
from gateway.events import ClaimEvent, decode_event
from gateway.redis.keys import CampaignKeys
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway, RedisServer

WINDOW = ("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+08:00")
PACKAGE = [
    {"kind": "threshold", "value": 3000, "threshold": 10000, "valid_days": 30},
    {"kind": "amount_off", "value": 500, "valid_from": WINDOW[0], "valid_until": WINDOW[1]},
]


def test_template_and_event_agree_with_the_grant() -> None:
    s = msgspec.convert(spec(coupons=PACKAGE), CampaignSpec)
    assert validity_template(s) == (
        f"@/+{30 * 86_400_000},"
        f"{to_ms(dt.datetime.fromisoformat(WINDOW[0]))}/"
        f"{to_ms(dt.datetime.fromisoformat(WINDOW[1]))}")
    at = 1_767_225_600_123
    grant = build_grant(b"k", s, "alice", 1, at)
    ev = ClaimEvent(v=1, claim_id="x.1", campaign_id="x", user_id="alice", n=1, seq=1,
                    granted_at=at, validity=f"{at}/{at + 30 * 86_400_000},"
                    f"{to_ms(grant.coupons[1].valid_from)}/{to_ms(grant.coupons[1].valid_until)}")
    assert ev.coupon_validity() == [(to_ms(c.valid_from), to_ms(c.valid_until))
                                    for c in grant.coupons]


def test_an_event_without_the_new_fields_still_decodes() -> None:
    old = {"v": "1", "claim_id": "c.1", "campaign_id": "c", "user_id": "u", "n": "1",
           "seq": "1", "granted_at": "1767225600000", "device": "", "phone": "", "ip": "",
           "channel": ""}
    ev = decode_event(old)
    assert (ev.region, ev.validity, ev.coupon_validity()) == ("", "", [])


async def test_grant_and_event_carry_validity(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    c = await create_campaign(http, gateway, coupons=PACKAGE, stock=5)
    token = gateway.token("val-user", region="sh")
    status, grant, _ = await claim(http, gateway, c["id"], token, {"channel": "app"})
    assert status == 201, grant
    granted_at = dt.datetime.fromisoformat(grant["granted_at"])
    first, second = grant["coupons"]
    assert dt.datetime.fromisoformat(first["valid_from"]) == granted_at
    assert (dt.datetime.fromisoformat(first["valid_until"])
            == granted_at + dt.timedelta(days=30))
    assert dt.datetime.fromisoformat(second["valid_from"]) == dt.datetime.fromisoformat(WINDOW[0])
    assert (dt.datetime.fromisoformat(second["valid_until"])
            == dt.datetime.fromisoformat(WINDOW[1]))

    r = redis_server.client()
    try:
        entries: Any = r.xrange(CampaignKeys.of(c["id"]).events)
    finally:
        r.close()
    [(_, fields)] = entries
    ev = decode_event(fields)
    assert (ev.channel, ev.region) == ("app", "sh")
    assert from_ms(ev.granted_at) == granted_at
    assert ev.coupon_validity() == [
        (to_ms(dt.datetime.fromisoformat(cp["valid_from"])),
         to_ms(dt.datetime.fromisoformat(cp["valid_until"]))) for cp in grant["coupons"]]
