"""Ops endpoints: liveness, readiness (Redis reachable, scripts loaded; 503 once draining),
OpenAPI documents, /metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from redis.exceptions import RedisError

from gateway import metrics
from gateway.errors import Unavailable
from gateway.http.adminauth import require_admin
from gateway.http.context import GATEWAY
from gateway.http.openapi import admin_document, public_document
from gateway.http.problems import DRAIN
from gateway.http.routes import Routes
from gateway.schemas import Health, encoder

_OK = encoder.encode(Health("ok"))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAIN].started:
        raise Unavailable("draining: this gateway is shutting down", retry_after=1)
    gw = request.app[GATEWAY]
    try:
        async with asyncio.timeout(1.0):
            await gw.client.ping()
            if not gw.health.scripts_loaded:
                await gw.scripts.load_all()
                gw.health.scripts_loaded = True
    except (RedisError, OSError, TimeoutError):
        raise Unavailable("Redis is not reachable", retry_after=1) from None
    return web.Response(body=_OK, content_type="application/json")


def add_routes(app: web.Application, *, public: bool = True, admin: bool = True) -> None:
    """Liveness and readiness everywhere; the public document and /metrics with the public
    routes, the admin document with the admin routes."""
    r = Routes(app)
    r.get("/healthz", healthz)
    r.get("/readyz", readyz)
    if public:
        public_doc = encoder.encode(public_document())

        async def openapi(request: web.Request) -> web.Response:
            return web.Response(body=public_doc, content_type="application/json")

        r.get("/openapi.json", openapi)
        exposition = make_aiohttp_handler(metrics.registry())

        async def metrics_page(request: web.Request) -> web.StreamResponse:
            metrics.flush()  # this worker's counts up to now; the others' up to FLUSH_S ago
            return await exposition(request)

        r.get("/metrics", metrics_page)
    if admin:
        admin_doc = encoder.encode(admin_document())

        async def openapi_admin(request: web.Request) -> web.Response:
            require_admin(request, "read")
            return web.Response(body=admin_doc, content_type="application/json")

        r.get("/openapi-admin.json", openapi_admin)
