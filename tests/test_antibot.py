"""The per-campaign anti-bot requirement: a tag the identity token must carry, or a
proof-of-work header bound to campaign and user; without it `403 proof_required`."""

from __future__ import annotations

import hashlib
import itertools

import aiohttp
import pytest

from gateway.domain import proof_of_work_ok
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway


def solve(campaign_id: str, user_id: str, bits: int) -> str:
    for n in itertools.count():
        nonce = format(n, "x")
        if proof_of_work_ok(campaign_id, user_id, nonce, bits):
            return nonce
    raise AssertionError("unreachable")


def test_proof_of_work_counts_leading_zero_bits() -> None:
    nonce = solve("c", "u", 12)
    digest = hashlib.sha256(f"c:u:{nonce}".encode()).digest()
    assert digest[0] == 0 and digest[1] >> 4 == 0
    assert not proof_of_work_ok("c", "u", "", 1)
    assert not proof_of_work_ok("c", "u", "x" * 65, 1)


async def test_off_by_default(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway)
    assert "antibot" not in c
    assert (await claim(http, gateway, c["id"], gateway.token("plain")))[0] == 201


async def test_tag_from_the_apps_challenge(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway, antibot={"tag": "human_verified"})
    status, body, _ = await claim(http, gateway, c["id"], gateway.token("bot"))
    assert (status, body["code"]) == (403, "proof_required"), body
    assert "human_verified" in body["detail"]
    status, _, _ = await claim(http, gateway, c["id"],
                               gateway.token("human", tags=["human_verified"]))
    assert status == 201


async def test_proof_of_work(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    bits = 12
    c = await create_campaign(http, gateway, antibot={"pow_bits": bits})
    cid = c["id"]
    status, body, _ = await claim(http, gateway, cid, gateway.token("lazy"))
    assert (status, body["code"]) == (403, "proof_required"), body
    # a nonce that is not a solution, or is the solution for someone else
    wrong = next(format(n, "x") for n in itertools.count()
                 if not proof_of_work_ok(cid, "cheat", format(n, "x"), bits))
    status, body, _ = await claim(http, gateway, cid, gateway.token("cheat"),
                                  headers={"Proof-Of-Work": wrong})
    assert (status, body["code"]) == (403, "proof_required"), body
    theirs = solve(cid, "worker", bits)
    if not proof_of_work_ok(cid, "cheat", theirs, bits):
        status, body, _ = await claim(http, gateway, cid, gateway.token("cheat"),
                                      headers={"Proof-Of-Work": theirs})
        assert (status, body["code"]) == (403, "proof_required"), body
    status, body, _ = await claim(http, gateway, cid, gateway.token("worker"),
                                  headers={"Proof-Of-Work": theirs})
    assert status == 201, body


async def test_both_proofs_together(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    c = await create_campaign(http, gateway, antibot={"tag": "human_verified", "pow_bits": 8})
    pow_header = {"Proof-Of-Work": solve(c["id"], "u", 8)}
    status, body, _ = await claim(http, gateway, c["id"], gateway.token("u"), headers=pow_header)
    assert (status, body["code"]) == (403, "proof_required")
    status, body, _ = await claim(http, gateway, c["id"],
                                  gateway.token("u", tags=["human_verified"]), headers=pow_header)
    assert status == 201, body


@pytest.mark.parametrize("antibot", [{}, {"pow_bits": 0}, {"pow_bits": 33}, {"tag": ""},
                                     {"captcha": True}])
async def test_invalid_antibot_spec(
    http: aiohttp.ClientSession, gateway: Gateway, antibot: dict[str, object]
) -> None:
    async with http.post(gateway.base + "/v1/campaigns", json=spec(antibot=antibot),
                         headers=gateway.admin_headers) as r:
        body = await r.json(content_type=None)
    assert (r.status, body["code"]) == (422, "invalid"), body
    assert "antibot" in f"{body.get('field')} {body['detail']}", body
