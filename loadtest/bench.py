"""The benchmark harness: starts a private redis-server, `flashclaim serve --workers N` and
a hello endpoint served the same way; drives each with wrk (distinct users, one token per
request) in three phases — hello, granting, sold out — and prints req/s, p50, p99, Redis
round trips per claim and the ratio to hello; medians over runs; writes JSON.

    .venv/bin/python -m loadtest.bench --workers 2 --runs 3 --duration 10
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import redis

from gateway.embedded import EmbeddedRedis
from gateway.identity import mint_token

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def admin(base: str, token: str, path: str, body: Any) -> Any:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, duration: int, connections: int, script: Path,
        args: list[str]) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
           url, "--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}  # type: ignore[dict-item]


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(15)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) so far of a process and all its descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / tick  # utime, stime
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            pass
    return total


def redis_main_cpu_s(r: redis.Redis) -> float:
    """CPU seconds of Redis's main thread: the one that runs every script (the ceiling)."""
    info: Any = r.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def commandstats(r: redis.Redis) -> dict[str, int]:
    info: Any = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


class Stack:
    """What every measurement here runs against: a private redis-server, `flashclaim serve
    --workers N` and the hello endpoint served the same way, a file of identity tokens
    (distinct users) and a sold-out campaign. A context manager: everything stops after."""

    def __init__(self, workers: int, fsync: str = "everysec", n_tokens: int = 300_000,
                 baseline: str = "") -> None:
        self.workers, self.fsync, self.n_tokens = workers, fsync, n_tokens
        self.baseline = baseline  # a git revision: its gateway too, served the same way
        self.tmp = Path(tempfile.mkdtemp(prefix="flashclaim-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.embedded = EmbeddedRedis(self.tmp / "redis", appendfsync=fsync)
        self.tokens = self.tmp / "tokens.txt"
        self.script = HERE / "wrk" / "claims.lua"
        self.gbase = self.hbase = self.admin_token = ""

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.embedded.start()
        self.admin_token, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")},
               "FLASHCLAIM_REDIS_URL": self.embedded.url,
               "FLASHCLAIM_ADMIN_TOKEN": self.admin_token,
               "FLASHCLAIM_IDENTITY_SECRET": secret,
               "FLASHCLAIM_SIGNING_SECRET": secrets.token_urlsafe(24),
               "FLASHCLAIM_BACKLOG_MAX": "0", "FLASHCLAIM_VAR_DIR": str(self.tmp / "var"),
               "FLASHCLAIM_LOG_LEVEL": "WARNING"}
        gport, hport = free_port(), free_port()
        log = (self.tmp / "serve.log").open("wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(gport),
             "--workers", str(self.workers)], env=env, stdout=log, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "loadtest.hello", str(hport), str(self.workers)], env=env,
            stdout=log, stderr=subprocess.STDOUT))
        self.gbase, self.hbase = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{hport}"
        self.bases = {"new": self.gbase}
        if self.baseline:
            self.procs.append(self._start_baseline(env, log))
        for base in self.bases.values():
            wait_http(base + "/readyz")
        wait_http(self.hbase + "/hello")
        click.echo(f"minting {self.n_tokens} identity tokens ...", err=True)
        with self.tokens.open("w") as f:
            for i in range(self.n_tokens):
                f.write(mint_token(secret, f"u{i}", ttl_s=7200) + "\n")
        self.redis = redis.Redis(unix_socket_path=str(self.embedded.socket),
                                 decode_responses=True)
        self.campaign("soldout", stock=1)
        first = mint_token(secret, "first-buyer")
        urllib.request.urlopen(urllib.request.Request(
            self.gbase + "/v1/campaigns/soldout/claims", data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {first}"}), timeout=5).close()

    def _start_baseline(self, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
        """The gateway of another revision (its files from `git archive`), on the same Redis
        with its own campaigns, run by the same interpreter and packages."""
        src = self.tmp / "baseline"
        src.mkdir()
        archive = subprocess.run(["git", "archive", self.baseline], cwd=HERE.parent,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        port = free_port()
        self.bases["old"] = f"http://127.0.0.1:{port}"
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
             "--workers", str(self.workers)], cwd=src, stdout=log, stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": str(src), "FLASHCLAIM_VAR_DIR": str(self.tmp / "var-old")})

    def __exit__(self, *_: object) -> None:
        stop_processes(self.procs)
        if hasattr(self, "redis"):
            self.redis.close()
        self.embedded.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def campaign(self, cid: str, stock: int) -> None:
        now = dt.datetime.now(dt.UTC)
        admin(self.gbase, self.admin_token, "/v1/campaigns", {
            "id": cid, "name": cid, "stock": stock,
            "starts_at": (now - dt.timedelta(minutes=1)).isoformat(),
            "ends_at": (now + dt.timedelta(hours=6)).isoformat(),
            "coupons": [{"kind": "amount_off", "value": 500, "valid_days": 7}]})

    def url(self, phase: str, cid: str = "", server: str = "new") -> tuple[str, str]:
        """(base, path) of a phase: hello, a granting campaign `cid`, or sold out."""
        if phase == "hello":
            return self.hbase, "/hello"
        return self.bases[server], f"/v1/campaigns/{cid or 'soldout'}/claims"

    def drive(self, phase: str, duration: int, connections: int, cid: str = "",
              delay_ms: float = 0.0, server: str = "new", skip: int = 0) -> dict[str, float]:
        """The same wrk script in every phase (one token per request), so the load
        generator does the same work per request whatever it drives. `skip`: start after
        that many tokens (users who already claimed in this campaign)."""
        base, path = self.url(phase, cid, server)
        args = [str(self.tokens), path, f"{delay_ms:.3f}", str(skip)]
        proc = 1 if phase == "hello" else 2 if server == "old" else 0
        server_pid = self.procs[proc].pid
        cpu = tree_cpu_s(server_pid)
        out = wrk(base, duration, connections, self.script, args)
        # the serving processes' CPU per request: steadier than req/s on a shared machine
        out["server_cpu_us"] = (tree_cpu_s(server_pid) - cpu) * 1e6 / max(out["requests"], 1)
        return out

    def worker_pids(self, hello: bool = False) -> list[int]:
        """The gateway's worker processes (children of the supervisor), or hello's."""
        pid = self.procs[1 if hello else 0].pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(k) for k in kids
                if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]


def at_rate(stack: Stack, cid: str, target: float, duration: int,
            connections: int, skip: int) -> dict[str, float]:
    """Latency at a fixed offered rate: each connection waits between its requests (wrk's
    `delay()`: a random whole number of milliseconds with this mean, so the connections do
    not fall into step and arrive in bursts), the mean found by two 3 s probes so that
    wait plus response time gives `target` req/s in all — rounded down, so the rate lands
    at or a little above the target. Users start after the `skip` who claimed already,
    so these are grants too, not repeat clicks. (wrk times each request from its send, so
    this is service latency at that rate, not an open-loop arrival process.)"""
    interval_ms = connections / target * 1000
    delay = math.floor(interval_ms)
    for _ in range(2):
        probe = stack.drive("grant", 3, connections, cid, delay_ms=delay, skip=skip)
        skip += int(probe["requests"]) + connections
        busy_ms = max(0.0, connections / probe["rps"] * 1000 - delay)
        delay = max(1, math.floor(interval_ms - busy_ms))
    return {**stack.drive("grant", duration, connections, cid, delay_ms=delay, skip=skip),
            "target_rps": target, "delay_ms": delay}


@click.command()
@click.option("--workers", default=2, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--duration", default=10, show_default=True, help="Seconds per phase.")
@click.option("--connections", default=64, show_default=True)
@click.option("--fsync", default="everysec", show_default=True, type=click.Choice(
    ["always", "everysec"]))
@click.option("--tokens", "n_tokens", default=300_000, show_default=True)
@click.option("--at", "at_fraction", default=0.8, show_default=True,
              help="Also measure granting latency at this fraction of its peak (0: skip).")
@click.option("--baseline", default="", metavar="REV",
              help="Also drive the gateway of this git revision, in the same runs (new vs old).")
@click.option("--label", default="", help="Name for the results file.")
def main(workers: int, runs: int, duration: int, connections: int, fsync: str,
         n_tokens: int, at_fraction: float, baseline: str, label: str) -> None:
    if shutil.which("wrk") is None:
        raise click.ClickException("wrk is missing (Debian: apt-get install wrk)")
    with Stack(workers, fsync, n_tokens, baseline) as stack:
        r = stack.redis
        rows: list[dict[str, Any]] = []
        for run in range(runs):
            cid = f"grant-{run}"
            stack.campaign(cid, stock=100_000_000)
            time.sleep(1.0)
            hello = stack.drive("hello", duration, connections)
            before = commandstats(r)
            redis_before = redis_main_cpu_s(r)
            grant = stack.drive("grant", duration, connections, cid)
            gw_cpu = grant["server_cpu_us"] * grant["requests"] / 1e6
            redis_cpu = redis_main_cpu_s(r) - redis_before
            after = commandstats(r)
            granted = int(r.hget(f"fc:{{c:{cid}}}:meta", "seq") or 0)
            evalsha = after.get("evalsha", 0) - before.get("evalsha", 0)
            allcmd = sum(after.values()) - sum(before.values())
            sold = stack.drive("soldout", duration, connections)
            row = {"run": run, "hello": hello, "grant": grant, "soldout": sold,
                   "granted": granted,
                   "evalsha_per_claim": evalsha / max(grant["requests"], 1),
                   "redis_cmds_per_claim": allcmd / max(grant["requests"], 1),
                   # CPU per grant: what sizes gateway cores and Redis shards
                   "gateway_cpu_us_per_claim": gw_cpu * 1e6 / max(granted, 1),
                   "redis_cpu_us_per_claim": redis_cpu * 1e6 / max(granted, 1),
                   "grant_ratio": grant["rps"] / hello["rps"],
                   "soldout_ratio": sold["rps"] / hello["rps"]}
            if at_fraction:
                row["at_rate"] = at_rate(stack, cid, grant["rps"] * at_fraction, duration,
                                         connections, skip=int(grant["requests"]) + connections)
            if baseline:
                stack.campaign(f"{cid}-old", stock=100_000_000)
                row["old_grant"] = stack.drive("grant", duration, connections, f"{cid}-old",
                                               server="old")
                row["old_soldout"] = stack.drive("soldout", duration, connections,
                                                 server="old")
                row["grant_vs_old"] = grant["rps"] / row["old_grant"]["rps"]
                row["soldout_vs_old"] = sold["rps"] / row["old_soldout"]["rps"]
                row["old_grant_ratio"] = row["old_grant"]["rps"] / hello["rps"]
                row["old_soldout_ratio"] = row["old_soldout"]["rps"] / hello["rps"]
            rows.append(row)
            click.echo(f"run {run}: hello {hello['rps']:.0f}/s  grant {grant['rps']:.0f}/s "
                       f"({row['grant_ratio']:.2f}x, {row['evalsha_per_claim']:.3f} EVALSHA/claim)"
                       f"  sold out {sold['rps']:.0f}/s ({row['soldout_ratio']:.2f}x)", err=True)
        med = {k: statistics.median(row[k] for row in rows) for k in
               ("grant_ratio", "soldout_ratio", "evalsha_per_claim", "redis_cmds_per_claim",
                "gateway_cpu_us_per_claim", "redis_cpu_us_per_claim")}
        phases = ["hello", "grant", "soldout"] + (["at_rate"] if at_fraction else [])
        if baseline:
            phases += ["old_grant", "old_soldout"]
            for k in ("grant_vs_old", "soldout_vs_old", "old_grant_ratio", "old_soldout_ratio"):
                med[k] = statistics.median(row[k] for row in rows)
        for phase in phases:
            for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us"):
                med[f"{phase}_{k}"] = statistics.median(row[phase][k] for row in rows)
        result = {"when": dt.datetime.now(dt.UTC).isoformat(), "workers": workers,
                  "connections": connections, "duration_s": duration, "fsync": fsync,
                  "at_fraction": at_fraction, "baseline": baseline,
                  "command": " ".join(sys.argv), "median": med,
                  "runs": rows}
        RESULTS.mkdir(exist_ok=True)
        name = f"bench-{label or dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(render(med, workers, connections, at_fraction, baseline))
        click.echo(f"\nwritten to loadtest/results/{name}")


def render(m: dict[str, float], workers: int, connections: int, at_fraction: float,
           baseline: str = "") -> str:
    lines = [f"medians, {workers} workers, wrk -t1 -c{connections}",
             f"{'phase':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x hello':>8} "
             f"{'server CPU us/req':>18}"]
    rows = [("hello", 1.0), ("grant", m["grant_ratio"]), ("soldout", m["soldout_ratio"])]
    if baseline:
        rows += [("old_grant", m["old_grant_ratio"]), ("old_soldout", m["old_soldout_ratio"])]
    for phase, ratio in rows:
        lines.append(f"{phase:<10} {m[f'{phase}_rps']:>9.0f} {m[f'{phase}_p50_ms']:>8.2f} "
                     f"{m[f'{phase}_p99_ms']:>8.2f} {ratio:>8.2f} "
                     f"{m[f'{phase}_server_cpu_us']:>18.1f}")
    if at_fraction:
        lines.append(f"{'grant@' + format(at_fraction, '.0%'):<10} {m['at_rate_rps']:>9.0f} "
                     f"{m['at_rate_p50_ms']:>8.2f} {m['at_rate_p99_ms']:>8.2f} "
                     f"{m['at_rate_rps'] / m['grant_rps']:>8.2f} of granting's peak")
    if baseline:
        lines.append(f"new vs {baseline} (same runs): granting {m['grant_vs_old']:.3f}x, "
                     f"sold out {m['soldout_vs_old']:.3f}x")
    lines.append(f"Redis EVALSHA per claim: {m['evalsha_per_claim']:.3f}; all Redis commands "
                 f"per claim: {m['redis_cmds_per_claim']:.3f}")
    lines.append(f"CPU per grant: gateway workers {m['gateway_cpu_us_per_claim']:.0f} us "
                 f"(~{1e6 / max(m['gateway_cpu_us_per_claim'], 1):.0f} claims/s per core), "
                 f"Redis main thread {m['redis_cpu_us_per_claim']:.1f} us "
                 f"(~{1e6 / max(m['redis_cpu_us_per_claim'], 0.1):.0f} claims/s per shard)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
