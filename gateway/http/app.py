"""The app factory: `create_app(settings)` wires Redis, scripts, the campaign view, the claim
batcher and the token verifier into an aiohttp app, each resource owned by `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from redis.exceptions import RedisError

from gateway.admission.guard import Admission
from gateway.admission.waitingroom import RoomCache
from gateway.http import admin, claims, ops
from gateway.http.context import GATEWAY, Gateway
from gateway.http.peer import PeerResolver
from gateway.http.problems import problems_middleware
from gateway.http.room import RoomRefresher
from gateway.identity import Verifier, load_public_keys
from gateway.redis.batcher import ClaimBatcher
from gateway.redis.campaigns import CampaignViews
from gateway.redis.client import connect, drop_idle, redis_client
from gateway.redis.health import RedisHealth
from gateway.redis.scripts import Scripts
from gateway.settings import Settings


def make_verifier(settings: Settings, clock: Callable[[], float]) -> Verifier:
    keys = load_public_keys(settings.identity_public_keys) if settings.identity_public_keys else []
    if not settings.identity_secret and not keys:
        raise RuntimeError("set FLASHCLAIM_IDENTITY_SECRET or FLASHCLAIM_IDENTITY_PUBLIC_KEYS")
    return Verifier(settings.identity_secret, keys, settings.signing_key, clock)


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    if not settings.admin_token:
        raise RuntimeError("FLASHCLAIM_ADMIN_TOKEN is not set")
    verifier = make_verifier(settings, clock)
    peers = PeerResolver(settings.trusted_proxies)  # a bad CIDR stops start-up here
    app = web.Application(middlewares=[problems_middleware], client_max_size=256 * 1024)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = redis_client(settings, retries=1)  # reads, pub/sub
        scripts = Scripts(redis_client(settings), settings.scripts_dir)  # writes: no retries
        health = RedisHealth()
        with contextlib.suppress(RedisError, OSError):
            await connect(client)
            await connect(scripts.client)
            await scripts.load_all()
            health.scripts_loaded = True
        async def drop_stale() -> None:
            for c in (client, scripts.client):
                await drop_idle(c)

        views = CampaignViews(client, clock, on_reconnect=drop_stale)
        def shards_of(cid: str) -> int:
            state = views.cached(cid)
            return state.spec.shards if state is not None else 1

        batcher = ClaimBatcher(
            scripts, health, settings.idempotency_ttl_s * 1000, settings.backlog_max, shards_of
        )
        room = RoomCache()
        app[GATEWAY] = Gateway(
            settings, client, scripts, health, views, batcher, verifier, Admission(settings),
            room, peers,
        )
        task = asyncio.create_task(views.run())
        refresher = RoomRefresher(client, views, room)
        room_task = asyncio.create_task(refresher.run())
        yield
        refresher.close()
        await room_task
        views.close()
        await batcher.close()
        await task
        await scripts.client.aclose()
        await client.aclose()

    app.cleanup_ctx.append(resources)
    claims.add_routes(app)
    admin.add_routes(app)
    ops.add_routes(app)
    return app
