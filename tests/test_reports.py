"""Campaign reports: the pure builder and its CSV, both stores' report queries (and the
migration that adds the region), and the admin endpoint and `flashclaim report` against a
real gateway, writer and store after a concurrent release."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.domain import CampaignSpec, validate_spec
from gateway.durable import postgres, sqlite
from gateway.durable.store import ClaimRow, StoreReport, open_store
from gateway.events import ClaimEvent
from gateway.reports import Live, build_report, claim_answers, render_csv
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway, RedisServer, Writer

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


def event(cid: str, seq: int, at_ms: int, channel: str = "", region: str = "") -> ClaimEvent:
    return ClaimEvent(v=1, claim_id=f"{cid}.{seq}", campaign_id=cid, user_id=f"u{seq}", n=1,
                      seq=seq, granted_at=at_ms, channel=channel, region=region)


# ---- the pure builder --------------------------------------------------------------------

def live_spec(**over: Any) -> CampaignSpec:
    import msgspec

    return validate_spec(msgspec.convert(spec(**over), CampaignSpec))


def test_report_figures_and_csv() -> None:
    s = live_spec(stock=5)
    live = Live(id=str(s.id), spec=s, status="live", total=5, remaining=0, claimed=5,
                opened_ms=T0 - 2000)
    stored = StoreReport(stored=5, first_ms=T0, last_ms=T0 + 61_500,
                         buckets=[(T0 // 1000, 3), (T0 // 1000 + 60, 2)],
                         by_channel={"app": 4, "": 1}, by_region={"sh": 5})
    answers = {"granted": 5, "sold_out": 40, "limit_reached": 3}
    r = build_report(live, stored, answers, 60, dt.datetime.now(dt.UTC))
    assert (r.issued, r.claimed, r.remaining, r.stored, r.sold_out) == (5, 5, 0, 5, True)
    assert r.time_to_sell_out_s == 63.5  # from the opening to the last grant
    assert r.rejections == {"limit_reached": 3, "sold_out": 40}
    assert [(b.claims, b.per_s) for b in r.claim_rate.buckets] == [(3, 0.05), (2, 0.033)]
    assert r.claim_rate.peak_per_s == 0.05
    assert r.claim_rate.mean_per_s == round(5 / 120, 3)  # two minutes with grants
    assert r.budget.used == 5 * 3000
    rows = list(csv.reader(io.StringIO(render_csv(r))))
    assert rows[0] == ["section", "key", "value"]
    table = {(sec, key): value for sec, key, value in rows[1:]}
    assert table[("summary", "claimed")] == "5"
    assert table[("summary", "time_to_sell_out_s")] == "63.5"
    assert table[("claims_per_bucket", "2026-01-01T00:00:00Z")] == "3"
    assert table[("rejections", "sold_out")] == "40"
    assert table[("channel", "app")] == "4"
    assert table[("region", "sh")] == "5"


def test_no_sell_out_time_until_the_store_has_every_grant() -> None:
    s = live_spec(stock=5)
    live = Live(str(s.id), s, "live", 5, 0, 5, T0)
    behind = StoreReport(4, T0, T0 + 10, [(T0 // 1000, 4)], {}, {})
    assert build_report(live, behind, {}, 60, dt.datetime.now(dt.UTC)).time_to_sell_out_s is None
    open_ = Live(str(s.id), s, "live", 5, 1, 4, T0)
    r = build_report(open_, behind, {}, 60, dt.datetime.now(dt.UTC))
    assert (r.sold_out, r.time_to_sell_out_s) == (False, None)


def test_claim_answers_keeps_one_campaign() -> None:
    samples = [({"campaign": "a", "outcome": "granted"}, 3.0),
               ({"campaign": "a", "outcome": "sold_out"}, 7.0),
               ({"campaign": "b", "outcome": "sold_out"}, 9.0)]
    assert claim_answers(samples, "a") == {"granted": 3, "sold_out": 7}


# ---- the stores --------------------------------------------------------------------------

async def test_store_report_buckets_channels_regions(store_url: str) -> None:
    store = await open_store(store_url)
    await store.migrate()
    try:
        rows = [ClaimRow(event("c1", i, T0 + i * 400, channel=["app", "web"][i % 2],
                               region=["sh", "bj", "gz"][i % 3]), [], f"{T0}-{i}")
                for i in range(1, 11)]  # 0.4 s .. 4.0 s after T0
        rows.append(ClaimRow(event("c2", 1, T0), [], f"{T0}-99"))
        await store.insert_claims(rows)
        r = await store.report("c1", 1)
        assert (r.stored, r.first_ms, r.last_ms) == (10, T0 + 400, T0 + 4000)
        s0 = T0 // 1000
        assert r.buckets == [(s0, 2), (s0 + 1, 2), (s0 + 2, 3), (s0 + 3, 2), (s0 + 4, 1)]
        assert r.by_channel == {"app": 5, "web": 5}
        assert r.by_region == {"sh": 3, "bj": 4, "gz": 3}
        minute = await store.report("c1", 60)
        assert minute.buckets == [(T0 // 1000, 10)]
        empty = await store.report("nobody", 60)
        assert (empty.stored, empty.first_ms, empty.buckets) == (0, None, [])
    finally:
        await store.close()


async def test_region_migration_keeps_older_rows(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store created before the region column: its rows stay, with an empty region."""
    backend = sqlite if store_url.startswith("sqlite") else postgres
    full = list(backend.MIGRATIONS)
    monkeypatch.setattr(backend, "MIGRATIONS", full[:1])
    store = await open_store(store_url)
    await store.migrate()
    old_insert = ("INSERT INTO claims (claim_id, campaign_id, user_id, n, seq, granted_at, "
                  "device, phone, ip, channel, codes, stream_id) VALUES "
                  "('old.1', 'old', 'u', 1, 1, '2026-01-01T00:00:00+00:00', '', '', '', 'app', "
                  "'[]', '1-0')")
    if backend is sqlite:
        await store._db.execute(old_insert)  # type: ignore[attr-defined]
    else:
        await store._pool.execute(old_insert)  # type: ignore[attr-defined]
    monkeypatch.setattr(backend, "MIGRATIONS", full)
    await store.migrate()
    try:
        await store.insert_claims([ClaimRow(event("old", 2, T0, "app", "sh"), [], "2-0")])
        r = await store.report("old", 60)
        assert r.by_region == {"": 1, "sh": 1}
        assert r.by_channel == {"app": 2}
    finally:
        await store.close()


