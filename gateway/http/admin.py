"""Operator endpoints behind admin tokens (reads: read scope; changes: write scope): create,
list, show, pause, resume, end, restock, and live changes of limits, eligibility and
admission. Every change goes through a Lua script, is published to workers and is written
to the audit log."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from gateway import errors
from gateway.domain import (
    Admission,
    CampaignSpec,
    SpecError,
    budget_units,
    effective_stock,
    from_ms,
    patched_spec,
    round_at,
    round_left,
    to_ms,
    validate_spec,
    validity_template,
)
from gateway.http.adminauth import require_admin
from gateway.http.audit import campaign_target, record
from gateway.http.body import decode, read_capped
from gateway.http.context import Gateway
from gateway.http.problems import decode_error
from gateway.http.routes import Routes
from gateway.redis.campaigns import CampaignState, add_shards, parse_meta
from gateway.redis.keys import CAMPAIGNS, CHANGES, CampaignKeys
from gateway.redis.shards import shard_fields, split
from gateway.schemas import (
    Budget,
    CampaignInfo,
    CampaignList,
    LiveChange,
    LiveFields,
    RoundInfo,
    admission_decoder,
    encoder,
    patch_decoder,
    restock_decoder,
    spec_decoder,
)

SPEC_BODY_MAX = 128 * 1024


def info(state: CampaignState, now_ms: int | None = None) -> CampaignInfo:
    """The spec with live numbers; with Redis's clock (`now_ms`), the current round too."""
    s = state.spec
    return CampaignInfo(
        id=state.id, name=s.name, status=state.status, stock=state.total,
        remaining=max(state.remaining, 0), claimed=state.claimed,
        starts_at=s.starts_at, ends_at=s.ends_at, limits=s.limits,
        eligibility=s.eligibility, coupons=s.coupons, admission=s.admission,
        budget=Budget.of(s, state.total, state.claimed),
        rounds=s.rounds, round=None if now_ms is None else round_info(state, now_ms),
        redemption_codes=s.redemption_codes,
        shards=s.shards,
    )


def round_info(state: CampaignState, now_ms: int) -> RoundInfo | None:
    rounds = state.spec.rounds
    if rounds is None:
        return None
    pos = round_at(rounds, state.starts_ms, now_ms)
    left = round_left(rounds, state.round_idx, state.round_left, pos.idx)
    return RoundInfo(pos.idx, max(0, min(left, state.remaining)), from_ms(pos.opens_ms),
                     None if pos.next_ms is None else from_ms(pos.next_ms))


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


def live_meta(spec: CampaignSpec) -> dict[str, str | int]:
    """The meta fields lua/claim.lua reads for what may change live: limits, admission."""
    lim = spec.limits
    rate, burst = script_bucket(spec)
    return {
        "per_user": lim.per_user,
        "per_device": lim.per_device or 0,
        "per_phone": lim.per_phone or 0,
        "per_ip": lim.per_ip or 0,
        "per_subnet": lim.per_subnet or 0,
        "per_user_round": lim.per_user_per_round or 0,
        "adm_rate": repr(rate),
        "adm_burst": burst,
    }


def meta_fields(spec: CampaignSpec) -> dict[str, str | int]:
    return {
        "status": "live",
        "starts": to_ms(spec.starts_at),
        "ends": to_ms(spec.ends_at),
        **live_meta(spec),
        **rounds_meta(spec),
        "remaining": effective_stock(spec),
        "total": effective_stock(spec),
        "created": int(time.time() * 1000),
        "spec": encoder.encode(spec).decode(),
        "validity": validity_template(spec),
    }


def rounds_meta(spec: CampaignSpec) -> dict[str, str | int]:
    """The rounds schedule lua/claim.lua reads; round 0 starts with its own stock."""
    r = spec.rounds
    if r is None:
        return {}
    return {"r_count": r.count, "r_every": r.every_ms, "r_stock": r.stock,
            "r_carry": int(r.carry_over), "r_open": r.open_ms, "r_idx": 0, "r_left": r.stock}


