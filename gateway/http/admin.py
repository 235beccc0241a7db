"""Operator endpoints behind the admin bearer token: create, list, show, pause, resume, end
and restock campaigns. Every change goes through a Lua script and is published to workers."""

from __future__ import annotations

import heapq
import hmac
import time
from typing import Any

import msgspec
from aiohttp import web

from gateway import errors
from gateway.domain import Admission, CampaignSpec, SpecError, to_ms, validate_spec
from gateway.http.body import decode, read_capped
from gateway.http.context import GATEWAY, Gateway
from gateway.redis.campaigns import CampaignState, add_shards, parse_meta
from gateway.redis.keys import CAMPAIGNS, CHANGES, CampaignKeys
from gateway.redis.shards import shard_fields, split
from gateway.schemas import (
    CampaignInfo,
    CampaignList,
    admission_decoder,
    encoder,
    restock_decoder,
    spec_decoder,
)

SPEC_BODY_MAX = 128 * 1024


def require_admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise errors.Unauthorized(
            "The admin API needs `Authorization: Bearer <admin token>`",
            headers={"WWW-Authenticate": 'Bearer realm="flashclaim-admin"'},
        )
    expected = (gw.settings.admin_token or "").encode()
    if not expected or not hmac.compare_digest(auth[7:].strip().encode(), expected):
        raise errors.Forbidden("That admin token is not valid")
    return gw


def info(state: CampaignState) -> CampaignInfo:
    s = state.spec
    return CampaignInfo(
        id=state.id, name=s.name, status=state.status, stock=state.total,
        remaining=max(state.remaining, 0), claimed=state.claimed,
        starts_at=s.starts_at, ends_at=s.ends_at, limits=s.limits,
        eligibility=s.eligibility, coupons=s.coupons, admission=s.admission, shards=s.shards,
    )


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encoder.encode(obj), status=status, content_type="application/json")


async def fresh_state(gw: Gateway, cid: str) -> CampaignState:
    """Reload into this worker's view too, so it serves its own write at once."""
    state = await gw.views.load(cid)
    if state is None:
        raise errors.NotFound(f"No campaign {cid!r}")
    return state


def script_bucket(spec: CampaignSpec) -> tuple[float, int]:
    """The token bucket lua/claim.lua enforces: the admission rate, or none when a waiting
    room paces admissions instead."""
    rate, burst = (spec.admission or Admission()).bucket
    if spec.admission is not None and spec.admission.waiting_room:
        return 0.0, burst
    return rate, burst


def meta_fields(spec: CampaignSpec) -> dict[str, str | int]:
    lim = spec.limits
    rate, burst = script_bucket(spec)
    return {
        "status": "live",
        "starts": to_ms(spec.starts_at),
        "ends": to_ms(spec.ends_at),
        "per_user": lim.per_user,
        "per_device": lim.per_device or 0,
        "per_phone": lim.per_phone or 0,
        "per_ip": lim.per_ip or 0,
        "remaining": spec.stock,
        "total": spec.stock,
        "created": int(time.time() * 1000),
        "adm_rate": repr(rate),
        "adm_burst": burst,
        "spec": encoder.encode(spec).decode(),
    }


async def create_shards(gw: Gateway, spec: CampaignSpec) -> bool:
    """Shards 1.. first, so shard 0 (what workers load) appears with all of them there."""
    assert spec.id is not None
    fields = meta_fields(spec)
    if spec.shards == 1:
        return await gw.scripts.create(spec.id, fields)
    if await gw.client.exists(CampaignKeys.of(spec.id).meta):
        return False
    parts = shard_fields(fields, spec.shards)
    for k in range(1, spec.shards):
        await gw.scripts.create(spec.id, parts[k], shard=k)
    return await gw.scripts.create(spec.id, parts[0])


async def create_campaign(request: web.Request) -> web.Response:
    gw = require_admin(request)
    spec = decode(spec_decoder, await read_capped(request, SPEC_BODY_MAX))
    try:
        spec = validate_spec(spec)
    except SpecError as e:
        raise errors.Unprocessable(str(e), field=f"$.{e.field}") from None
    assert spec.id is not None
    if not await create_shards(gw, spec):
        raise errors.Conflict(f"Campaign {spec.id!r} already exists")
    await gw.client.sadd(CAMPAIGNS, spec.id)
    state = await gw.views.load(spec.id)
    assert state is not None
    return json_response(info(state), 201)


async def list_campaigns(request: web.Request) -> web.Response:
    gw = require_admin(request)
    ids = sorted(str(i) for i in await gw.client.smembers(CAMPAIGNS))
    async with gw.client.pipeline(transaction=False) as pipe:
        for cid in ids:
            pipe.hgetall(CampaignKeys.of(cid).meta)
        metas = await pipe.execute()
    states = [parse_meta(cid, m) for cid, m in zip(ids, metas, strict=True)]
    for state in states:
        if state is not None:
            await add_shards(gw.client, state)
    return json_response(CampaignList([info(s) for s in states if s is not None]))


