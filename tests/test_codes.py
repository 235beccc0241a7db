"""Redemption codes: generated or imported batches stored as keyed hashes only, each code
claims exactly once under concurrency, wrong guesses answered clearly and then limited per
user per minute, and the `flashclaim codes` CLI."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from gateway.redeem import code_hash, new_redemption_code, normalize_code
from gateway.redis.keys import CampaignKeys
from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer
from tests.test_admin import admin

CODE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")


def test_a_code_has_one_spelling() -> None:
    assert normalize_code("7k3m-q9xd 0000") == normalize_code("7K3MQ9XD0000") == "7K3MQ9XD0000"
    assert normalize_code("abcdeß") is None
    assert normalize_code("short") is None
    assert normalize_code("x" * 65) is None
    assert code_hash(b"k", "c1", "abcd-efgh") == code_hash(b"k", "c1", "ABCDEFGH")
    assert code_hash(b"k", "c1", "ABCDEFGH") != code_hash(b"k", "c2", "ABCDEFGH")
    assert len({new_redemption_code() for _ in range(1000)}) == 1000


async def add_codes(http: aiohttp.ClientSession, gw: Gateway, cid: str,
                    body: Any) -> tuple[int, Any]:
    return await admin(http, gw, "POST", f"/v1/campaigns/{cid}/codes", body)


async def code_campaign(http: aiohttp.ClientSession, gw: Gateway, **over: Any) -> str:
    c = await create_campaign(http, gw, redemption_codes=True, **over)
    assert c["redemption_codes"] is True
    return str(c["id"])


def redis_bytes(redis_server: RedisServer) -> bytes:
    """Everything Redis has written to disk (the AOF), after a rewrite that holds it all."""
    r = redis_server.client()
    try:
        r.bgrewriteaof()
        while r.info("persistence")["aof_rewrite_in_progress"] or r.info(
                "persistence")["aof_rewrite_scheduled"]:
            time.sleep(0.05)
    finally:
        r.close()
    return b"".join(p.read_bytes() for p in redis_server.dir.rglob("*") if p.is_file())


async def test_generated_codes_are_stored_only_as_keyed_hashes(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    cid = await code_campaign(http, gateway)
    status, body = await add_codes(http, gateway, cid, {"generate": 50})
    assert status == 201, body
    codes = body["codes"]
    assert (body["added"], body["duplicates"], body["available"]) == (50, 0, 50)
    assert len(set(codes)) == 50 and all(CODE.match(c) for c in codes), codes[:3]
    status, count = await admin(http, gateway, "GET", f"/v1/campaigns/{cid}/codes")
    assert (status, count["available"]) == (200, 50)

    r = redis_server.client()
    try:
        members = r.smembers(CampaignKeys.of(cid).codes)
    finally:
        r.close()
    key = gateway.signing_secret.encode()
    assert members == {code_hash(key, cid, c) for c in codes}
    on_disk = redis_bytes(redis_server)
    for c in codes:
        assert c.encode() not in on_disk and str(normalize_code(c)).encode() not in on_disk
    assert code_hash(key, cid, codes[0]).encode() in on_disk


async def test_one_code_claimed_by_many_at_once_grants_once(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    cid = await code_campaign(http, gateway, stock=100)
    _, body = await add_codes(http, gateway, cid, {"generate": 3})
    code = body["codes"][0]
    conn = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
    async with aiohttp.ClientSession(connector=conn) as s:
        got = await asyncio.gather(*(
            claim(s, gateway, cid, gateway.token(f"same-code-{i}"), {"code": code})
            for i in range(40)))
    outcomes = Counter((status, b.get("code")) for status, b, _ in got)
    assert outcomes[(201, None)] == 1, outcomes
    assert outcomes[(403, "invalid_code")] == 39, outcomes
    r = redis_server.client()
    try:
        assert r.scard(CampaignKeys.of(cid).codes) == 2
        events = r.xrange(CampaignKeys.of(cid).events)
    finally:
        r.close()
    assert [e["code"] for _, e in events] == [code_hash(gateway.signing_secret.encode(),
                                                        cid, code)]
    # a used code is gone, for its winner too (a lost reply is recovered by Idempotency-Key)
    winner = next(b["user_id"] for status, b, _ in got if status == 201)
    status, again, _ = await claim(http, gateway, cid, gateway.token(winner), {"code": code})
    assert (status, again["code"]) == (403, "invalid_code")


async def test_wrong_codes_are_refused_then_limited(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    cid = await code_campaign(http, gateway)
    _, body = await add_codes(http, gateway, cid, {"generate": 2})
    good = body["codes"][0]
    token = gateway.token("guesser")
    status, doc, _ = await claim(http, gateway, cid, token)
    assert (status, doc["code"], doc["field"]) == (422, "invalid", "$.code")
    for left in (4, 3, 2, 1, 0):
        status, doc, headers = await claim(http, gateway, cid, token, {"code": "WRONG-0000"})
        assert (status, doc["code"]) == (403, "invalid_code"), doc
        assert headers["RateLimit"].startswith(f'"codes";r={left};')
    status, doc, headers = await claim(http, gateway, cid, token, {"code": good})
    assert (status, doc["code"]) == (429, "code_attempts"), doc  # even a good code, now
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["RateLimit-Policy"] == '"codes";q=5;w=60'
    status, grant, _ = await claim(http, gateway, cid, gateway.token("other"),
                                   {"code": good.lower().replace("-", " ")})
    assert status == 201, grant  # another user, the same code in another spelling


async def test_a_code_is_used_only_by_a_grant(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    cid = await code_campaign(http, gateway, stock=100)
    _, body = await add_codes(http, gateway, cid, {"import": ["abcd-1234-efgh", "ZZZZ-9999"]})
    assert (body["added"], body["available"]) == (2, 2)
    assert "codes" not in body  # imported codes are the operator's: never echoed
    token = gateway.token("holder")
    status, grant, _ = await claim(http, gateway, cid, token, {"code": "ABCD1234EFGH"})
    assert status == 201, grant
    status, doc, _ = await claim(http, gateway, cid, token, {"code": "ZZZZ9999"})
    assert (status, doc["code"]) == (409, "limit_reached")  # the limit: code stays unused
    status, count = await admin(http, gateway, "GET", f"/v1/campaigns/{cid}/codes")
    assert count["available"] == 1
    status, body = await add_codes(http, gateway, cid, {"import": ["zzzz9999", "new-code-1"]})
    assert (status, body["added"], body["duplicates"]) == (201, 1, 1)


async def test_bad_batches_change_nothing(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    cid = await code_campaign(http, gateway)
    for bad, field in [({"import": ["fine-code", "no!"]}, "$.import[1]"),
                       ({"import": ["short"]}, "$.import[0]"),
                       ({"generate": 0}, "$.generate"),
                       ({"generate": 2, "import": ["abcdefgh"]}, "$"),
                       ({}, "$")]:
        status, doc = await add_codes(http, gateway, cid, bad)
        assert (status, doc["code"], doc["field"]) == (422, "invalid", field), (bad, doc)
    r = redis_server.client()
    try:
        assert r.exists(CampaignKeys.of(cid).codes) == 0
    finally:
        r.close()
    plain = await create_campaign(http, gateway)
    status, doc = await add_codes(http, gateway, plain["id"], {"generate": 1})
    assert (status, doc["code"]) == (409, "conflict")
    status, doc = await add_codes(http, gateway, "no-such-campaign", {"generate": 1})
    assert status == 404
    status, grant, _ = await claim(http, gateway, plain["id"], gateway.token("c"),
                                   {"code": "IGNORED-HERE"})
    assert status == 201, grant  # a campaign without codes ignores one


async def test_cli_generates_codes_into_a_private_file(
    http: aiohttp.ClientSession, gateway: Gateway, tmp_path: Path
) -> None:
    cid = await code_campaign(http, gateway)
    out = tmp_path / "codes.txt"
    cmd = [sys.executable, "-m", "gateway.cli", "codes", "generate", "--campaign", cid,
           "--count", "7", "--out", str(out)]
    done = await asyncio.to_thread(subprocess.run, cmd, env=gateway.env, capture_output=True,
                                   text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    codes = out.read_text().split()
    assert len(codes) == 7 and all(CODE.match(c) for c in codes)
    assert out.stat().st_mode & 0o777 == 0o600
    again = await asyncio.to_thread(subprocess.run, cmd, env=gateway.env, capture_output=True,
                                    text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr
    status, grant, _ = await claim(http, gateway, cid, gateway.token("cli"), {"code": codes[3]})
    assert status == 201, grant
