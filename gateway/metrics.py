"""Every metric, declared once. prometheus-client in multiprocess mode when the CLI has set
PROMETHEUS_MULTIPROC_DIR (serve/run with several workers), so `/metrics` on any worker
answers for all of them; the per-request ones are counted in memory and flushed each second
(`flush`). Labels stay low-cardinality: campaign, outcome, route, status — never a user id
or an address."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from bisect import bisect_left
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)

CLAIMS = Counter("flashclaim_claims", "Claim answers by campaign and outcome (granted or "
                 "the problem code)", ["campaign", "outcome"])
HTTP_REQUESTS = Counter("flashclaim_http_requests", "HTTP requests by route and status",
                        ["route", "status"])
HTTP_LATENCY = Histogram("flashclaim_http_request_duration_seconds",
                         "Time from handler start to response, by route", ["route"],
                         buckets=LATENCY_BUCKETS)
REDIS_BATCH = Histogram("flashclaim_redis_batch_size", "Claims decided per claim-script call",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
REDIS_ROUNDTRIP = Histogram("flashclaim_redis_roundtrip_seconds",
                            "Claim-script call time as the worker sees it",
                            buckets=LATENCY_BUCKETS)
REDIS_ERRORS = Counter("flashclaim_redis_errors", "Failed Redis calls by kind", ["kind"])
STOCK_ISSUED = Gauge("flashclaim_stock_issued", "Units put up: initial stock plus restocks",
                    ["campaign"], multiprocess_mode="mostrecent")
STOCK_REMAINING = Gauge("flashclaim_stock_remaining", "Units left", ["campaign"],
                        multiprocess_mode="mostrecent")
BUDGET_ISSUED = Gauge("flashclaim_budget_issued", "Face value put up (stock x the package's "
                      "amount_off and threshold values), minor units", ["campaign"],
                      multiprocess_mode="mostrecent")
BUDGET_USED = Gauge("flashclaim_budget_used", "Face value granted so far, minor units",
                    ["campaign"], multiprocess_mode="mostrecent")
BUDGET_CAP = Gauge("flashclaim_budget_cap", "The most face value a campaign may grant (its "
                   "spec's budget_cap), minor units; absent when uncapped", ["campaign"],
                   multiprocess_mode="mostrecent")
WRITER_LAG = Gauge("flashclaim_writer_lag_seconds", "Grant-to-commit delay of the newest "
                   "claim the writer stored", ["campaign"], multiprocess_mode="mostrecent")
ROOM_TICKETS = Gauge("flashclaim_waiting_room_tickets", "Users in a campaign's waiting room",
                     ["campaign"], multiprocess_mode="mostrecent")
ROOM_SERVING = Gauge("flashclaim_waiting_room_serving", "Waiting-room positions admitted so far",
                     ["campaign"], multiprocess_mode="mostrecent")
STORE_ROWS = Gauge("flashclaim_store_rows", "Claims in the durable store, counted by the "
                   "writer every 10 s: a continuous reconcile against grants and backlog",
                   ["campaign"], multiprocess_mode="mostrecent")
ADMISSION_REJECTED = Counter("flashclaim_admission_rejected",
                             "Claims turned away by the worker before Redis: per-user or "
                             "per-ip rate (429), shed from the Redis queue (503)", ["reason"])
REDIS_QUEUE = Gauge("flashclaim_redis_queue_depth", "Claims waiting for a Redis slot",
                    multiprocess_mode="livesum")
WRITER_WRITTEN = Counter("flashclaim_writer_written", "Claims the writer stored",
                         ["campaign"])
WRITER_DEAD = Counter("flashclaim_writer_dead_lettered",
                      "Stream entries moved to the dead-letter stream", ["campaign"])
WRITER_ERRORS = Counter("flashclaim_writer_errors", "Writer failures by kind", ["kind"])
WRITER_BACKLOG = Gauge("flashclaim_writer_backlog", "Grants not yet acked by the writer",
                       ["campaign"], multiprocess_mode="mostrecent")
AUDIT_ENTRIES = Counter("flashclaim_audit_entries", "Admin audit entries by result: "
                        "recorded (on the audit stream), lost (Redis refused it; logged), "
                        "stored (by the writer)", ["result"])


# The per-request metrics (claim answers; HTTP requests and their latency) are counted in
# plain dicts and written to prometheus-client once per FLUSH_S by `flush` (the app runs it
# on a timer, before each /metrics answer and at shutdown): in multiprocess mode every
# inc/observe is an mmap write under a lock — four per request, ~8 % of a sold-out worker.
# A scrape therefore sees a worker's answers up to FLUSH_S late; a worker killed outright
# loses at most its last FLUSH_S of them.
FLUSH_S = 1.0
_BOUNDS = (*LATENCY_BUCKETS, math.inf)
_claims: dict[tuple[str, str], int] = {}
_http: dict[tuple[str, int], int] = {}
_latency: dict[str, list[float]] = {}  # route -> count per bucket of _BOUNDS, then the sum


def count_claim(campaign: str, outcome: str) -> None:
    key = (campaign, outcome)
    _claims[key] = _claims.get(key, 0) + 1


def observe_http(route: str, status: int, seconds: float) -> None:
    key = (route, status)
    _http[key] = _http.get(key, 0) + 1
    counts = _latency.get(route)
    if counts is None:
        counts = _latency[route] = [0.0] * (len(_BOUNDS) + 1)
    counts[bisect_left(_BOUNDS, seconds)] += 1  # le: the first bound >= seconds
    counts[-1] += seconds


def flush() -> None:
    """Adds what was counted since the last flush to the prometheus-client metrics."""
    global _claims, _http, _latency
    claims, http, latency = _claims, _http, _latency
    _claims, _http, _latency = {}, {}, {}
    for (campaign, outcome), n in claims.items():
        CLAIMS.labels(campaign, outcome).inc(n)
    for (route, status), n in http.items():
        HTTP_REQUESTS.labels(route, status).inc(n)
    for route, counts in latency.items():
        _add_observations(HTTP_LATENCY.labels(route), counts)


def _add_observations(child: Histogram, counts: list[float]) -> None:
    """`child.observe` for many observations at once, by bucket: prometheus-client has no
    public call for that, so this adds to the histogram's own bucket and sum values the
    way `observe` does (pinned version; tests/test_metrics_tally.py compares the two)."""
    child._sum.inc(counts[-1])
    for bucket, n in zip(child._buckets, counts[:-1], strict=True):
        if n:
            bucket.inc(n)


async def flush_periodically() -> None:
    try:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()
    finally:
        flush()


def prepare_multiprocess_dir(path: Path) -> None:
    """Called by the CLI before it starts workers: an empty directory, exported."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def registry() -> Collector:
    if os.environ.get(MULTIPROC_ENV):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
        return reg
    return REGISTRY
