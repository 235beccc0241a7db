"""Blocklist admin endpoints (`/v1/blocks/{kind}`: user, device, ip) and the worker's check
of a claimant against its in-memory copy, made before anything reaches Redis."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.domain import Identity, device_hash
from gateway.http.admin import json_response
from gateway.http.adminauth import require_admin
from gateway.http.audit import record
from gateway.http.body import decode, read_capped
from gateway.http.context import GATEWAY
from gateway.http.routes import Routes
from gateway.redis import blocklist
from gateway.redis.blocklist import KINDS, BlocklistView, Kind, normalize_ip
from gateway.schemas import BlockEntry, BlockList, block_decoder

BLOCKLIST = web.AppKey("blocklist", BlocklistView)
_HASHED = frozenset("0123456789abcdef")


class _Stored(msgspec.Struct):
    reason: str = ""
    at: dt.datetime | None = None


_stored_decoder = msgspec.json.Decoder(_Stored)


def check(request: web.Request, who: Identity, ip: str) -> None:
    """403 `blocked` when the user, their device or their address is on a blocklist."""
    kind = request.app[BLOCKLIST].match(who.user_id, who.device_h, ip)
    if kind is not None:
        what = {"user": "This account", "device": "This device", "ip": "This address"}[kind]
        raise errors.Blocked(f"{what} may not claim")


def _kind(request: web.Request) -> Kind:
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise errors.NotFound("Blocklists are `user`, `device` and `ip`")
    return kind


def _value(request: web.Request, kind: Kind, raw: str, hashed: bool) -> str:
    """The stored form: devices as their keyed hash, addresses canonical."""
    if kind == "device":
        if not hashed:
            return device_hash(request.app[GATEWAY].settings.signing_key, raw)
        if len(raw) != 32 or not set(raw) <= _HASHED:
            raise errors.Unprocessable("A hashed device id is 32 lowercase hex digits",
                                       field="$.value")
        return raw
    if kind == "ip":
        try:
            return normalize_ip(raw)
        except ValueError:
            raise errors.Unprocessable("Expected an IP address or CIDR",
                                       field="$.value") from None
    return raw


def _entry(kind: Kind, value: str, stored: str) -> BlockEntry:
    try:
        s = _stored_decoder.decode(stored)
    except msgspec.DecodeError:
        s = _Stored()
    return BlockEntry(kind, value, s.reason, s.at)


async def list_blocks(request: web.Request) -> web.Response:
    gw = require_admin(request, "read")
    kind = _kind(request)
    found = await blocklist.entries(gw.client, kind)
    return json_response(BlockList(kind, [_entry(kind, v, e) for v, e in sorted(found.items())]))


async def add_block(request: web.Request) -> web.Response:
    gw = require_admin(request)
    kind = _kind(request)
    req = decode(block_decoder, await read_capped(request, 4096))
    value = _value(request, kind, req.value, req.hashed)
    stored = msgspec.json.encode(_Stored(req.reason, dt.datetime.now(dt.UTC))).decode()
    new = await blocklist.change(gw.client, "add", kind, value, stored)
    request.app[BLOCKLIST].blocks.add(kind, value)  # this worker at once, the rest by message
    entry = _entry(kind, value, stored)
    if new:
        await record(gw, request, "block.add", f"{kind}:{value}", None, entry)
    return json_response(entry, 201 if new else 200)


async def remove_block(request: web.Request) -> web.Response:
    gw = require_admin(request)
    kind = _kind(request)
    raw = request.query.get("value", "")
    if not raw:
        raise errors.Unprocessable("Name the entry: `?value=...`", field="value")
    value = _value(request, kind, raw, request.query.get("hashed") in ("1", "true"))
    if not await blocklist.change(gw.client, "del", kind, value):
        raise errors.NotFound(f"{value!r} is not on the {kind} blocklist")
    request.app[BLOCKLIST].blocks.discard(kind, value)
    await record(gw, request, "block.remove", f"{kind}:{value}", BlockEntry(kind, value), None)
    return json_response(BlockEntry(kind, value))


def setup(app: web.Application, *, routes: bool = True) -> None:
    """The worker's copy of the lists kept fresh for the app's lifetime (after the app's
    Redis client exists), and the admin routes where this app serves the admin API."""

    async def view(app: web.Application) -> AsyncIterator[None]:
        v = app[BLOCKLIST] = BlocklistView(app[GATEWAY].client)
        with contextlib.suppress(RedisError, OSError):
            await v.reload()  # serve with the lists from the first request when Redis is up
        task = asyncio.create_task(v.run())
        yield
        v.close()
        await task

    app.cleanup_ctx.append(view)
    if not routes:
        return
    r = Routes(app)
    r.get("/v1/blocks/{kind}", list_blocks)
    r.post("/v1/blocks/{kind}", add_block)
    r.delete("/v1/blocks/{kind}", remove_block)
