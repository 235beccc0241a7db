"""Shared fixtures: one private redis-server and one 2-worker gateway for the session,
plus factories for tests that need their own (to stop Redis, skew a clock, ...)."""

from __future__ import annotations

import datetime as dt
import gc
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.servers import Gateway, RedisServer, create_pg_database, drop_pg_database

_ids = itertools.count(1)


@contextmanager
def client_gc_paused() -> Iterator[None]:
    """The test process's cyclic collector off while a test times the gateway: over
    pytest's heap and thousands of requests in flight, one full collection stalls the
    client's loop for tens of ms, which would show as the gateway's latency."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = Gateway(redis_server.url, tmp_path_factory.mktemp("gateway"), workers=2)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.TCPConnector(limit=512, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        yield session


def campaign_id(prefix: str = "t") -> str:
    return f"{prefix}-{next(_ids)}-{dt.datetime.now().strftime('%H%M%S%f')}"


def spec(**over: Any) -> dict[str, Any]:
    """A valid campaign spec, open now for an hour, with overrides."""
    now = dt.datetime.now(dt.UTC)
    doc: dict[str, Any] = {
        "id": campaign_id(),
        "name": "Spend 100, save 30",
        "stock": 100,
        "starts_at": (now - dt.timedelta(seconds=5)).isoformat(),
        "ends_at": (now + dt.timedelta(hours=1)).isoformat(),
        "coupons": [{"kind": "threshold", "value": 3000, "threshold": 10000,
                     "currency": "CNY", "valid_days": 30}],
    }
    doc.update(over)
    return doc


async def create_campaign(
    http: aiohttp.ClientSession, gw: Gateway, **over: Any
) -> dict[str, Any]:
    async with http.post(gw.base + "/v1/campaigns", json=spec(**over),
                         headers=gw.admin_headers) as r:
        body: dict[str, Any] = await r.json(content_type=None)
        assert r.status == 201, body
        return body


async def claim(
    http: aiohttp.ClientSession, gw: Gateway, cid: str, token: str,
    body: Any = None, headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    h = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/claims", json=body, headers=h) as r:
        return r.status, await r.json(content_type=None), r.headers


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A durable store of each kind: a fresh PostgreSQL database, or SQLite in tmp_path."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'claims.db'}"
    return str(request.getfixturevalue("pg_url"))  # sync: it runs its own event loop
