"""Live changes of limits, eligibility and admission (`PATCH /v1/campaigns/{id}`): validated
like a new spec, answered with before/after, applied on every worker within a second, and
in force for the very next claim the script decides."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.domain import CampaignSpec, SpecError, merge_patch, patched_spec, validate_spec
from tests.conftest import claim, create_campaign
from tests.conftest import spec as spec_doc
from tests.servers import Gateway, RedisServer
from tests.test_admin import act, admin, show
from tests.test_claims_concurrency import pinned_sessions, redis_state, worker_of


async def patch(http: aiohttp.ClientSession, gw: Gateway, cid: str, body: Any) -> tuple[int, Any]:
    return await admin(http, gw, "PATCH", f"/v1/campaigns/{cid}", body)


def test_merge_patch_follows_rfc_7396() -> None:
    target = {"a": {"b": 1, "c": 2}, "d": [1], "e": 3}
    assert merge_patch(target, {"a": {"b": None, "x": 5}, "d": [2], "f": {"g": None}}) == {
        "a": {"c": 2, "x": 5}, "d": [2], "e": 3, "f": {}}
    assert target == {"a": {"b": 1, "c": 2}, "d": [1], "e": 3}  # untouched


def test_patched_spec_changes_only_live_fields() -> None:
    spec = validate_spec(msgspec.convert(spec_doc(limits={"per_user": 1, "per_ip": 9}),
                                         CampaignSpec))
    changed = patched_spec(spec, {"limits": {"per_user": 3}, "admission": {"admit_per_s": 5}})
    assert (changed.limits.per_user, changed.limits.per_ip) == (3, 9)
    assert changed.admission is not None and changed.admission.bucket == (5, 5)
    assert msgspec.structs.replace(changed, limits=spec.limits, admission=None) == spec
    with pytest.raises(SpecError, match=r"\$\.ends_at"):
        patched_spec(spec, {"ends_at": "2030-01-01T00:00:00Z"})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.limits\.per_user"):
        patched_spec(spec, {"limits": {"per_user": "two"}})


def given(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


async def test_patch_answers_before_and_after(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    c = await create_campaign(http, gateway, limits={"per_user": 1, "per_device": 3},
                              eligibility={"channels": ["app"]})
    status, body = await patch(http, gateway, c["id"], {"limits": {"per_user": 2},
                                                        "eligibility": {"channels": None}})
    assert status == 200, body
    assert body["campaign_id"] == c["id"]
    assert given(body["before"]["limits"]) == {"per_user": 1, "per_device": 3}
    assert given(body["after"]["limits"]) == {"per_user": 2, "per_device": 3}  # merged
    assert body["before"]["eligibility"]["channels"] == ["app"]
    assert body["after"]["eligibility"]["channels"] == []
    assert body["seq"] == 0
    view = await show(http, gateway, c["id"])
    assert given(view["limits"]) == {"per_user": 2, "per_device": 3}
    assert (view["stock"], view["name"]) == (c["stock"], c["name"])


async def test_bad_patches_change_nothing(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    c = await create_campaign(http, gateway)
    cid = c["id"]
    before = redis_state(redis_server, cid)[0]
    cases: list[tuple[Any, int, str]] = [
        ({"stock": 5}, 422, "$.stock"),
        ({"limits": {"per_user": 0}}, 422, "$.limits.per_user"),
        ({"limits": {"per_usr": 2}}, 422, "$.limits.per_usr"),
        ({"admission": {"waiting_room": True}}, 422, "$.admission.admit_per_s"),
        ([1, 2], 422, "$"),
    ]
    for body, want, field in cases:
        status, doc = await patch(http, gateway, cid, body)
        assert (status, doc["code"], doc.get("field")) == (want, "invalid", field), (body, doc)
    async with http.patch(f"{gateway.base}/v1/campaigns/{cid}", data=b"{nope",
                          headers=gateway.admin_headers) as r:
        assert r.status == 400
    assert redis_state(redis_server, cid)[0] == before
    status, doc = await patch(http, gateway, "no-such-campaign", {"limits": {"per_user": 2}})
    assert (status, doc["code"]) == (404, "not_found")
    async with http.patch(f"{gateway.base}/v1/campaigns/{cid}", json={}) as r:
        assert r.status == 401
    await act(http, gateway, cid, "end")
    status, doc = await patch(http, gateway, cid, {"limits": {"per_user": 2}})
    assert (status, doc["code"]) == (409, "ended")


async def test_every_worker_applies_a_change_within_a_second(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    c = await create_campaign(http, gateway, stock=100_000, limits={"per_user": 1000},
                              eligibility={"channels": ["app", "web"]})
    cid = c["id"]
    async with pinned_sessions(gateway) as sessions:
        for w, s in sessions.items():
            status, body, _ = await claim(s, gateway, cid, gateway.token(f"pre-{w}"),
                                          {"channel": "web"})
            assert status == 201, body
        status, body = await patch(http, gateway, cid, {"eligibility": {"channels": ["app"]}})
        assert status == 200, body
        changed = time.monotonic()
        applied: dict[str, float] = {}
        n = 0
        while len(applied) < len(sessions) and time.monotonic() - changed < 3:
            for w, s in sessions.items():
                if w in applied:
                    continue
                n += 1
                status, body, headers = await claim(s, gateway, cid, gateway.token(f"p-{n}"),
                                                    {"channel": "web"})
                assert worker_of(headers) == w
                if status == 403:
                    assert body["code"] == "not_eligible", body
                    applied[w] = time.monotonic() - changed
                else:
                    assert status == 201, body
            await asyncio.sleep(0.01)
    assert set(applied) == set(sessions), applied
    assert max(applied.values()) < 1.0, applied


async def test_raising_per_user_under_load_never_exceeds_the_limit_in_force(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer
) -> None:
    c = await create_campaign(http, gateway, stock=100_000, limits={"per_user": 1})
    cid = c["id"]
    users = [f"live-u{i}" for i in range(40)]
    tokens = {u: gateway.token(u) for u in users}
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()

    async def clicker(user: str) -> None:
        conn = aiohttp.TCPConnector(force_close=True)  # new connections: every worker
        async with aiohttp.ClientSession(connector=conn) as s:
            while not stop.is_set():
                status, body, _ = await claim(s, gateway, cid, tokens[user])
                statuses[status] += 1
                assert status in (201, 409, 429), body
                if status == 409:
                    assert body["code"] == "limit_reached", body
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(clicker(u)) for u in users]
    await asyncio.sleep(1.0)
    status, change = await patch(http, gateway, cid, {"limits": {"per_user": 2}})
    assert status == 200, change
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)

    _, _, events = redis_state(redis_server, cid)
    per_user = Counter(e["user_id"] for e in events)
    assert max(per_user.values()) == 2, per_user  # the new limit was applied...
    assert set(per_user) == set(users)
    for e in events:  # ...and never before it was in force
        assert int(e["n"]) <= (1 if int(e["seq"]) <= change["seq"] else 2), e
    assert statuses[201] == len(events)


def cli_patch(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "campaign", "patch", *args],
                          env=gw.env, capture_output=True, text=True, timeout=30)


async def test_cli_patch(gateway: Gateway, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    c = await create_campaign(http, gateway, stock=10)
    done = await asyncio.to_thread(cli_patch, gateway, c["id"], '{"limits": {"per_ip": 4}}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["after"]["limits"]["per_ip"] == 4
    patch_file = tmp_path / "patch.json"
    patch_file.write_text('{"limits": {"per_ip": null}, "eligibility": {"channels": ["app"]}}')
    done = await asyncio.to_thread(cli_patch, gateway, c["id"], "--file", str(patch_file))
    assert done.returncode == 0, done.stderr
    after = json.loads(done.stdout)["after"]
    assert after["limits"].get("per_ip") is None and after["eligibility"]["channels"] == ["app"]
    bad = await asyncio.to_thread(cli_patch, gateway, c["id"], '{"limits": {"per_user": 0}}')
    assert bad.returncode == 1 and json.loads(bad.stdout)["status"] == 422
    assert (await show(http, gateway, c["id"]))["limits"]["per_user"] == 1
    for args in ([c["id"], "{nope"], [c["id"]]):
        wrong = await asyncio.to_thread(cli_patch, gateway, *args)
        assert wrong.returncode == 2, wrong.stderr
