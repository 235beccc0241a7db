"""The gateway, writer and tools on a three-master Redis Cluster: exact stock and identity
limits under concurrency, every grant stored, reconcile clean, no CROSSSLOT anywhere."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.cluster import Stack, drained, stack, stored
from tests.conftest import create_campaign
from tests.servers import Gateway
from tests.test_claims_concurrency import check_answers, volley

__all__ = ["stack"]  # the module's fixture


async def show(http: aiohttp.ClientSession, gw: Gateway, cid: str) -> dict[str, Any]:
    async with http.get(f"{gw.base}/v1/campaigns/{cid}", headers=gw.admin_headers) as r:
        body: dict[str, Any] = await r.json()
        return body


async def test_exact_stock_and_limits_on_a_cluster(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=100, limits={"per_user": 1})
    cid = c["id"]
    users = [f"cu{i}" for i in range(400)]
    calls = [(u, gw.token(u)) for u in users for _ in range(3)]

    answers, _ = await volley(gw, cid, calls)

    mine = check_answers(cid, answers)
    assert sum(a.status == 201 for a in answers) == 100
    assert len(mine) == 100 and all(len(ids) == 1 for ids in mine.values())
    view = await show(http, gw, cid)
    assert (view["stock"], view["remaining"], view["claimed"]) == (100, 0, 100)

    await drained(stack, cid, 100)
    assert await stored(stack, cid) == 100
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 0, done.stdout + done.stderr
    tail = await asyncio.to_thread(stack.cli, "tail", "--campaign", cid, "--from-start",
                                   "--count", "100")
    assert tail.returncode == 0, tail.stderr
    assert len(tail.stdout.splitlines()) == 100
    assert "CROSSSLOT" not in stack.logs()


async def test_campaign_changes_reach_every_worker_on_a_cluster(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Pause, resume and restock travel by pub/sub from a script on one node to each worker."""
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=1, limits={"per_user": 1})
    cid = c["id"]
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/pause", headers=gw.admin_headers) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)  # pub/sub reaches the other worker in a moment, not at once
    answers, _ = await volley(gw, cid, [(f"p{i}", gw.token(f"p{i}")) for i in range(20)],
                              fresh=True)
    assert {a.body["code"] for a in answers} == {"paused"}
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/resume", headers=gw.admin_headers) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)  # pub/sub reaches the other worker in a moment, not at once
    answers, _ = await volley(gw, cid, [(f"q{i}", gw.token(f"q{i}")) for i in range(20)],
                              fresh=True)
    assert sorted(a.status for a in answers) == [201] + [410] * 19
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/restock", json={"quantity": 2},
                         headers=gw.admin_headers) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)  # pub/sub reaches the other worker in a moment, not at once
    answers, _ = await volley(gw, cid, [(f"r{i}", gw.token(f"r{i}")) for i in range(20)],
                              fresh=True)
    assert sorted(a.status for a in answers) == [201] * 2 + [410] * 18
