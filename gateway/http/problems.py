"""The one place that maps errors to HTTP: problem documents, the request id on every
response and log line, a 500 problem (never a stack trace) for the unexpected, and closing
connections once the worker drains."""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from gateway.errors import BadRequest, Problem, Unavailable, Unprocessable
from gateway.metrics import observe_http
from gateway.schemas import ProblemDocument, encoder

log = logging.getLogger("gateway.http")

PROBLEM_TYPE = "urn:flashclaim:problem:"
_ids = itertools.count(1)
_prefix = f"{os.getpid():x}"
_valid_rid = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_FIELD = re.compile(r"at `(\$[^`]*)`")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]+)`")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
# the answer's problem code (or "waiting") on a claim response, for flashclaim_claims_total
ANSWER_CODE = web.ResponseKey("answer_code", str)


class Drain:
    """Started on SIGTERM, before the worker stops listening: `/readyz` answers 503 so load
    balancers stop sending, and every response closes its connection so keep-alive clients
    reconnect (elsewhere) instead of finding the socket gone mid-request. (`with_problems`,
    around every route, closes them: a check there costs less than a response-prepare
    signal per request.)"""

    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True


DRAIN = web.AppKey("drain", Drain)


def problem_response(p: Problem, request_id: str | None = None) -> web.Response:
    retry = None if p.retry_after is None else max(1, math.ceil(p.retry_after))
    doc = ProblemDocument(
        type=PROBLEM_TYPE + p.code,
        title=p.title,
        status=p.status,
        detail=p.detail,
        code=p.code,
        request_id=request_id,
        retry_after_s=retry,
        **p.extra,
    )
    headers = dict(p.headers)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return web.Response(
        body=encoder.encode(doc),
        status=p.status,
        content_type="application/problem+json",
        headers=headers,
    )


_shared: dict[tuple[str, str, str], bytes] = {}


def shared_problem_response(p: Problem, key: str) -> web.Response:
    """A campaign-wide answer (sold out, ended, paused): the same body for every caller, so
    it is encoded once per `key`; the request id travels in the header only."""
    body = _shared.get((key, p.code, p.detail))
    if body is None:
        if len(_shared) > 10_000:
            _shared.clear()
        body = _shared[(key, p.code, p.detail)] = encoder.encode(ProblemDocument(
            type=PROBLEM_TYPE + p.code, title=p.title, status=p.status, detail=p.detail,
            code=p.code, **p.extra))
    headers = {"Retry-After": str(max(1, math.ceil(p.retry_after)))} if p.retry_after else None
    return web.Response(body=body, status=p.status, content_type="application/problem+json",
                        headers=headers)


def decode_error(e: msgspec.DecodeError) -> Problem:
    """msgspec's message names the field for shape errors; plain syntax errors are 400."""
    msg = str(e)
    if isinstance(e, msgspec.ValidationError):
        m = _FIELD.search(msg)
        path = m.group(1) if m else "$"
        named = _NAMED.search(msg)
        return Unprocessable(msg, field=f"{path}.{named.group(1)}" if named else path)
    return BadRequest(f"Body is not valid JSON: {msg}")


class _HttpProblem(Problem):
    def __init__(self, e: web.HTTPException) -> None:
        super().__init__(e.reason, headers={k: v for k, v in e.headers.items()
                                            if k.lower() in ("allow",)})
        self.status = e.status  # type: ignore[misc]
        self.code = e.reason.lower().replace(" ", "_")  # type: ignore[misc]
        self.title = e.reason  # type: ignore[misc]


def with_problems(handler: Handler, route: str, drain: Drain) -> Handler:
    """`handler` with the problem mapping, the request id and the HTTP metrics around it.
    Every route is registered wrapped in it (gateway/http/routes.py), so the app runs no
    middleware: one coroutine call fewer per request, and `route` (the metric label) is
    known here instead of looked up per request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request.headers.get("X-Request-Id")
        if rid is None or not _valid_rid.match(rid):
            rid = f"{_prefix}-{next(_ids):x}"
        request[REQUEST_ID] = rid
        try:
            resp = await handler(request)
        except Problem as p:
            resp = problem_response(p, rid)
            if p.close:
                resp.force_close()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = problem_response(_HttpProblem(e), rid)
        except (RedisError, ConnectionError, TimeoutError) as e:
            log.warning("redis unavailable request_id=%s %s: %r", rid, request.path, e)
            unavailable = Unavailable("Redis is unavailable; retry shortly", retry_after=1)
            resp = problem_response(unavailable, rid)
        except Exception:
            log.exception("unexpected error request_id=%s %s %s", rid, request.method,
                          request.path)
            resp = problem_response(Problem("An unexpected error occurred"), rid)
        resp.headers["X-Request-Id"] = rid
        if drain.started:
            resp.force_close()
        observe_http(route, resp.status, time.perf_counter() - started)
        return resp

    return handle
