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
    POW_NONCE_MAX,
    Admission,
    CampaignSpec,
    Outcome,
    build_grant,
    claim_id,
    from_ms,
    ineligibility,
    missing_proof,
    round_at,
)
from gateway.errors import Problem
from gateway.http import blocklist, room
from gateway.http.body import decode, read_capped
from gateway.http.context import GATEWAY, Gateway
from gateway.http.peer import subnet
from gateway.http.problems import (
    ANSWER_CODE,
    REQUEST_ID,
    problem_response,
    shared_problem_response,
)
from gateway.http.room import uses_room
from gateway.http.routes import Routes
from gateway.http.wide import campaign_wide, next_drop, next_round, not_started, round_sold_out
from gateway.metrics import count_claim
from gateway.redeem import code_hash
from gateway.redis.batcher import Verdict, redis_unavailable
from gateway.redis.campaigns import CampaignState
from gateway.redis.keys import CampaignKeys, home_shard
from gateway.schemas import ClaimList, ClaimRequest, claim_request_decoder, encoder

_EMPTY = ClaimRequest()
POW_HEADER = "Proof-Of-Work"


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


def pow_nonce(raw: str | None) -> str | None:
    """The Proof-Of-Work header, checked for shape whether or not the campaign asks for it."""
    if raw is None:
        return None
    if not 1 <= len(raw) <= POW_NONCE_MAX or not all("!" <= ch <= "~" for ch in raw):
        raise errors.BadHeader(
            f"{POW_HEADER} must be 1-{POW_NONCE_MAX} visible ASCII characters", field=POW_HEADER
        )
    return raw


def parse_records(records: str) -> list[tuple[int, int]]:
    """The script's "seq:ms,seq:ms" into (seq, ms) pairs."""
    out = []
    for rec in records.split(","):
        if rec:
            seq, _, ms = rec.partition(":")
            out.append((int(seq), int(ms)))
    return out


def grant_response(gw: Gateway, spec: CampaignSpec, user_id: str, seq: int,
                   ms: int) -> web.Response:
    grant = build_grant(gw.settings.signing_key, spec, user_id, seq, ms)
    return web.Response(body=encoder.encode(grant), status=201, content_type="application/json")


def answer(gw: Gateway, state: CampaignState, user_id: str, v: Verdict) -> web.Response:
    cid = state.id
    gw.views.observe_remaining(cid, v.remaining, v.version)
    match v.outcome:
        case Outcome.GRANTED | Outcome.REPLAYED:
            seq, ms = parse_records(v.data)[0]
            gw.winners.granted(cid, user_id, seq)
            return grant_response(gw, state.spec, user_id, seq, ms)
        case (Outcome.LIMIT_USER | Outcome.LIMIT_DEVICE | Outcome.LIMIT_PHONE | Outcome.LIMIT_IP
              | Outcome.LIMIT_SUBNET):
            kind = LIMIT_KIND[v.outcome]
            seqs = tuple(seq for seq, _ in parse_records(v.data))
            if v.outcome == Outcome.LIMIT_USER:
                gw.winners.holds(cid, user_id, seqs)
            ids = [claim_id(cid, seq) for seq in seqs]
            raise errors.LimitReached(
                f"The {kind} limit of campaign {cid} is reached", claims=ids, limit=kind
            )
        case Outcome.LIMIT_USER_PER_ROUND:
            ids = [claim_id(cid, seq) for seq, _ in parse_records(v.data)]
            nxt = next_drop(state, v.now_ms)
            raise errors.LimitReached(
                f"The per-round limit of campaign {cid} is reached in this round", claims=ids,
                limit=LIMIT_KIND[v.outcome], next_round_at=None if nxt is None else from_ms(nxt),
                retry_after=None if nxt is None else (nxt - v.now_ms) / 1000)
        case Outcome.SOLD_OUT:
            rounds = state.spec.rounds
            if rounds is not None and v.remaining > 0:  # this round only
                pos = round_at(rounds, state.starts_ms, v.now_ms)
                gw.views.observe_round_out(cid, pos.idx, v.version)
                if pos.next_ms is not None:
                    raise round_sold_out(cid, pos.idx, pos.next_ms, v.now_ms)
            raise errors.SoldOut(f"Campaign {cid} is sold out")
        case Outcome.NOT_STARTED:
            if int(v.data) != state.starts_ms:  # the window between two rounds
                raise next_round(cid, int(v.data), v.now_ms)
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
        case Outcome.BAD_CODE | Outcome.CODE_ATTEMPTS:
            raise code_problem(gw, state, v)
        case Outcome.BACKLOG:
            raise errors.Overloaded(
                f"Claims of campaign {cid} are paused while the store catches up", retry_after=2
            )
        case Outcome.UNKNOWN:
            gw.views.forget(cid)
    raise errors.NotFound(f"No campaign {cid!r}")


def redemption_code(gw: Gateway, state: CampaignState, req: ClaimRequest) -> str:
    """The keyed hash of the claim's redemption code, as the claim script looks it up; ""
    for a campaign without codes (a code sent there is ignored)."""
    if not state.spec.redemption_codes:
        return ""
    if req.code is None:
        raise errors.Unprocessable("This campaign needs a redemption code in `code`",
                                   field="$.code")
    return code_hash(gw.settings.signing_key, state.id, req.code)


