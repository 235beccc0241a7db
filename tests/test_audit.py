"""The admin audit log end to end: every admin change, made over HTTP against a running
gateway, becomes one row in the store's audit_log (SQLite and PostgreSQL) once the writer
has drained the audit stream — who, what, target, before, after, when, request id."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.durable.store import AuditEntry, Store, open_store
from gateway.redis.keys import AUDIT
from tests.conftest import spec
from tests.servers import Writer, private_stack

DEPLOY = "d" + secrets.token_urlsafe(20)
AUDITOR = "a" + secrets.token_urlsafe(20)


async def entries_when(store: Store, target: str, n: int, timeout_s: float = 30,
                       ) -> list[AuditEntry]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await store.audit_entries(target)
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"{len(got)} audit rows, want {n}: {got}"
        await asyncio.sleep(0.1)


async def test_every_admin_action_is_an_audit_row(tmp_path: Path, store_url: str) -> None:
    with private_stack(tmp_path / "redis", tmp_path / "gw",
                       admin_tokens=f"deploy:write:{DEPLOY},auditor:read:{AUDITOR}") as (rs, gw):
        writer = Writer(gw, store_url)
        writer.start()
        store = await open_store(store_url)
        await store.migrate()
        try:
            await _run(gw, rs, store, store_url)
        finally:
            writer.stop()
            await store.close()


async def _run(gw: Any, rs: Any, store: Store, store_url: str) -> None:
    doc = spec(stock=10)
    cid = doc["id"]
    base = f"{gw.base}/v1/campaigns"
    actions: list[tuple[str, str, str, str, Any]] = [  # action, token, method, url, body
        ("campaign.create", DEPLOY, "POST", base, doc),
        ("campaign.pause", gw.admin_token, "POST", f"{base}/{cid}/pause", None),
        ("campaign.resume", DEPLOY, "POST", f"{base}/{cid}/resume", None),
        ("campaign.restock", DEPLOY, "POST", f"{base}/{cid}/restock", {"quantity": 5}),
        ("campaign.admission", DEPLOY, "PUT", f"{base}/{cid}/admission",
         {"admit_per_s": 40, "burst": 8}),
        ("campaign.end", gw.admin_token, "POST", f"{base}/{cid}/end", None),
    ]
    answers: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for i, (_, token, method, url, body) in enumerate(actions):
            headers = {"Authorization": f"Bearer {token}", "X-Request-Id": f"audit-{cid}-{i}"}
            async with http.request(method, url, json=body, headers=headers) as r:
                assert r.status in (200, 201), await r.text()
                assert r.headers["X-Request-Id"] == f"audit-{cid}-{i}"
                answers.append(await r.json())
        # reads, refusals and failures change nothing and are not audited
        auditor = {"Authorization": f"Bearer {AUDITOR}"}
        async with http.get(f"{base}/{cid}", headers=auditor) as r:
            assert r.status == 200
        async with http.post(f"{base}/{cid}/pause", headers=auditor) as r:
            assert r.status == 403
        async with http.post(f"{base}/{cid}/resume",
                             headers={"Authorization": f"Bearer {DEPLOY}"}) as r:
            assert r.status == 409  # ended for good

    rows = await entries_when(store, f"campaign:{cid}", len(actions))
    await asyncio.sleep(1.5)  # anything extra would have arrived by now
    rows = await store.audit_entries(f"campaign:{cid}")
    assert [r.action for r in rows] == [a[0] for a in actions]
    names = {DEPLOY: "deploy", gw.admin_token: "admin"}
    for i, (row, (_, token, *_rest), after) in enumerate(zip(rows, actions, answers,
                                                               strict=True)):
        assert row.actor == names[token]
        assert row.target == f"campaign:{cid}"
        assert row.request_id == f"audit-{cid}-{i}"
        assert abs(row.at / 1000 - time.time()) < 120
        assert json.loads(row.after or "null") == after  # what the operator was answered
        if i == 0:
            assert row.before is None
        else:
            assert json.loads(row.before or "null") == answers[i - 1]  # one after another
    before_restock, after_restock = (json.loads(rows[3].before or ""),
                                     json.loads(rows[3].after or ""))
    assert (before_restock["stock"], after_restock["stock"]) == (10, 15)
    assert json.loads(rows[4].after or "")["admission"] == {"admit_per_s": 40.0, "burst": 8}
    assert [json.loads(r.after or "")["status"] for r in rows] == [
        "live", "paused", "live", "live", "live", "ended"]

    # drained: acked and gone from the stream; a re-delivered entry is stored once
    c = rs.client()
    try:
        deadline = time.monotonic() + 10
        while c.xlen(AUDIT) or c.xpending(AUDIT, "writer")["pending"]:
            assert time.monotonic() < deadline, "the audit stream was not drained"
            await asyncio.sleep(0.1)
        entry = rows[2]
        c.xadd(AUDIT, {"entry": json.dumps({f: getattr(entry, f)
                                            for f in AuditEntry.__struct_fields__})})
        c.xadd(AUDIT, {"not": "an audit entry"})
        deadline = time.monotonic() + 10
        while c.xlen(AUDIT):
            assert time.monotonic() < deadline, "the audit stream was not drained"
            await asyncio.sleep(0.1)
    finally:
        c.close()
    assert len(await store.audit_entries(f"campaign:{cid}")) == len(actions)

    # the CLI reads the same rows from the store
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "audit", "--campaign", cid,
        env={**gw.env, "FLASHCLAIM_STORE_URL": store_url}, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(x["action"], x["actor"]) for x in lines] == [
        (r.action, r.actor) for r in rows]
    assert lines[3]["after"]["stock"] == 15
