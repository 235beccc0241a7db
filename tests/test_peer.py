"""The caller's address: X-Forwarded-For counts only from a trusted proxy, and the per-IP
limit in the claim script sees the address it names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.http.peer import PeerResolver, parse_networks
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
