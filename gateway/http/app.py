"""The app factory: `create_app(settings)` wires Redis, scripts, the campaign view, the claim
batcher and the token verifier into an aiohttp app, each resource owned by `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from aiohttp import web
from redis.exceptions import RedisError

from gateway import metrics
from gateway.admission.guard import Admission
from gateway.admission.waitingroom import RoomCache
from gateway.http import admin, blocklist, claims, codes, ops, page, reports
from gateway.http.adminauth import ADMIN_AUTH, AdminAuth, admin_tokens
from gateway.http.context import GATEWAY, Gateway
from gateway.http.peer import PeerResolver
from gateway.http.room import RoomRefresher
from gateway.http.routes import add_fallback
from gateway.identity import KeyFile, PublicKey, Verifier
from gateway.redis.batcher import ClaimBatcher
from gateway.redis.campaigns import CampaignViews
from gateway.redis.client import connect, drop_idle, redis_client
from gateway.redis.health import RedisHealth
from gateway.redis.scripts import Scripts
from gateway.settings import Settings


def make_verifier(settings: Settings, clock: Callable[[], float]) -> Verifier:
    keys: KeyFile | list[PublicKey] = (
        KeyFile(settings.identity_public_keys) if settings.identity_public_keys else [])
    if not settings.identity_secret and not keys:
        raise RuntimeError("set FLASHCLAIM_IDENTITY_SECRET or FLASHCLAIM_IDENTITY_PUBLIC_KEYS")
    return Verifier(settings.identity_secret, keys, settings.signing_key, clock,
                    issuer=settings.identity_issuer, audience=settings.identity_audience,
                    leeway_s=settings.identity_leeway_s)


Part = Literal["all", "public", "admin"]


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               part: Part = "all") -> web.Application:
    """`part` picks the routes: claimant and ops (`public`), the admin API (`admin`, for
    FLASHCLAIM_ADMIN_LISTEN), or both on one port (`all`, the default)."""
    auth = AdminAuth(admin_tokens(settings))  # no admin token, or a malformed one: no start
    verifier = make_verifier(settings, clock)
    peers = PeerResolver(settings.trusted_proxies)  # a bad CIDR stops start-up here
    app = web.Application(client_max_size=256 * 1024)  # no middleware: see http/routes.py
    app[ADMIN_AUTH] = auth

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
        flusher = asyncio.create_task(metrics.flush_periodically())
        yield
        refresher.close()
        await room_task
        views.close()
        await batcher.close()
        await task
        flusher.cancel()  # and flushes what the last requests counted
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await scripts.client.aclose()
        await client.aclose()

    app.cleanup_ctx.append(resources)
    if part != "admin":
        claims.add_routes(app)
    if part != "public":
        admin.add_routes(app)
        reports.add_routes(app, settings)
        page.add_routes(app)
        codes.add_routes(app)
    blocklist.setup(app, routes=part != "public")
    ops.add_routes(app, public=part != "admin", admin=part != "public")
    add_fallback(app)
    return app
