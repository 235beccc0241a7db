"""Writer throughput against the gateway's grant rate, in one run: wrk drives grants for a
while with no writer running (the stream fills), then a writer drains the backlog into the
store; prints both rates and their ratio.

    .venv/bin/python -m loadtest.writer_bench --store postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import click
import redis

from gateway.embedded import EmbeddedRedis
from gateway.identity import mint_token
from loadtest.bench import HERE, admin, free_port, stop_processes, wait_http, wrk


async def _new_database(admin_dsn: str) -> str:
    name = f"flashclaim_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


async def _drop_database(url: str) -> None:
    base, name = url.rsplit("/", 1)
    conn = await asyncpg.connect(base + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@click.command()
@click.option("--store", "admin_dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
              show_default=True, help="PostgreSQL server; a fresh database is made on it.")
@click.option("--workers", default=2, show_default=True)
@click.option("--duration", default=10, show_default=True)
@click.option("--connections", default=64, show_default=True)
@click.option("--tokens", "n_tokens", default=300_000, show_default=True)
def main(admin_dsn: str, workers: int, duration: int, connections: int, n_tokens: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="flashclaim-wbench-"))
    store_url = asyncio.run(_new_database(admin_dsn))
    embedded = EmbeddedRedis(tmp / "redis", appendfsync="everysec")
    embedded.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        secret = secrets.token_urlsafe(24)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")},
               "FLASHCLAIM_REDIS_URL": embedded.url, "FLASHCLAIM_ADMIN_TOKEN": "bench-admin",
               "FLASHCLAIM_IDENTITY_SECRET": secret, "FLASHCLAIM_STORE_URL": store_url,
               "FLASHCLAIM_SIGNING_SECRET": secrets.token_urlsafe(24),
               "FLASHCLAIM_BACKLOG_MAX": "0", "FLASHCLAIM_VAR_DIR": str(tmp / "var"),
               "FLASHCLAIM_LOG_LEVEL": "WARNING"}
        port = free_port()
        log = (tmp / "log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers",
             str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz")
        tokens = tmp / "tokens.txt"
        tokens.write_text("".join(mint_token(secret, f"u{i}", ttl_s=7200) + "\n"
                                  for i in range(n_tokens)))
        now = dt.datetime.now(dt.UTC)
        admin(base, "bench-admin", "/v1/campaigns", {
            "id": "w", "name": "writer bench", "stock": 100_000_000,
            "starts_at": (now - dt.timedelta(minutes=1)).isoformat(),
            "ends_at": (now + dt.timedelta(hours=6)).isoformat(),
            "coupons": [{"kind": "amount_off", "value": 500, "valid_days": 7}]})
        grant = wrk(base, duration, connections, HERE / "wrk" / "claims.lua",
                    [str(tokens), "/v1/campaigns/w/claims"])
        r = redis.Redis(unix_socket_path=str(embedded.socket), decode_responses=True)
        granted = int(r.hget("fc:{c:w}:meta", "seq") or 0)
        started = time.monotonic()
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "writer"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        while int(r.hget("fc:{c:w}:meta", "unwritten") or 0) > 0:
            time.sleep(0.05)
        drain_s = time.monotonic() - started  # includes the writer's start-up
        r.close()
        grant_rate = granted / duration
        write_rate = granted / drain_s
        click.echo(f"gateway granted {granted} in {duration}s: {grant_rate:.0f}/s "
                   f"(wrk {grant['rps']:.0f} req/s)")
        click.echo(f"writer stored them in {drain_s:.2f}s, start-up included: "
                   f"{write_rate:.0f}/s into PostgreSQL")
        click.echo(f"writer / gateway = {write_rate / grant_rate:.2f}x")
    finally:
        stop_processes(procs)
        embedded.stop()
        asyncio.run(_drop_database(store_url))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
