"""Schemathesis against the public `/openapi.json`: every operation, generated and mutated
requests with a valid identity token, on unknown ids and on a live campaign; no answer may
be a server error, and every answer must match the document."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from tests.conftest import spec
from tests.servers import Gateway

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def live(gateway: Gateway) -> dict[str, Any]:
    """A campaign with plenty of stock, and headers that make a valid claimant."""
    doc = spec(stock=1_000_000, limits={"per_user": 1_000_000})
    req = urllib.request.Request(gateway.base + "/v1/campaigns", data=json.dumps(doc).encode(),
                                 headers={**gateway.admin_headers,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
    return {"id": doc["id"], "headers": {"Authorization": f"Bearer {gateway.token('fuzzer')}"}}


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> Any:
    return schemathesis.openapi.from_url(gateway.base + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_error(case: Case, live: dict[str, Any]) -> None:
    case.call_and_validate(headers=live["headers"])
    if "id" in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, "id": live["id"]}
        case.call_and_validate(headers=live["headers"])