# ---- end to end: gateway, writer, store ------------------------------------------------

@pytest.fixture
def stack(tmp_path: Path, store_url: str) -> Iterator[tuple[Gateway, Writer]]:
    rs = RedisServer(tmp_path / "redis")
    gw = Gateway(rs.url, tmp_path / "gw", workers=2, store_url=store_url)
    writer = Writer(gw, store_url)
    try:
        rs.start()
        gw.start()
        writer.start()
        yield gw, writer
    finally:
        writer.stop()
        gw.stop()
        rs.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def flashclaim(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, configured like the gateway it talks to."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway.cli", *args],
        env={**gw.env, "FLASHCLAIM_URL": gw.base}, capture_output=True, text=True, timeout=60)


async def get_report(http: aiohttp.ClientSession, gw: Gateway, cid: str,
                     query: str = "") -> tuple[int, Any, str]:
    async with http.get(f"{gw.base}/v1/campaigns/{cid}/report{query}",
                        headers=gw.admin_headers) as r:
        text = await r.text()
        return r.status, text, r.headers.get("Content-Type", "")


async def test_report_after_a_release(
    stack: tuple[Gateway, Writer], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gw, _ = stack
    stock, users = 30, 80
    c = await create_campaign(session, gw, stock=stock)
    cid = c["id"]
    channels, regions = ["app", "web", "mini"], ["sh", "bj"]

    async def one(i: int) -> int:
        token = gw.token(f"user-{i}", region=regions[i % 2])
        status, _, _ = await claim(session, gw, cid, token, {"channel": channels[i % 3]})
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(users)))
    assert statuses.count(201) == stock
    assert set(statuses) <= {201, 410}, statuses
    deadline = time.monotonic() + 60
    while True:  # the writer drains the stream into the store; workers flush their counts
        status, text, _ = await get_report(session, gw, cid, "?bucket_s=1")
        assert status == 200, text
        doc = json.loads(text)
        if doc["stored"] == stock and sum(doc["rejections"].values()) >= users - stock:
            break
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.2)
    assert (doc["issued"], doc["claimed"], doc["remaining"]) == (stock, stock, 0)
    assert doc["sold_out"] is True and doc["time_to_sell_out_s"] >= 0
    assert doc["rejections"]["sold_out"] == users - stock
    assert sum(doc["by_channel"].values()) == stock
    assert set(doc["by_channel"]) <= set(channels)
    assert sum(doc["by_region"].values()) == stock and set(doc["by_region"]) <= set(regions)
    assert sum(b["claims"] for b in doc["claim_rate"]["buckets"]) == stock
    assert doc["budget"]["used"] == stock * 3000

    status, text, ctype = await get_report(session, gw, cid, "?format=csv")
    assert status == 200 and ctype.startswith("text/csv")
    table = {(s, k): v for s, k, v in list(csv.reader(io.StringIO(text)))[1:]}
    assert table[("summary", "claimed")] == str(stock)
    assert table[("rejections", "sold_out")] == str(users - stock)

    out = tmp_path / "report.csv"
    done = await flashclaim(gw, "report", "--campaign", cid, "--csv", str(out))
    assert done.returncode == 0, done.stderr
    saved = {tuple(r) for r in csv.reader(io.StringIO(out.read_text()))}
    assert ("summary", "remaining", "0") in saved
    done = await flashclaim(gw, "report", "--campaign", cid)
    assert done.returncode == 0, done.stderr
    assert f"issued {stock}  claimed {stock}  remaining 0" in done.stdout
    assert "sold_out " + str(users - stock) in done.stdout


async def test_report_bad_requests(
    stack: tuple[Gateway, Writer], session: aiohttp.ClientSession
) -> None:
    gw, _ = stack
    cid = (await create_campaign(session, gw, stock=1))["id"]
    for query, field in (("?format=xml", "format"), ("?bucket_s=0", "bucket_s"),
                         ("?bucket_s=x", "bucket_s")):
        status, text, _ = await get_report(session, gw, cid, query)
        assert (status, json.loads(text)["field"]) == (422, field), text
    status, text, _ = await get_report(session, gw, "no-such-campaign")
    assert status == 404, text
    async with session.get(f"{gw.base}/v1/campaigns/{cid}/report") as r:
        assert r.status == 401
    done = await flashclaim(gw, "report", "--campaign", "no-such-campaign")
    assert done.returncode == 1 and "not_found" in done.stderr
