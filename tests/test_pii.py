"""PII and secrets: after a run with phones, devices, blocks, bad tokens and a debug log,
neither Redis, nor the store, nor any log holds a raw phone number, a raw device id, an
identity or admin token, or a configured secret."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp
import jwt

from gateway.domain import keyed_hash
from tests.conftest import claim, create_campaign
from tests.servers import RedisServer, Writer, private_stack

PHONES = [f"+86138000{i:05d}" for i in range(12)]
DEVICES = [f"IMEI-35{i:013d}" for i in range(12)]


def redis_text(redis: RedisServer) -> str:
    """Every key and value in Redis, as text."""
    c = redis.client()
    parts: list[str] = []
    try:
        for key in c.scan_iter(count=1000):
            kind = c.type(key)
            parts.append(key)
            if kind == "string":
                parts.append(str(c.get(key)))
            elif kind == "hash":
                parts.append(str(c.hgetall(key)))
            elif kind == "set":
                parts.append(str(c.smembers(key)))
            elif kind == "zset":
                parts.append(str(c.zrange(key, 0, -1, withscores=True)))
            elif kind == "list":
                parts.append(str(c.lrange(key, 0, -1)))
            elif kind == "stream":
                parts.append(str(c.xrange(key)))
    finally:
        c.close()
    return "\n".join(parts)


async def test_no_pii_or_secret_at_rest_or_in_logs(tmp_path: Path) -> None:
    store = tmp_path / "store" / "claims.db"
    with private_stack(tmp_path / "redis", tmp_path / "gw", log_level="DEBUG",
                       trusted_proxies="127.0.0.1/32") as (redis, gw):
        writer = Writer(gw, f"sqlite:///{store}", log_level="DEBUG")
        writer.start()
        tokens: list[str] = []
        try:
            async with aiohttp.ClientSession() as http:
                c = await create_campaign(http, gw, stock=20,
                                          limits={"per_user": 1, "per_phone": 1,
                                                  "per_device": 1, "per_subnet": 50})
                for i, (phone, dev) in enumerate(zip(PHONES, DEVICES, strict=True)):
                    token = gw.token(f"user-{i}", phone=phone, dev=dev)
                    tokens.append(token)
                    await claim(http, gw, c["id"], token,
                                headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
                    await claim(http, gw, c["id"], token)  # limit_reached: more lines
                # refused tokens: forged, expired, garbage
                forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "dev": DEVICES[0],
                                     "phone": PHONES[0]}, "an attacker's secret, long enough 32",
                                    algorithm="HS256")
                expired = gw.token("late", ttl_s=-60, phone=PHONES[1])
                tokens += [forged, expired]
                for bad in (forged, expired, "garbage." + DEVICES[2]):
                    status, _, _ = await claim(http, gw, c["id"], bad)
                    assert status == 401
                async with http.post(f"{gw.base}/v1/blocks/device", json={"value": DEVICES[3]},
                                     headers=gw.admin_headers) as r:
                    assert r.status == 201
                async with http.get(f"{gw.base}/v1/campaigns", headers=gw.admin_headers) as r:
                    assert r.status == 200
            # the writer drains every grant into the store
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if store.exists():
                    with sqlite3.connect(store) as db:
                        try:
                            stored = db.execute("SELECT count(*) FROM claims").fetchone()[0]
                        except sqlite3.OperationalError:  # the writer has not made it yet
                            stored = 0
                    if stored == len(PHONES):
                        break
                await asyncio.sleep(0.2)
            with sqlite3.connect(store) as db:
                rows = db.execute("SELECT device, phone FROM claims").fetchall()
            assert len(rows) == len(PHONES)
            key = gw.signing_secret.encode()
            assert {r[0] for r in rows} <= {keyed_hash(key, "d:" + d) for d in DEVICES}
            assert {r[1] for r in rows} <= {keyed_hash(key, "p:" + p) for p in PHONES}
            at_rest = redis_text(redis)
        finally:
            writer.stop()
    logs = "\n".join(p.read_text(errors="replace") for p in gw.dir.glob("*.log"))
    stored = store.read_bytes().decode("latin-1")
    for wal in store.parent.glob("claims.db-*"):
        stored += wal.read_bytes().decode("latin-1")
    assert "DEBUG" in logs  # the log was as chatty as it gets
    secrets = [gw.identity_secret, gw.signing_secret, gw.admin_token]
    for where, text in (("redis", at_rest), ("store", stored), ("logs", logs)):
        for needle in [*PHONES, *DEVICES, *tokens, *secrets]:
            assert needle not in text, (where, needle)
        # numbers without their +86 either
        assert not any(p[3:] in text for p in PHONES), where
