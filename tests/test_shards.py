"""Stock shards on a three-master Redis Cluster: exactly the stock, sold_out only once no unit
is left anywhere, an empty home shard borrows from the others, and a stock move cut short by
a crash is finished, never lost."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from gateway.redis.keys import CampaignKeys, home_shard
from tests.cluster import Stack, drained, stack, stored
from tests.conftest import claim, create_campaign, spec
from tests.test_claims_concurrency import TIMEOUT, Answer, check_answers

__all__ = ["stack"]  # the module's fixture

LEND = (Path(__file__).resolve().parent.parent / "lua" / "lend.lua").read_text()


async def timed_volley(stack: Stack, cid: str, users: list[str]) -> list[tuple[Answer, float]]:
    """Each user claims once, all at once; every answer with its arrival time (epoch ms)."""
    gw = stack.gateway
    conn = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT) as s:

        async def one(user: str) -> tuple[Answer, float]:
            status, body, headers = await claim(s, gw, cid, gw.token(user))
            return Answer(user, status, body, headers), time.time() * 1000

        return list(await asyncio.gather(*(one(u) for u in users)))


def shard_meta(stack: Stack, cid: str, shards: int) -> list[dict[str, str]]:
    c = stack.cluster.client()
    try:
        return [dict(c.hgetall(CampaignKeys.of(cid, k).meta)) for k in range(shards)]
    finally:
        c.close()


def grant_times(stack: Stack, cid: str, shards: int) -> list[int]:
    c = stack.cluster.client()
    try:
        return [int(f["granted_at"]) for k in range(shards)
                for _, f in c.xrange(CampaignKeys.of(cid, k).events)]
    finally:
        c.close()


async def test_sharded_campaign_grants_exactly_its_stock_and_sells_out_last(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=1000, shards=4, limits={"per_user": 1})
    cid = c["id"]
    assert (c["stock"], c["remaining"], c["shards"]) == (1000, 1000, 4)
    users = [f"su{i}" for i in range(5000)]

    timed = await timed_volley(stack, cid, users)

    answers = [a for a, _ in timed]
    mine = check_answers(cid, answers)
    statuses = Counter(a.status for a in answers)
    assert statuses[201] == 1000, statuses
    assert len(mine) == 1000 and all(len(ids) == 1 for ids in mine.values())
    metas = shard_meta(stack, cid, 4)
    assert [m["remaining"] for m in metas] == ["0"] * 4
    assert all(m.get("lent", "0") == "0" for m in metas)
    assert sum(int(m["seq"]) for m in metas) == 1000
    # sold_out only once no unit was left: every such answer arrived after the last grant
    last_grant = max(grant_times(stack, cid, 4))
    sold_out = [t for a, t in timed if a.status == 410]
    assert sold_out, statuses
    assert min(sold_out) >= last_grant, f"sold_out {last_grant - min(sold_out):.0f} ms early"
    async with http.get(f"{gw.base}/v1/campaigns/{cid}", headers=gw.admin_headers) as r:
        view = await r.json()
    assert (view["stock"], view["remaining"], view["claimed"]) == (1000, 0, 1000)

    await drained(stack, cid, 1000)
    assert await stored(stack, cid) == 1000
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CROSSSLOT" not in stack.logs()


def same_home(shards: int, home: int, n: int, prefix: str) -> list[str]:
    users = (f"{prefix}{i}" for i in range(10_000))
    return [u for u in users if home_shard(u, shards) == home][:n]


async def test_an_empty_home_shard_borrows_from_the_others(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=4, shards=4, limits={"per_user": 1})
    cid = c["id"]
    users = same_home(4, 2, 5, "b")
    for u in users[:4]:
        status, body, _ = await claim(http, gw, cid, gw.token(u))
        assert status == 201, body
        # the grant is the home shard's record: a repeat is refused, whichever shard lent
        status, body, _ = await claim(http, gw, cid, gw.token(u))
        assert (status, body["code"]) == (409, "limit_reached") or u == users[3], body
    status, body, _ = await claim(http, gw, cid, gw.token(users[4]))
    assert (status, body["code"]) == (410, "sold_out")
    metas = shard_meta(stack, cid, 4)
    assert [int(m["seq"]) for m in metas] == [0, 0, 4, 0]
    async with http.get(f"{gw.base}/v1/campaigns/{cid}/claims/mine",
                        headers={"Authorization": f"Bearer {gw.token(users[0])}"}) as r:
        assert len((await r.json())["claims"]) == 1
    await drained(stack, cid, 4)
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 0, done.stdout + done.stderr
    tail = await asyncio.to_thread(stack.cli, "tail", "--campaign", cid, "--from-start",
                                   "--count", "4")
    assert tail.returncode == 0, tail.stderr
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sorted(e["user_id"] for e in events) == sorted(users[:4])
    assert len({e["seq"] for e in events}) == 4


async def test_a_crowded_home_shard_borrows_under_concurrency(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Most claimants share one home shard: its stock runs out first and the rest moves in
    while claims race, still exactly the stock and sold_out only after the last grant."""
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=400, shards=4, limits={"per_user": 1})
    cid = c["id"]
    crowd = same_home(4, 1, 900, "crowd")
    others = [u for u in (f"o{i}" for i in range(2000)) if home_shard(u, 4) != 1][:300]
    users = [u for pair in zip(crowd[:300], others, strict=True) for u in pair] + crowd[300:]

    timed = await timed_volley(stack, cid, users)

    answers = [a for a, _ in timed]
    mine = check_answers(cid, answers)
    assert sum(a.status == 201 for a in answers) == 400
    assert len(mine) == 400
    metas = shard_meta(stack, cid, 4)
    assert [m["remaining"] for m in metas] == ["0"] * 4
    assert int(metas[1]["seq"]) > 100, "the crowded shard took in no stock"
    assert sum(int(m["total"]) for m in metas) == 400
    last_grant = max(grant_times(stack, cid, 4))
    assert min(t for a, t in timed if a.status == 410) >= last_grant
    await drained(stack, cid, 400)
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 0, done.stdout + done.stderr


