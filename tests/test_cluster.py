"""The gateway, writer and tools on a three-master Redis Cluster: exact stock and identity
limits under concurrency, every grant stored, reconcile clean, no CROSSSLOT anywhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster import LocalCluster
from tests.conftest import create_campaign
from tests.servers import Gateway, Writer
from tests.test_claims_concurrency import check_answers, volley


class Stack:
    def __init__(self, cluster: LocalCluster, gateway: Gateway, writer: Writer,
                 store: Path) -> None:
        self.cluster, self.gateway, self.writer, self.store = cluster, gateway, writer, store

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=self.writer.env,
                              capture_output=True, text=True, timeout=60, check=False)

    def logs(self) -> str:
        return "".join((self.gateway.dir / name).read_text(errors="replace")
                       for name in ("gateway.log", "writer.log")
                       if (self.gateway.dir / name).exists())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    gw_dir = tmp_path_factory.mktemp("gateway")
    store = gw_dir / "claims.db"
    gw = Gateway(cluster.url, gw_dir, workers=2)
    writer = Writer(gw, f"sqlite:///{store}")
    try:
        cluster.start()
        gw.start()
        writer.start()
        yield Stack(cluster, gw, writer, store)
    finally:
        writer.stop()
        gw.stop()
        cluster.stop()
    assert "CROSSSLOT" not in Stack(cluster, gw, writer, store).logs()


async def stored(stack: Stack, cid: str) -> int:
    import sqlite3

    def count() -> int:
        if not stack.store.exists():
            return 0
        with sqlite3.connect(stack.store) as db:
            try:
                return int(db.execute("SELECT count(*) FROM claims WHERE campaign_id = ?",
                                      (cid,)).fetchone()[0])
            except sqlite3.OperationalError:  # not migrated yet
                return 0

    return await asyncio.to_thread(count)


async def drained(stack: Stack, cid: str, grants: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while await stored(stack, cid) < grants:
        assert time.monotonic() < deadline, f"the writer stored {await stored(stack, cid)}"
        await asyncio.sleep(0.2)


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
    answers, _ = await volley(gw, cid, [(f"p{i}", gw.token(f"p{i}")) for i in range(20)],
                              fresh=True)
    assert {a.body["code"] for a in answers} == {"paused"}
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/resume", headers=gw.admin_headers) as r:
        assert r.status == 200
    answers, _ = await volley(gw, cid, [(f"q{i}", gw.token(f"q{i}")) for i in range(20)],
                              fresh=True)
    assert sorted(a.status for a in answers) == [201] + [410] * 19
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/restock", json={"quantity": 2},
                         headers=gw.admin_headers) as r:
        assert r.status == 200
    answers, _ = await volley(gw, cid, [(f"r{i}", gw.token(f"r{i}")) for i in range(20)],
                              fresh=True)
    assert sorted(a.status for a in answers) == [201] * 2 + [410] * 18
