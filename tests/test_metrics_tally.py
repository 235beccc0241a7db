"""The per-request metrics counted in memory and flushed: after `flush`, the exposition holds
exactly what one prometheus-client call per request would have written — in plain and in
multiprocess mode (the histogram is flushed through its bucket values, see gateway/metrics.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

COMPARE = textwrap.dedent("""
    import os, random
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from gateway import metrics

    rng = random.Random(7)
    ref = CollectorRegistry()
    # the reference: the same metrics under another prefix, one call per request (in
    # multiprocess mode they land in the same files, and one collector reads both)
    ref_latency = Histogram("ref_http_request_duration_seconds", "", ["route"],
                            buckets=metrics.LATENCY_BUCKETS, registry=ref)
    ref_requests = Counter("ref_http_requests", "", ["route", "status"], registry=ref)
    ref_claims = Counter("ref_claims", "", ["campaign", "outcome"], registry=ref)
    values = [rng.choice([0.0, *metrics.LATENCY_BUCKETS, 9.0]) for _ in range(200)]
    values += [rng.expovariate(200) for _ in range(2000)]
    for i, v in enumerate(values):
        route, status = ("/a", "/b")[i % 2], (201, 410, 503)[i % 3]
        metrics.observe_http(route, status, v)
        ref_latency.labels(route).observe(v)
        ref_requests.labels(route, status).inc()
        outcome = ("granted", "sold_out")[i % 2]
        metrics.count_claim("c1", outcome)
        ref_claims.labels("c1", outcome).inc()
        if i == 1000:
            metrics.flush()  # flushes add up
    metrics.flush()

    def samples(reg, prefix):
        names = ("http_request_duration_seconds", "http_requests", "claims")
        return sorted((s.name.removeprefix(prefix), tuple(sorted(s.labels.items())),
                       round(s.value, 9))
                      for fam in reg.collect() if fam.name.removeprefix(prefix) in names
                      for s in fam.samples if not s.name.endswith("_created"))

    mp = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    got = samples(metrics.registry(), "flashclaim_")
    want = samples(metrics.registry() if mp else ref, "ref_")
    assert got == want, (set(got) ^ set(want))
    assert len(want) > 40
    print("same", len(want))
""")


def run_compare(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", COMPARE], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_flushed_counts_equal_one_call_per_request() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    assert run_compare(env).startswith("same")


def test_flushed_counts_equal_one_call_per_request_multiprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert run_compare(env).startswith("same")


def test_nothing_is_written_before_a_flush() -> None:
    from gateway import metrics

    route = f"/unflushed-{random.randrange(10**9)}"
    metrics.observe_http(route, 200, 0.001)
    exposed = {s.labels.get("route") for fam in metrics.registry().collect()
               for s in fam.samples}
    assert route not in exposed
    metrics.flush()
    exposed = {s.labels.get("route") for fam in metrics.registry().collect()
               for s in fam.samples}
    assert route in exposed
