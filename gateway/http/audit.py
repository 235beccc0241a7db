"""The admin audit trail: `record()` is the one call every admin write makes after it
changed something. The entry goes to the `fc:audit` stream (workers never touch the store)
and the writer moves it into the store's `audit_log` table."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway.durable.store import AuditEntry, audit_fields
from gateway.http.adminauth import ADMIN
from gateway.http.context import Gateway
from gateway.http.problems import REQUEST_ID
from gateway.metrics import AUDIT_ENTRIES
from gateway.redis.keys import AUDIT
from gateway.schemas import encoder

log = logging.getLogger(__name__)


def campaign_target(campaign_id: str) -> str:
    return f"campaign:{campaign_id}"


def _json(value: Any) -> str | None:
    return None if value is None else encoder.encode(value).decode()


async def record(gw: Gateway, request: web.Request, action: str, target: str,
                 before: Any, after: Any) -> None:
    """Append one audit entry: the admin token's name, the action, its target, the state
    before and after (anything msgspec encodes, or None), the time and the request id.
    The change has happened by now, so a Redis failure here does not undo or fail it: the
    entry goes to the error log instead, and is counted as lost."""
    who = request.get(ADMIN)
    entry = AuditEntry(
        id=uuid.uuid4().hex, at=int(time.time() * 1000),
        actor=who.name if who is not None else "", action=action, target=target,
        before=_json(before), after=_json(after), request_id=request.get(REQUEST_ID, ""),
    )
    fields = audit_fields(entry)
    try:
        await gw.client.xadd(AUDIT, fields)  # type: ignore[arg-type]
    except (RedisError, OSError) as e:
        AUDIT_ENTRIES.labels("lost").inc()
        log.error("audit entry not recorded (%r): %s", e, fields)
        return
    AUDIT_ENTRIES.labels("recorded").inc()
