"""Redemption codes of a campaign (admin): generate or import a batch, count what is left.
Redis keeps only keyed hashes (`gateway.domain.code_hash`) in the campaign's `codes` set;
lua/claim.lua takes a hash out with the grant that used it."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import errors
from gateway.http.admin import fresh_state, json_response
from gateway.http.adminauth import require_admin
from gateway.http.audit import campaign_target, record
from gateway.http.body import decode, read_capped
from gateway.http.routes import Routes
from gateway.redeem import code_hash, new_redemption_code, normalize_code
from gateway.redis.keys import CampaignKeys
from gateway.schemas import CodesAdded, CodesInfo, codes_decoder

BODY_MAX = 8 * 1024 * 1024  # an import of 100,000 codes
CHUNK = 10_000  # hashes per SADD


async def add_codes(request: web.Request) -> web.Response:
    """`{"generate": n}` answers the new codes, once; `{"import": [...]}` adds the operator's
    own. Either way only their keyed hashes are stored."""
    gw = require_admin(request)
    cid = request.match_info["id"]
    req = decode(codes_decoder, await read_capped(request, BODY_MAX))
    if (req.generate is None) == (req.import_ is None):
        raise errors.Unprocessable("Give exactly one of `generate` and `import`", field="$")
    state = await fresh_state(gw, cid)
    if not state.spec.redemption_codes:
        raise errors.Conflict(f"Campaign {cid} does not use redemption codes")
    if state.status == "ended":
        raise errors.AlreadyEnded(f"Campaign {cid} has ended")
    if req.import_ is not None:
        plain = []
        for i, raw in enumerate(req.import_):
            flat = normalize_code(raw)
            if flat is None:
                raise errors.Unprocessable(
                    "A code is 6-64 letters and digits (dashes and spaces are ignored)",
                    field=f"$.import[{i}]")
            plain.append(flat)
        shown = None
    else:
        n = req.generate or 0
        plain = shown = await asyncio.to_thread(lambda: [new_redemption_code() for _ in range(n)])
    key = gw.settings.signing_key
    # a large batch takes a moment to hash: off the event loop, which serves claims
    hashes = await asyncio.to_thread(lambda: [code_hash(key, cid, c) for c in plain])
    codes_key = CampaignKeys.of(cid).codes
    async with gw.client.pipeline(transaction=False) as pipe:
        for i in range(0, len(hashes), CHUNK):
            pipe.sadd(codes_key, *hashes[i : i + CHUNK])
        pipe.scard(codes_key)
        *added, available = await pipe.execute()
    n = sum(int(a) for a in added)
    # the audit names how many codes came and went, never the codes themselves
    await record(gw, request, "campaign.codes", campaign_target(cid),
                 {"available": int(available) - n},
                 {"available": int(available), "added": n, "duplicates": len(hashes) - n})
    return json_response(CodesAdded(cid, n, len(hashes) - n, int(available), shown), 201)


async def count_codes(request: web.Request) -> web.Response:
    gw = require_admin(request, "read")
    cid = request.match_info["id"]
    await fresh_state(gw, cid)  # 404 for an unknown campaign
    available = await gw.client.scard(CampaignKeys.of(cid).codes)
    return json_response(CodesInfo(cid, int(available)))


def add_routes(app: web.Application) -> None:
    r = Routes(app)
    r.post("/v1/campaigns/{id}/codes", add_codes)
    r.get("/v1/campaigns/{id}/codes", count_codes)