def code_problem(gw: Gateway, state: CampaignState, v: Verdict) -> Problem:
    """Wrong codes are counted per user per minute (lua/claim.lua); the RateLimit fields
    say how many guesses are left and when the count starts afresh."""
    quota = gw.settings.code_misses_per_min
    reset_s = max(1, math.ceil((60_000 - v.now_ms % 60_000) / 1000))
    if v.outcome == Outcome.BAD_CODE:
        left = max(0, int(v.data))
        return errors.InvalidCode(
            f"That code is not valid for campaign {state.id} (unknown or already used); "
            f"{left} more wrong codes allowed this minute",
            headers={"RateLimit-Policy": f'"codes";q={quota};w=60',
                     "RateLimit": f'"codes";r={left};t={reset_s}'})
    return errors.CodeAttempts(
        f"Too many wrong codes for campaign {state.id}; retry in {reset_s}s",
        retry_after=int(v.data) / 1000,
        headers={"RateLimit-Policy": f'"codes";q={quota};w=60',
                 "RateLimit": f'"codes";r=0;t={reset_s}'})


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
    """Counts every answer in flashclaim_claims_total{campaign, outcome}. A campaign-wide
    answer (sold out, ended, paused) is given right here, from memory: the bulk of a
    release's requests."""
    cid = request.match_info["id"]
    gw = request.app[GATEWAY]
    state = gw.views.cached(cid)
    early = None if state is None else campaign_wide(state, gw.views.redis_now_ms())
    if early is not None and not isinstance(early, errors.NotStarted):
        if state is not None and early.code == errors.SoldOut.code and gw.winners.any_in(cid):
            held = winner_once_sold_out(gw, request, state)
            if held is not None:
                count_claim(cid, held.code)
                return answered(request, held)
        count_claim(cid, early.code)
        return shared_problem_response(early, cid)
    try:
        resp = await _claim(request, gw, cid, state, early)
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
    count_claim(cid, "granted" if resp.status == 201 else resp[ANSWER_CODE])
    return resp


def answered(request: web.Request, p: Problem) -> web.Response:
    """A problem the handler made and answers itself, not raised: an exception kept in a
    local while it propagates ties its traceback and the frame into a reference cycle, and
    thousands a second of those made the collector pause for tens of ms."""
    resp = problem_response(p, request[REQUEST_ID])
    resp[ANSWER_CODE] = p.code
    return resp


def limit_held(gw: Gateway, state: CampaignState, user_id: str) -> Problem | None:
    """`limit_reached` naming the caller's claims, when this worker granted them their whole
    per-user limit (gateway/winners.py): it outranks sold out, and needs no Redis call.
    Not in a campaign with redemption codes: there the code's answer (403) comes first,
    and only the claim script knows it."""
    if state.spec.redemption_codes:
        return None
    seqs = gw.winners.seqs(state.id, user_id)
    if len(seqs) < state.spec.limits.per_user:
        return None
    return errors.LimitReached(f"The user limit of campaign {state.id} is reached",
                               claims=[claim_id(state.id, seq) for seq in seqs], limit="user")


def winner_once_sold_out(gw: Gateway, request: web.Request,
                         state: CampaignState) -> Problem | None:
    """Sold out, and the caller — by a token this worker verified lately, with nothing
    verified now — holds their limit here; a blocklist still outranks that (403 before
    409). (A retry with an Idempotency-Key keeps the campaign-wide answer: only Redis
    replays a grant.)"""
    if "Idempotency-Key" in request.headers:
        return None
    who = gw.verifier.known(request.headers.get("Authorization"))
    if who is None:
        return None
    held = limit_held(gw, state, who.user_id)
    if held is not None:
        try:
            blocklist.check(request, who, gw.peers.address(request))
        except errors.Blocked as blocked:
            return blocked
    return held


async def _claim(request: web.Request, gw: Gateway, cid: str, state: CampaignState | None,
                 early: Problem | None) -> web.Response:
    if state is None:  # not in this worker's view yet
        state = await campaign(gw, cid)
        early = campaign_wide(state, gw.views.redis_now_ms())
        if early is not None and not isinstance(early, errors.NotStarted):
            resp = shared_problem_response(early, cid)
            resp[ANSWER_CODE] = early.code
            return resp
    if early is not None:
        return answered(request, early)  # not started: Retry-After and detail count down
    who = gw.verifier.verify(request.headers.get("Authorization"))
    body = await read_capped(request, gw.settings.claim_body_max)
    req = decode(claim_request_decoder, body, empty=_EMPTY)
    ip = gw.peers.address(request)
    blocklist.check(request, who, ip)
    why_not = ineligibility(state.spec, who, req.channel)
    if why_not is not None:
        raise errors.NotEligible(why_not)
    no_proof = missing_proof(state.spec, who, pow_nonce(request.headers.get(POW_HEADER)))
    if no_proof is not None:
        raise errors.ProofRequired(no_proof)
    ikey = idempotency_key(request.headers.get("Idempotency-Key"))
    if not ikey:  # a repeat click of a winner this worker knows: 409 before any admission
        held = limit_held(gw, state, who.user_id)
        if held is not None:
            return answered(request, held)
    if uses_room(state):
        admitted = await room.gate(gw, state, who, request.headers.get(room.TICKET_HEADER))
        if isinstance(admitted, web.Response):
            return admitted
        ikey = admitted
    # test-only fault point: the script never sees the device, so its limit goes unchecked
    dev = "" if gw.settings.fault == "skip_device_limit" else who.device_h
    claim = (who.user_id, dev, who.phone_h, ip, ikey, req.channel or "", subnet(ip),
             who.region, redemption_code(gw, state, req))
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
    r = Routes(app)
    r.post("/v1/campaigns/{id}/claims", post_claim)
    r.get("/v1/campaigns/{id}/claims/mine", my_claims)
