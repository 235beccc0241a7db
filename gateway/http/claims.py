"""Claimant endpoints: `POST /v1/campaigns/{id}/claims` and `GET .../claims/mine`.
Campaign-wide answers come first and from memory; then the caller; then one batched
Redis call decides."""

from __future__ import annotations

import math

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.domain import (
    LIMIT_KIND,
    Admission,
    CampaignSpec,
    Outcome,
    build_grant,
    claim_id,
    ineligibility,
)
from gateway.errors import Problem
from gateway.http import room
from gateway.http.body import decode, read_capped
from gateway.http.context import GATEWAY, Gateway
from gateway.http.problems import shared_problem_response
from gateway.http.room import uses_room
from gateway.metrics import count_claim
from gateway.redis.batcher import Verdict, redis_unavailable
from gateway.redis.campaigns import CampaignState
from gateway.redis.keys import CampaignKeys, home_shard
from gateway.schemas import ClaimList, ClaimRequest, claim_request_decoder, encoder

# Pre-answer window questions from the cached Redis clock only this far from a boundary;
# nearer than that, the claim script decides on Redis TIME.
WINDOW_MARGIN_MS = 100
_EMPTY = ClaimRequest()


def campaign_wide(state: CampaignState, now_ms: int | None) -> Problem | None:
    """The answer every caller would get right now, if there is one. (A waiting-room
    campaign takes callers into its queue before the start instead of `not_started`.)"""
    cid = state.id
    past_end = now_ms is not None and now_ms >= state.ends_ms + WINDOW_MARGIN_MS
    if state.status == "ended" or past_end:
        return errors.Ended(f"Campaign {cid} has ended")
    if state.sold_out:
        return errors.SoldOut(f"Campaign {cid} is sold out")
    if state.status == "paused":
        return errors.Paused(f"Campaign {cid} is paused", retry_after=5)
    if now_ms is not None and now_ms < state.starts_ms - WINDOW_MARGIN_MS and not uses_room(state):
        return not_started(cid, state.starts_ms, now_ms)
    return None


def not_started(cid: str, starts_ms: int, now_ms: int) -> Problem:
    return errors.NotStarted(
        f"Campaign {cid} starts in {(starts_ms - now_ms) / 1000:.3f}s",
        retry_after=(starts_ms - now_ms) / 1000,
    )


def idempotency_key(raw: str | None) -> str:
    if raw is None:
        return ""
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise errors.BadHeader(
            "Idempotency-Key must be 1-255 printable characters", field="Idempotency-Key"
        )
    return key


def parse_records(records: str) -> list[tuple[int, int]]:
    """The script's "seq:ms,seq:ms" into (seq, ms) pairs."""
    out = []
    for rec in records.split(","):
        if rec:
            seq, _, ms = rec.partition(":")
            out.append((int(seq), int(ms)))
    return out


def grant_response(gw: Gateway, spec: CampaignSpec, user_id: str, record: str) -> web.Response:
    seq, ms = parse_records(record)[0]
    grant = build_grant(gw.settings.signing_key, spec, user_id, seq, ms)
    return web.Response(body=encoder.encode(grant), status=201, content_type="application/json")


def answer(gw: Gateway, state: CampaignState, user_id: str, v: Verdict) -> web.Response:
    cid = state.id
    gw.views.observe_remaining(cid, v.remaining, v.version)
    match v.outcome:
        case Outcome.GRANTED | Outcome.REPLAYED:
            return grant_response(gw, state.spec, user_id, v.data)
        case Outcome.LIMIT_USER | Outcome.LIMIT_DEVICE | Outcome.LIMIT_PHONE | Outcome.LIMIT_IP:
            kind = LIMIT_KIND[v.outcome]
            ids = [claim_id(cid, seq) for seq, _ in parse_records(v.data)]
            raise errors.LimitReached(
                f"The {kind} limit of campaign {cid} is reached", claims=ids, limit=kind
            )
        case Outcome.SOLD_OUT:
            raise errors.SoldOut(f"Campaign {cid} is sold out")
        case Outcome.NOT_STARTED:
            raise not_started(cid, int(v.data), v.now_ms)
        case Outcome.ENDED:
            raise errors.Ended(f"Campaign {cid} has ended")
        case Outcome.PAUSED:
            raise errors.Paused(f"Campaign {cid} is paused", retry_after=5)
        case Outcome.ADMISSION:
            wait_s = int(v.data) / 1000
            rate, burst = (state.spec.admission or Admission()).bucket
            window = max(1, math.ceil(burst / rate)) if rate else 1
            raise errors.AdmissionLimited(
                f"Campaign {cid} admits {rate:g} claims/s; retry shortly",
                retry_after=wait_s,
                headers={"RateLimit-Policy": f'"campaign";q={burst};w={window}',
                         "RateLimit": f'"campaign";r=0;t={max(1, math.ceil(wait_s))}'},
            )
        case Outcome.BACKLOG:
            raise errors.Overloaded(
                f"Claims of campaign {cid} are paused while the store catches up", retry_after=2
            )
        case Outcome.UNKNOWN:
            gw.views.forget(cid)
    raise errors.NotFound(f"No campaign {cid!r}")