async def create_shards(gw: Gateway, spec: CampaignSpec) -> bool:
    """Shards 1.. first, so shard 0 (what workers load) appears with all of them there."""
    assert spec.id is not None
    fields = meta_fields(spec)
    if spec.redemption_codes:  # the wrong-code allowance is fixed when the campaign is made
        fields["code_miss_max"] = max(1, gw.settings.code_misses_per_min)
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
    after = info(state, gw.views.redis_now_ms())
    await record(gw, request, "campaign.create", campaign_target(spec.id), None, after)
    return json_response(after, 201)


async def list_campaigns(request: web.Request) -> web.Response:
    gw = require_admin(request, "read")
    ids = sorted(str(i) for i in await gw.client.smembers(CAMPAIGNS))
    async with gw.client.pipeline(transaction=False) as pipe:
        for cid in ids:
            pipe.hgetall(CampaignKeys.of(cid).meta)
        metas = await pipe.execute()
    now = gw.views.redis_now_ms()
    states = [parse_meta(cid, m) for cid, m in zip(ids, metas, strict=True)]
    for state in states:
        if state is not None:
            await add_shards(gw.client, state)
    return json_response(CampaignList([info(s, now) for s in states if s is not None]))


async def show_campaign(request: web.Request) -> web.Response:
    gw = require_admin(request, "read")
    state = await fresh_state(gw, request.match_info["id"])
    return json_response(info(state, gw.views.redis_now_ms()))


async def _set_status(request: web.Request, status: str, action: str) -> web.Response:
    gw = require_admin(request)
    cid = request.match_info["id"]
    before = info(await fresh_state(gw, cid))  # now: pub/sub updates the view in place
    result = await gw.scripts.set_status(cid, status)
    if result == 0:
        raise errors.NotFound(f"No campaign {cid!r}")
    if result < 0:
        raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be {status} again")
    for k in range(1, await shard_count(gw, cid)):
        await gw.scripts.set_status(cid, status, shard=k)
    after = info(await fresh_state(gw, cid), gw.views.redis_now_ms())
    await record(gw, request, action, campaign_target(cid), before, after)
    return json_response(after)


async def pause(request: web.Request) -> web.Response:
    return await _set_status(request, "paused", "campaign.pause")


async def resume(request: web.Request) -> web.Response:
    return await _set_status(request, "live", "campaign.resume")


async def end(request: web.Request) -> web.Response:
    return await _set_status(request, "ended", "campaign.end")


async def restock(request: web.Request) -> web.Response:
    gw = require_admin(request)
    cid = request.match_info["id"]
    req = decode(restock_decoder, await read_capped(request, 4096))
    state = await fresh_state(gw, cid)
    before = info(state)
    shards = await shard_count(gw, cid)
    if shards > 1:
        await restock_shards(gw, cid, req.quantity, shards)
        after = info(await fresh_state(gw, cid), gw.views.redis_now_ms())
        await record(gw, request, "campaign.restock", campaign_target(cid), before, after)
        return json_response(after)
    units = budget_units(state.spec)
    result = await gw.scripts.restock(cid, req.quantity, units or 0)
    if result[0] == 0:
        raise errors.NotFound(f"No campaign {cid!r}")
    if result[0] == -2:
        raise errors.OverBudget(f"The budget cap of {cid} pays for {units} units; "
                                f"{result[1]} are put up already")
    if result[0] < 0:
        raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be restocked")
    after = info(await fresh_state(gw, cid), gw.views.redis_now_ms())
    await record(gw, request, "campaign.restock", campaign_target(cid), before, after)
    return json_response(after)


def live_fields(spec: CampaignSpec) -> LiveFields:
    return LiveFields(spec.limits, spec.eligibility, spec.admission)


