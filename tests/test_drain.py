"""Graceful drain: a gateway SIGTERMed under load says not-ready first, keeps serving for the
drain delay, finishes what it holds and exits 0; clients that honour Retry-After and move to
the other gateway on a refused connection all get an answer, and every 201 is stored."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from gateway.redis.keys import CampaignKeys
from tests.conftest import spec
from tests.servers import Gateway, RedisServer, Writer

DRAIN_DELAY_S = 3.0  # generous: other work may load the machine
USERS = 600
STOCK = 500
SPREAD_S = 6.0  # users arrive over this long, so the load runs through the whole drain


@dataclass
class Stack:
    redis: RedisServer
    a: Gateway  # the one that is SIGTERMed
    b: Gateway
    writer: Writer
    store: Path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    rs = RedisServer(tmp_path / "redis")
    rs.start()
    a = Gateway(rs.url, tmp_path / "a", workers=2, drain_delay_s=str(DRAIN_DELAY_S))
    shared = {"admin_token": a.admin_token, "identity_secret": a.identity_secret,
              "signing_secret": a.signing_secret}
    b = Gateway(rs.url, tmp_path / "b", workers=1, **shared)
    store = tmp_path / "store" / "claims.db"
    store.parent.mkdir()
    writer = Writer(a, f"sqlite:///{store}")
    try:
        a.start()
        b.start()
        writer.start()
        yield Stack(rs, a, b, writer, store)
    finally:
        writer.stop()
        b.stop()
        a.stop()
        rs.stop()


@dataclass
class Clients:
    """Every answer a client settled on, plus what happened on the way."""

    final: dict[str, tuple[int, dict[str, object]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    retries: int = 0
    a_answered_at: list[float] = field(default_factory=list)


async def claim_until_answered(
    http: aiohttp.ClientSession, st: Stack, cid: str, user: str, out: Clients
) -> None:
    """Start on gateway a; a 503 waits its Retry-After and a refused or dropped connection
    moves to the other gateway; the same Idempotency-Key every time, so a retry of a claim
    whose reply was lost gets the original grant back."""
    await asyncio.sleep(random.uniform(0, SPREAD_S))
    headers = {"Authorization": f"Bearer {st.a.token(user)}", "Idempotency-Key": f"k-{user}"}
    gateways = [st.a, st.b]
    turn = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gw = gateways[turn % 2]
        try:
            async with http.post(f"{gw.base}/v1/campaigns/{cid}/claims", headers=headers) as r:
                body = await r.json(content_type=None)
                status, retry_after = r.status, r.headers.get("Retry-After")
        except (aiohttp.ClientConnectionError, TimeoutError):
            out.retries += 1
            turn += 1
            await asyncio.sleep(0.02)
            continue
        if gw is st.a:
            out.a_answered_at.append(time.monotonic())
        if status in (201, 410):
            out.final[user] = (status, body)
            return
        if status in (429, 503) and retry_after is not None:
            out.retries += 1
            turn += status == 503
            await asyncio.sleep(float(retry_after))
            continue
        out.failures.append(f"{user}: {status} {body}")
        return
    out.failures.append(f"{user}: no answer within 60 s")


def readyz(gw: Gateway) -> int | None:
    try:
        with urllib.request.urlopen(gw.base + "/readyz", timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.close()
        return int(e.code)
    except OSError:
        return None


async def test_sigterm_under_load_loses_nothing_and_fails_no_client(stack: Stack) -> None:
    st = stack
    conn = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        doc = spec(stock=STOCK)
        async with http.post(st.a.base + "/v1/campaigns", json=doc,
                             headers=st.a.admin_headers) as r:
            assert r.status == 201, await r.text()
        cid = doc["id"]
        out = Clients()
        load = asyncio.gather(*(claim_until_answered(http, st, cid, f"u{i}", out)
                                for i in range(USERS)))
        task = asyncio.ensure_future(load)

        await asyncio.sleep(1.0)
        assert st.a.proc is not None
        term_at = time.monotonic()
        st.a.proc.terminate()
        # not ready first, while it still serves ...
        while (s := await asyncio.to_thread(readyz, st.a)) == 200:
            assert time.monotonic() - term_at < DRAIN_DELAY_S, "/readyz stayed 200"
            await asyncio.sleep(0.05)
        not_ready_at = time.monotonic()
        assert s == 503, f"/readyz answered {s} after SIGTERM, not 503"
        # ... then it exits cleanly: in-flight requests done, resources closed
        code = await asyncio.to_thread(st.a.proc.wait, 30)
        exited_at = time.monotonic()
        assert code == 0
        assert exited_at - term_at >= DRAIN_DELAY_S
        await task
    assert await asyncio.to_thread(readyz, st.b) == 200

    assert not out.failures, out.failures[:5]
    assert len(out.final) == USERS
    served_in_drain = [t for t in out.a_answered_at if not_ready_at <= t < exited_at]
    assert served_in_drain, "the draining gateway stopped serving before its drain delay"
    assert out.retries > 0, "no client was ever sent elsewhere: the test did not drain"

    grants = {str(body["claim_id"]) for status, body in out.final.values() if status == 201}
    sold_out = [u for u, (status, _) in out.final.items() if status == 410]
    assert len(grants) == STOCK, f"{len(grants)} grants for a stock of {STOCK}"
    assert len(sold_out) == USERS - STOCK

    # every 201 is in Redis's stream and reaches the store; reconcile agrees
    r = st.redis.client()
    try:
        events = r.xrange(CampaignKeys.of(cid).events)
    finally:
        r.close()
    assert {f["claim_id"] for _, f in events} >= grants

    def stored() -> set[str]:
        with sqlite3.connect(st.store) as db:
            rows = db.execute("SELECT claim_id FROM claims WHERE campaign_id = ?", (cid,))
            return {row[0] for row in rows}

    deadline = time.monotonic() + 30
    while (have := await asyncio.to_thread(stored)) != grants:
        assert time.monotonic() < deadline, f"store holds {len(have)} of {len(grants)} grants"
        await asyncio.sleep(0.2)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway.cli", "reconcile", "--campaign", cid],
        env=st.writer.env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"Traceback" not in (st.a.dir / "gateway.log").read_bytes()
