"""`GET /v1/campaigns/{id}/report` (admin token): the campaign's report as JSON, or CSV with
`?format=csv`. Live numbers come from Redis, the claim rate and the channel and region
breakdowns from the durable store (opened once per worker, on first use), rejections from
the claim counter this gateway's workers share."""

from __future__ import annotations

import asyncio
import datetime as dt

from aiohttp import web

from gateway import errors, metrics
from gateway.domain import to_ms
from gateway.durable.store import Store, StoreError, open_store
from gateway.http.admin import fresh_state
from gateway.http.adminauth import require_admin
from gateway.http.routes import Routes
from gateway.redis.keys import CampaignKeys
from gateway.reports import Live, build_report, claim_answers, render_csv
from gateway.schemas import encoder
from gateway.settings import Settings


class StoreHandle:
    """The worker's store connection for reports, opened (and migrated) on first use."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: Store | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Store:
        async with self._lock:
            if self._store is None:
                store = await open_store(self._settings.store_url)
                try:
                    await store.migrate()
                except BaseException:
                    await store.close()
                    raise
                self._store = store
            return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None


STORE = web.AppKey("report_store", StoreHandle)


def answers_counted(campaign_id: str) -> dict[str, int]:
    """flashclaim_claims_total of one campaign, summed over every worker of this gateway
    (this worker's answers up to now, the others' as of their last flush: metrics.FLUSH_S)."""
    metrics.flush()
    samples = [
        (s.labels, s.value)
        for family in metrics.registry().collect()
        if family.name == "flashclaim_claims"
        for s in family.samples
        if s.name == "flashclaim_claims_total"
    ]
    return claim_answers(samples, campaign_id)


def bucket_param(request: web.Request) -> int:
    try:
        bucket_s = int(request.query.get("bucket_s", "60"))
    except ValueError:
        raise errors.Unprocessable("`bucket_s` must be an integer", field="bucket_s") from None
    if not 1 <= bucket_s <= 86_400:
        raise errors.Unprocessable("`bucket_s` must be 1 to 86400", field="bucket_s")
    return bucket_s


async def report(request: web.Request) -> web.Response:
    gw = require_admin(request, "read")
    cid = request.match_info["id"]
    bucket_s = bucket_param(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise errors.Unprocessable("`format` must be `json` or `csv`", field="format")
    state = await fresh_state(gw, cid)
    created = await gw.client.hget(CampaignKeys.of(cid).meta, "created")
    opened_ms = max(to_ms(state.spec.starts_at), int(created or 0))
    try:
        stored = await (await request.app[STORE].get()).report(cid, bucket_s)
    except (StoreError, OSError) as e:
        raise errors.Unavailable(f"The store is not reachable: {e}", retry_after=5) from None
    live = Live(cid, state.spec, state.status, state.total, state.remaining, state.claimed,
                opened_ms)
    doc = build_report(live, stored, answers_counted(cid), bucket_s, dt.datetime.now(dt.UTC))
    if fmt == "csv":
        return web.Response(
            text=render_csv(doc), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{cid}-report.csv"'})
    return web.Response(body=encoder.encode(doc), content_type="application/json")


def add_routes(app: web.Application, settings: Settings) -> None:
    handle = app[STORE] = StoreHandle(settings)

    async def close(app: web.Application) -> None:
        await handle.close()

    app.on_cleanup.append(close)
    Routes(app).get("/v1/campaigns/{id}/report", report)