async def change_live(
    gw: Gateway, cid: str, change: Callable[[CampaignSpec], CampaignSpec]
) -> LiveChange:
    """Apply `change` to a running campaign's spec: validated like a new spec, written with
    the meta fields the claim script reads in one script call (so the next claim decided
    sees it), published so every worker reloads its view. A concurrent operator change
    makes it start over from the newer spec rather than undo that change."""
    for _ in range(5):
        state = await fresh_state(gw, cid)
        if state.spec.shards > 1:  # every shard would need the change in the same step
            raise errors.Conflict(f"Campaign {cid} is sharded: its limits and admission are "
                                  "fixed when it is created")
        try:
            spec = change(state.spec)
        except SpecError as e:
            raise errors.Unprocessable(str(e), field=f"$.{e.field}") from None
        except msgspec.ValidationError as e:
            raise decode_error(e) from None
        result = await gw.scripts.update(
            cid, encoder.encode(spec).decode(), live_meta(spec), state.version)
        if result[0] == 0:
            raise errors.NotFound(f"No campaign {cid!r}")
        if result[0] == -1:
            raise errors.AlreadyEnded(f"Campaign {cid} has ended")
        if result[0] == 1:
            await fresh_state(gw, cid)
            return LiveChange(cid, result[1], result[2], live_fields(state.spec),
                              live_fields(spec))
    raise errors.Conflict(f"Campaign {cid} is changing too often; retry")


async def shard_count(gw: Gateway, cid: str) -> int:
    return int(await gw.client.hget(CampaignKeys.of(cid).meta, "shards") or 1)


async def restock_shards(gw: Gateway, cid: str, quantity: int, shards: int) -> None:
    """Each shard takes its share; then every worker reloads the campaign's sums."""
    for k, share in enumerate(split(quantity, shards)):
        result = await gw.scripts.restock(cid, share, shard=k)
        if result[0] == 0:
            raise errors.NotFound(f"No campaign {cid!r}")
        if result[0] < 0:
            raise errors.AlreadyEnded(f"Campaign {cid} has ended; it cannot be restocked")
    await gw.client.publish(CHANGES, f"changed {cid}")


async def set_admission(request: web.Request) -> web.Response:
    """Change a live campaign's admission rate; every gateway applies it at once (it lives
    in Redis) and the workers' views follow through pub/sub. The LiveChange names the
    admission before and after."""
    gw = require_admin(request)
    cid = request.match_info["id"]
    admission = decode(admission_decoder, await read_capped(request, 4096))
    before = info(await fresh_state(gw, cid))
    await change_live(
        gw, cid, lambda s: validate_spec(msgspec.structs.replace(s, admission=admission)))
    after = info(await fresh_state(gw, cid), gw.views.redis_now_ms())
    await record(gw, request, "campaign.admission", campaign_target(cid), before, after)
    return json_response(after)


async def patch_campaign(request: web.Request) -> web.Response:
    """`PATCH /v1/campaigns/{id}`: a JSON merge patch (RFC 7396) of `limits`, `eligibility`
    and `admission`, applied live; answers the LiveChange (before and after)."""
    gw = require_admin(request)
    cid = request.match_info["id"]
    patch = decode(patch_decoder, await read_capped(request, 64 * 1024))
    change = await change_live(gw, cid, lambda s: patched_spec(s, patch))
    await record(gw, request, "campaign.patch", campaign_target(cid), change.before,
                 change.after)
    return json_response(change)


TOP_BY = {"ip": "ips", "device": "devices", "subnet": "subnets"}


async def top_claimants(request: web.Request) -> web.Response:
    """The anomaly view: the addresses, devices (keyed hashes) or networks with the most
    grants."""
    gw = require_admin(request, "read")
    cid = request.match_info["id"]
    by = request.query.get("by", "ip")
    if by not in TOP_BY:
        raise errors.Unprocessable("`by` must be `ip`, `device` or `subnet`", field="by")
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
    r = Routes(app)
    r.post("/v1/campaigns", create_campaign)
    r.get("/v1/campaigns", list_campaigns)
    r.get("/v1/campaigns/{id}", show_campaign)
    r.post("/v1/campaigns/{id}/pause", pause)
    r.post("/v1/campaigns/{id}/resume", resume)
    r.post("/v1/campaigns/{id}/end", end)
    r.post("/v1/campaigns/{id}/restock", restock)
    r.patch("/v1/campaigns/{id}", patch_campaign)
    r.put("/v1/campaigns/{id}/admission", set_admission)
    r.get("/v1/campaigns/{id}/top", top_claimants)
