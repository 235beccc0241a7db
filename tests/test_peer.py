"""The caller's address: X-Forwarded-For counts only from a trusted proxy, and the per-IP
and per-subnet limits in the claim script see the address it names."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.http.peer import PeerResolver, parse_networks, subnet
from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer


def _req(peer: str, *xff: str) -> object:
    headers = CIMultiDict[str]()
    for h in xff:
        headers.add("X-Forwarded-For", h)

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return (peer, 1234) if name == "peername" else default

    return make_mocked_request("POST", "/", headers=headers, transport=Transport())


def test_untrusted_peer_is_the_caller() -> None:
    r = PeerResolver("")
    assert r.address(_req("203.0.113.9", "198.51.100.1")) == "203.0.113.9"  # type: ignore[arg-type]
    r = PeerResolver("10.0.0.0/8")
    assert r.address(_req("203.0.113.9", "198.51.100.1")) == "203.0.113.9"  # type: ignore[arg-type]


def test_trusted_proxy_names_the_nearest_untrusted_hop() -> None:
    r = PeerResolver("10.0.0.0/8, 127.0.0.1")
    # the caller wrote 1.1.1.1 itself; 198.51.100.7 reached our proxy 10.0.0.5
    req = _req("127.0.0.1", "1.1.1.1, 198.51.100.7", "10.0.0.5")
    assert r.address(req) == "198.51.100.7"  # type: ignore[arg-type]
    assert r.address(_req("127.0.0.1")) == "127.0.0.1"  # type: ignore[arg-type]
    assert r.address(_req("127.0.0.1", "garbage")) == "127.0.0.1"  # type: ignore[arg-type]
    assert r.address(_req("127.0.0.1", "10.1.1.1")) == "127.0.0.1"  # type: ignore[arg-type]


def test_bad_cidr_is_named() -> None:
    with pytest.raises(ValueError, match="nope"):
        parse_networks("10.0.0.0/8,nope")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory,
            redis_server: RedisServer) -> Iterator[Gateway]:
    gw = Gateway(redis_server.url, Path(tmp_path_factory.mktemp("proxied")), workers=1,
                 trusted_proxies="127.0.0.1/32")
    gw.start()
    yield gw
    gw.stop()


async def test_per_ip_limit_counts_forwarded_address(
    http: aiohttp.ClientSession, proxied: Gateway, gateway: Gateway
) -> None:
    c = await create_campaign(http, proxied, stock=10, limits={"per_user": 1, "per_ip": 1})
    cid = c["id"]
    ip = {"X-Forwarded-For": "198.51.100.20"}
    assert (await claim(http, proxied, cid, proxied.token("a"), headers=ip))[0] == 201
    status, body, _ = await claim(http, proxied, cid, proxied.token("b"), headers=ip)
    assert (status, body["code"]) == (409, "limit_reached")
    other = {"X-Forwarded-For": "198.51.100.21"}
    assert (await claim(http, proxied, cid, proxied.token("c"), headers=other))[0] == 201
    # without a trusted proxy the header proves nothing: loopback is one address
    c = await create_campaign(http, gateway, stock=10, limits={"per_user": 1, "per_ip": 1})
    assert (await claim(http, gateway, c["id"], gateway.token("a"), headers=ip))[0] == 201
    status, _, _ = await claim(http, gateway, c["id"], gateway.token("b"), headers=other)
    assert status == 409


def test_subnet_is_the_v4_24_or_the_v6_48() -> None:
    assert subnet("198.51.100.77") == "198.51.100.0/24"
    assert subnet("::ffff:198.51.100.77") == "198.51.100.0/24"
    assert subnet("2001:db8:1:ffff::1") == "2001:db8:1::/48"
    assert subnet("garbage") == ""


async def test_per_subnet_limit_counts_the_network(
    http: aiohttp.ClientSession, proxied: Gateway
) -> None:
    c = await create_campaign(http, proxied, stock=20, limits={"per_user": 1, "per_subnet": 2})
    cid = c["id"]

    async def from_(user: str, ip: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await claim(http, proxied, cid, proxied.token(user),
                                      headers={"X-Forwarded-For": ip})
        return status, body

    assert (await from_("a", "198.51.100.1"))[0] == 201
    assert (await from_("b", "198.51.100.2"))[0] == 201
    status, body = await from_("c", "198.51.100.3")
    assert (status, body["code"], body["limit"]) == (409, "limit_reached", "subnet"), body
    assert (await from_("d", "198.51.101.3"))[0] == 201  # the next /24
    assert (await from_("e", "2001:db8:1::1"))[0] == 201
    assert (await from_("f", "2001:db8:1:ffff::1"))[0] == 201
    status, body = await from_("g", "2001:db8:1:77::9")  # the same /48
    assert (status, body["limit"]) == (409, "subnet"), body
    assert (await from_("h", "2001:db8:2::1"))[0] == 201
    async with http.get(f"{proxied.base}/v1/campaigns/{cid}/top", params={"by": "subnet"},
                        headers=proxied.admin_headers) as r:
        top = {t["key"]: t["claims"] for t in (await r.json())["top"]}
    assert top == {"198.51.100.0/24": 2, "198.51.101.0/24": 1, "2001:db8:1::/48": 2,
                   "2001:db8:2::/48": 1}, top


async def test_per_subnet_limit_is_exact_under_concurrency(
    http: aiohttp.ClientSession, proxied: Gateway
) -> None:
    """A farm spread over one /24: 200 accounts at once, exactly the cap gets through."""
    c = await create_campaign(http, proxied, stock=500, limits={"per_user": 1, "per_subnet": 7})
    answers = await asyncio.gather(*[
        claim(http, proxied, c["id"], proxied.token(f"farm-{i}"),
              headers={"X-Forwarded-For": f"203.0.113.{i % 250 + 1}"})
        for i in range(200)
    ])
    statuses = Counter(s for s, _, _ in answers)
    assert statuses == {201: 7, 409: 193}, statuses