def strand(stack: Stack, cid: str, donor: int, to: int, n: int) -> None:
    """What a gateway that died right after lua/lend.lua leaves behind."""
    k = CampaignKeys.of(cid, donor)
    c = stack.cluster.client()
    try:
        taken = c.eval(LEND, 2, k.meta, k.transfers, n, to, f"crashed-{donor}-{to}")
        assert int(taken[0]) == n
    finally:
        c.close()


async def test_a_transfer_cut_short_is_finished_not_lost(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=2, shards=2, limits={"per_user": 1})
    cid = c["id"]
    strand(stack, cid, donor=0, to=1, n=1)
    strand(stack, cid, donor=1, to=0, n=1)  # every unit is now in transit
    async with http.get(f"{gw.base}/v1/campaigns/{cid}", headers=gw.admin_headers) as r:
        assert (await r.json())["remaining"] == 2  # counted as left, not sold out
    users = same_home(2, 0, 1, "t") + same_home(2, 1, 1, "t")
    granted: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while len(granted) < 2:
        assert time.monotonic() < deadline, "units in transit were never finished"
        for u in users:
            if u not in granted:
                status, body, headers = await claim(http, gw, cid, gw.token(u))
                # not sold_out while units are in transit: 503 with Retry-After until done
                assert status in (201, 503), body
                if status == 201:
                    granted[u] = body
                else:
                    assert "Retry-After" in headers
        await asyncio.sleep(0.3)
    status, body, _ = await claim(http, gw, cid, gw.token("t-late"))
    assert (status, body["code"]) == (410, "sold_out")
    await drained(stack, cid, 2)
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_reconcile_shows_and_repairs_units_in_transit(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=6, shards=3, limits={"per_user": 1})
    cid = c["id"]
    strand(stack, cid, donor=2, to=0, n=1)
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid)
    assert done.returncode == 1, done.stdout
    assert "1 units lent between shards" in done.stdout
    done = await asyncio.to_thread(stack.cli, "reconcile", "--campaign", cid, "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    metas = shard_meta(stack, cid, 3)
    assert [int(m["remaining"]) for m in metas] == [3, 2, 1]
    assert sum(int(m["total"]) for m in metas) == 6


async def test_a_sharded_campaign_limits_per_user_only(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    for over in ({"limits": {"per_user": 1, "per_device": 1}},
                 {"admission": {"admit_per_s": 100}}, {"stock": 2, "shards": 3}):
        body = spec(**{"shards": 3, **over})
        async with http.post(gw.base + "/v1/campaigns", json=body,
                             headers=gw.admin_headers) as r:
            assert r.status == 422, await r.text()


async def test_pause_restock_and_end_reach_every_shard(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateway
    c = await create_campaign(http, gw, stock=4, shards=4, limits={"per_user": 1})
    cid = c["id"]
    admin = gw.admin_headers
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/pause", headers=admin) as r:
        assert r.status == 200
    assert {m["status"] for m in shard_meta(stack, cid, 4)} == {"paused"}
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/resume", headers=admin) as r:
        assert r.status == 200
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/restock", json={"quantity": 6},
                         headers=admin) as r:
        body = await r.json()
        assert (r.status, body["stock"], body["remaining"]) == (200, 10, 10), body
    assert [int(m["remaining"]) for m in shard_meta(stack, cid, 4)] == [3, 3, 2, 2]
    answers = await timed_volley(stack, cid, [f"pr{i}" for i in range(14)])
    assert Counter(a.status for a, _ in answers) == {201: 10, 410: 4}
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/end", headers=admin) as r:
        assert r.status == 200
    assert {m["status"] for m in shard_meta(stack, cid, 4)} == {"ended"}


def test_stock_splits_and_claim_ids_stay_unique() -> None:
    from gateway.redis.shards import shard_fields, split

    assert split(1000, 4) == [250] * 4
    assert split(10, 4) == [3, 3, 2, 2]
    parts = shard_fields({"remaining": 10, "total": 10, "spec": "{}", "status": "live"}, 4)
    assert [(p["remaining"], p["total"], p["shard"], p["shards"]) for p in parts] == [
        (3, 3, 0, 4), (3, 3, 1, 4), (2, 2, 2, 4), (2, 2, 3, 4)]
    assert "spec" in parts[0] and all("spec" not in p for p in parts[1:])
    # lua/claim.lua: seq = (local - 1) * shards + k + 1, distinct across shards
    seqs = [(local - 1) * 4 + k + 1 for k in range(4) for local in range(1, 300)]
    assert len(set(seqs)) == len(seqs) and min(seqs) == 1
    homes = Counter(home_shard(f"user-{i}", 4) for i in range(4000))
    assert set(homes) == {0, 1, 2, 3} and min(homes.values()) > 800
    assert home_shard("alice", 1) == 0 and home_shard("alice", 4) == home_shard("alice", 4)