async def show_campaign(request: web.Request) -> web.Response:
    gw = require_admin(request)
    return json_response(info(await fresh_state(gw, request.match_info["id"])))


async def _set_status(request: web.Request, status: str) -> web.Response:
    gw = require_admin(request)
    cid = request.match_info["id"]
    result = await gw.scripts.set_status(cid, status)
    if result == 0:
        raise errors.NotFound(f"No campaign {cid!r}")
    if result < 0:
        raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be {status} again")
    for k in range(1, await shard_count(gw, cid)):
        await gw.scripts.set_status(cid, status, shard=k)
    return json_response(info(await fresh_state(gw, cid)))


async def pause(request: web.Request) -> web.Response:
    return await _set_status(request, "paused")


async def resume(request: web.Request) -> web.Response:
    return await _set_status(request, "live")


async def end(request: web.Request) -> web.Response:
    return await _set_status(request, "ended")


async def restock(request: web.Request) -> web.Response:
    gw = require_admin(request)
    cid = request.match_info["id"]
    req = decode(restock_decoder, await read_capped(request, 4096))
    shards = await shard_count(gw, cid)
    if shards > 1:
        return await restock_shards(gw, cid, req.quantity, shards)
    result = await gw.scripts.restock(cid, req.quantity)
    if result[0] == 0:
        raise errors.NotFound(f"No campaign {cid!r}")
    if result[0] < 0:
        raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be restocked")
    return json_response(info(await fresh_state(gw, cid)))


async def shard_count(gw: Gateway, cid: str) -> int:
    return int(await gw.client.hget(CampaignKeys.of(cid).meta, "shards") or 1)


async def restock_shards(gw: Gateway, cid: str, quantity: int, shards: int) -> web.Response:
    """Each shard takes its share; then every worker reloads the campaign's sums."""
    for k, share in enumerate(split(quantity, shards)):
        result = await gw.scripts.restock(cid, share, shard=k)
        if result[0] == 0:
            raise errors.NotFound(f"No campaign {cid!r}")
        if result[0] < 0:
            raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be restocked")
    await gw.client.publish(CHANGES, f"changed {cid}")
    return json_response(info(await fresh_state(gw, cid)))


async def set_admission(request: web.Request) -> web.Response:
    """Change a live campaign's admission rate; every gateway applies it at once (it lives
    in Redis) and the workers' views follow through pub/sub."""
    gw = require_admin(request)
    cid = request.match_info["id"]
    admission = decode(admission_decoder, await read_capped(request, 4096))
    state = await fresh_state(gw, cid)
    try:
        spec = validate_spec(msgspec.structs.replace(state.spec, admission=admission))
    except SpecError as e:
        raise errors.Unprocessable(str(e), field=f"$.{e.field}") from None
    rate, burst = script_bucket(spec)
    result = await gw.scripts.set_admission(cid, rate, burst, encoder.encode(spec).decode())
    if result == 0:
        raise errors.NotFound(f"No campaign {cid!r}")
    if result < 0:
        raise errors.AlreadyEnded(f"Campaign {cid} has ended")
    return json_response(info(await fresh_state(gw, cid)))


TOP_BY = {"ip": "ips", "device": "devices"}


async def top_claimants(request: web.Request) -> web.Response:
    """The anomaly view: the addresses or devices (keyed hashes) with the most grants."""
    gw = require_admin(request)
    cid = request.match_info["id"]
    by = request.query.get("by", "ip")
    if by not in TOP_BY:
        raise errors.Unprocessable("`by` must be `ip` or `device`", field="by")
    try:
        limit = min(max(int(request.query.get("limit", "20")), 1), 1000)
    except ValueError:
        raise errors.Unprocessable("`limit` must be an integer", field="limit") from None
    await fresh_state(gw, cid)  # 404 for an unknown campaign
    totals: dict[str, int] = {}
    for shard in range(await shard_count(gw, cid)):
        key = getattr(CampaignKeys.of(cid, shard), TOP_BY[by])
        async for k, n in gw.client.hscan_iter(key, count=1000):
            totals[str(k)] = totals.get(str(k), 0) + int(n)
    top = heapq.nlargest(limit, ((n, k) for k, n in totals.items()))
    return json_response({"campaign_id": cid, "by": by,
                          "top": [{"key": k, "claims": n} for n, k in top]})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/campaigns", create_campaign)
    r.add_get("/v1/campaigns", list_campaigns)
    r.add_get("/v1/campaigns/{id}", show_campaign)
    r.add_post("/v1/campaigns/{id}/pause", pause)
    r.add_post("/v1/campaigns/{id}/resume", resume)
    r.add_post("/v1/campaigns/{id}/end", end)
    r.add_post("/v1/campaigns/{id}/restock", restock)
    r.add_put("/v1/campaigns/{id}/admission", set_admission)
    r.add_get("/v1/campaigns/{id}/top", top_claimants)