async def campaign(gw: Gateway, cid: str) -> CampaignState:
    try:
        state = await gw.views.get(cid)
    except (RedisError, OSError):
        gw.health.failed()
        raise redis_unavailable() from None
    if state is None:
        raise errors.NotFound(f"No campaign {cid!r}")
    return state


async def post_claim(request: web.Request) -> web.Response:
    """Counts every answer in flashclaim_claims_total{campaign, outcome}."""
    cid = request.match_info["id"]
    try:
        resp = await _claim(request, cid)
    except errors.NotFound:
        count_claim("_unknown", errors.NotFound.code)  # ids from outside: no label per id
        raise
    except Problem as p:
        count_claim(cid, p.code)
        raise
    except (RedisError, ConnectionError, TimeoutError):
        count_claim(cid, errors.Unavailable.code)
        raise
    except Exception:
        count_claim(cid, errors.Problem.code)  # "internal"
        raise
    count_claim(cid, "granted" if resp.status == 201 else resp["code"])
    return resp


async def _claim(request: web.Request, cid: str) -> web.Response:
    gw = request.app[GATEWAY]
    state = gw.views.cached(cid) or await campaign(gw, cid)
    early = campaign_wide(state, gw.views.redis_now_ms())
    if early is not None:
        if isinstance(early, errors.NotStarted):
            raise early
        resp = shared_problem_response(early, cid)
        resp["code"] = early.code
        return resp
    who = gw.verifier.verify(request.headers.get("Authorization"))
    body = await read_capped(request, gw.settings.claim_body_max)
    req = decode(claim_request_decoder, body, empty=_EMPTY)
    why_not = ineligibility(state.spec, who, req.channel)
    if why_not is not None:
        raise errors.NotEligible(why_not)
    ikey = idempotency_key(request.headers.get("Idempotency-Key"))
    if uses_room(state):
        admitted = await room.gate(gw, state, who, request.headers.get(room.TICKET_HEADER))
        if isinstance(admitted, web.Response):
            return admitted
        ikey = admitted
    ip = gw.peers.address(request)
    claim = (who.user_id, who.device_h, who.phone_h, ip, ikey, req.channel or "")
    # Repeat clicks in flight share one Redis decision where a second claim could not be
    # granted anyway; a follower hears what Redis would have told it: the same grant for
    # the same Idempotency-Key, else limit_reached naming the grant.
    shared = bool(ikey) or state.spec.limits.per_user == 1
    # (aiohttp does not cancel handlers when a client goes away, so the futures are
    # awaited without a shield.)
    joined = gw.batcher.in_flight(state.id, claim) if shared else None
    if joined is not None:
        verdict = await joined
        if not ikey and verdict.outcome == Outcome.GRANTED:
            verdict = verdict._replace(outcome=Outcome.LIMIT_USER)
    else:
        gw.admission.check(who.user_id, claim[3])  # per-user / per-IP rate: 429
        slots = gw.admission.slots  # a bounded, deadline-aware queue in front of Redis: 503
        if not slots.try_acquire():
            await gw.admission.wait_for_slot()
        try:
            verdict = await gw.batcher.submit(state.id, claim, shared=shared)
        finally:
            slots.release()
    return answer(gw, state, who.user_id, verdict)


async def my_claims(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    state = await campaign(gw, request.match_info["id"])
    who = gw.verifier.verify(request.headers.get("Authorization"))
    try:
        home = home_shard(who.user_id, state.spec.shards)
        records = await gw.client.hget(CampaignKeys.of(state.id, home).grants, who.user_id)
    except (RedisError, OSError):
        gw.health.failed()
        raise redis_unavailable() from None
    key = gw.settings.signing_key
    grants = [
        build_grant(key, state.spec, who.user_id, seq, ms)
        for seq, ms in parse_records(str(records or ""))
    ]
    return web.Response(body=encoder.encode(ClaimList(grants)), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/campaigns/{id}/claims", post_claim)
    app.router.add_get("/v1/campaigns/{id}/claims/mine", my_claims)
