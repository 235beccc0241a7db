"""Sharded against unsharded campaigns on a local three-master Redis Cluster: starts the
cluster and `flashclaim serve --workers N` against it, drives claims with wrk (distinct
users, one token per request) at a campaign of 1 shard and one of `--shards` shards, and
prints req/s, p50, p99 and how the Redis CPU time spread over the nodes; then a sell-out
of `--sellout` units (grants per second from the first grant to the last, which for the
sharded campaign includes moving stock to shards that ran out); medians over runs.

    .venv/bin/python -m loadtest.shard_bench --workers 2 --runs 3 --duration 10 --shards 4
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import redis

from gateway.identity import mint_token
from gateway.redis.keys import CampaignKeys
from loadtest.bench import HERE, RESULTS, admin, free_port, stop_processes, wait_http, wrk
from tests.cluster import LocalCluster


def cpu_s(ports: list[int]) -> list[float]:
    out = []
    for p in ports:
        info: Any = redis.Redis(port=p).info("cpu")
        out.append(float(info["used_cpu_sys"]) + float(info["used_cpu_user"]))
    return out


def sellout_rate(cluster: LocalCluster, cid: str, shards: int) -> tuple[float, int]:
    """(grants per second from the first grant to the last, grants) of a campaign."""
    c = cluster.client()
    try:
        times = [int(f["granted_at"]) for k in range(shards)
                 for _, f in c.xrange(CampaignKeys.of(cid, k).events)]
    finally:
        c.close()
    span_s = (max(times) - min(times)) / 1000 if times else 0
    return (len(times) / span_s if span_s else 0.0), len(times)


@click.command()
@click.option("--workers", default=2, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--duration", default=10, show_default=True, help="Seconds per phase.")
@click.option("--connections", default=64, show_default=True)
@click.option("--shards", default=4, show_default=True)
@click.option("--sellout", default=20_000, show_default=True, help="Units of the sell-out.")
@click.option("--tokens", "n_tokens", default=100_000, show_default=True)
@click.option("--label", default="", help="Name for the results file.")
def main(workers: int, runs: int, duration: int, connections: int, shards: int,
         sellout: int, n_tokens: int, label: str) -> None:
    if shutil.which("wrk") is None:
        raise click.ClickException("wrk is missing (Debian: apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="flashclaim-shard-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = LocalCluster(tmp / "cluster")
    try:
        cluster.start()
        admin_token, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")},
               "FLASHCLAIM_REDIS_URL": cluster.url, "FLASHCLAIM_ADMIN_TOKEN": admin_token,
               "FLASHCLAIM_IDENTITY_SECRET": secret,
               "FLASHCLAIM_SIGNING_SECRET": secrets.token_urlsafe(24),
               "FLASHCLAIM_BACKLOG_MAX": "0", "FLASHCLAIM_VAR_DIR": str(tmp / "var"),
               "FLASHCLAIM_LOG_LEVEL": "WARNING"}
        port = free_port()
        log = (tmp / "serve.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
             "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz")
        click.echo(f"minting {n_tokens} identity tokens ...", err=True)
        tokens = tmp / "tokens.txt"
        with tokens.open("w") as f:
            for i in range(n_tokens):
                f.write(mint_token(secret, f"u{i}", ttl_s=7200) + "\n")
        now = dt.datetime.now(dt.UTC)
        window = {"starts_at": (now - dt.timedelta(minutes=1)).isoformat(),
                  "ends_at": (now + dt.timedelta(hours=6)).isoformat(),
                  "coupons": [{"kind": "amount_off", "value": 500, "valid_days": 7}]}
        script = HERE / "wrk" / "claims.lua"
        rows: list[dict[str, Any]] = []
        for run in range(runs):
            row: dict[str, Any] = {"run": run}
            for s in (1, shards):
                cid = f"s{s}-{run}"
                admin(base, admin_token, "/v1/campaigns",
                      {"id": cid, "name": f"{s} shards", "stock": 100_000_000, "shards": s,
                       **window})
                time.sleep(1.0)
                before = cpu_s(cluster.ports)
                res = wrk(base, duration, connections, script,
                          [str(tokens), f"/v1/campaigns/{cid}/claims"])
                used = [b - a for a, b in zip(before, cpu_s(cluster.ports), strict=True)]
                res["redis_cpu_s"] = used
                res["busiest_node_share"] = max(used) / max(sum(used), 1e-9)
                cid = f"sellout-s{s}-{run}"
                admin(base, admin_token, "/v1/campaigns",
                      {"id": cid, "name": "sell-out", "stock": sellout, "shards": s, **window})
                time.sleep(1.0)
                wrk(base, duration, connections, script,
                    [str(tokens), f"/v1/campaigns/{cid}/claims"])
                res["sellout_grants_per_s"], res["sellout_granted"] = sellout_rate(
                    cluster, cid, s)
                row[f"shards_{s}"] = res
                click.echo(f"run {run} shards {s}: {res['rps']:.0f}/s p50 {res['p50_ms']:.2f} "
                           f"ms p99 {res['p99_ms']:.2f} ms non-2xx {res['non_2xx']} Redis CPU "
                           f"per node {', '.join(f'{u:.2f}s' for u in used)}; sell-out "
                           f"{res['sellout_granted']} at {res['sellout_grants_per_s']:.0f}/s",
                           err=True)
            rows.append(row)
        med = {f"{k}_{m}": statistics.median(r[k][m] for r in rows)
               for k in ("shards_1", f"shards_{shards}")
               for m in ("rps", "p50_ms", "p99_ms", "busiest_node_share",
                         "sellout_grants_per_s")}
        result = {"when": dt.datetime.now(dt.UTC).isoformat(), "workers": workers,
                  "connections": connections, "duration_s": duration, "shards": shards,
                  "command": " ".join(sys.argv), "median": med, "runs": rows}
        RESULTS.mkdir(exist_ok=True)
        name = f"shard-bench-{label or dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"medians, {workers} workers, wrk -t1 -c{connections}, 3-master cluster")
        click.echo(f"{'shards':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'busiest node':>13} "
                   f"{'sell-out/s':>11}")
        for k in ("shards_1", f"shards_{shards}"):
            click.echo(f"{k.removeprefix('shards_'):<8} {med[k + '_rps']:>9.0f} "
                       f"{med[k + '_p50_ms']:>8.2f} {med[k + '_p99_ms']:>8.2f} "
                       f"{med[k + '_busiest_node_share']:>12.0%} "
                       f"{med[k + '_sellout_grants_per_s']:>11.0f}")
        click.echo(f"\nwritten to loadtest/results/{name}")
    finally:
        stop_processes(procs)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
