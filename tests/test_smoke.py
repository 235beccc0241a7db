"""The shared gateway answers a grant and a sold-out."""

from __future__ import annotations

import aiohttp

from tests.conftest import claim, create_campaign
from tests.servers import Gateway


async def test_grant_then_sold_out(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    c = await create_campaign(http, gateway, stock=1)
    status, body, _ = await claim(http, gateway, c["id"], gateway.token("u1"))
    assert status == 201, body
    assert body["user_id"] == "u1"
    status, body, _ = await claim(http, gateway, c["id"], gateway.token("u2"))
    assert (status, body["code"]) == (410, "sold_out")
