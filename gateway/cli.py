"""The `flashclaim` command: run (the embedded default), serve, writer, token and the store
tools (reconcile, tail, audit); the verbs of cli_admin.py, cli_codes.py, report_cli.py and
durable/verify.py are registered here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click
import msgspec

from gateway.cli_admin import admin_call, block, campaign
from gateway.cli_codes import codes
from gateway.durable.verify import verify_command
from gateway.embedded import EmbeddedRedis
from gateway.identity import mint_token
from gateway.report_cli import report
from gateway.serve import Supervisor, gateway_roles, setup_logging, stop_timeout_s, writer_main
from gateway.settings import Settings, load_settings

DEFAULT_PORT = 8080


@click.group()
def main() -> None:
    """flashclaim: a gateway for timed, limited-quantity coupon releases."""


def _workers_default() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_PORT, show_default=True)
@click.option("--workers", default=_workers_default, show_default="cores, up to 4", type=int)
def serve(host: str, port: int, workers: int) -> None:
    """Serve the HTTP gateway with WORKERS processes sharing one port."""
    settings = load_settings()
    setup_logging(settings.log_level)
    missing = [n for n, v in [("FLASHCLAIM_REDIS_URL", settings.redis_url),
                              ("FLASHCLAIM_SIGNING_SECRET", settings.signing_secret)] if not v]
    if not (settings.admin_token or settings.admin_tokens or settings.admin_tokens_file):
        missing.append("FLASHCLAIM_ADMIN_TOKEN (or FLASHCLAIM_ADMIN_TOKENS[_FILE])")
    if not (settings.identity_secret or settings.identity_public_keys):
        missing.append("FLASHCLAIM_IDENTITY_SECRET or FLASHCLAIM_IDENTITY_PUBLIC_KEYS")
    if missing:
        raise click.UsageError("set " + ", ".join(missing))
    _check_admin_config(settings)
    _metrics_dir(settings)
    Supervisor(gateway_roles(settings, host, port, workers), stop_timeout_s(settings)).run()


def _check_admin_config(settings: Settings) -> None:
    from gateway.http.adminauth import Listen, admin_tokens

    try:
        admin_tokens(settings)
        if settings.admin_listen:
            Listen.parse(settings.admin_listen)
    except (ValueError, OSError) as e:
        raise click.UsageError(str(e)) from None


@main.command()
def writer() -> None:
    """Drain claim streams into the durable store (FLASHCLAIM_STORE_URL) until SIGTERM."""
    settings = load_settings()
    setup_logging(settings.log_level)
    if not settings.redis_url or not settings.signing_secret:
        raise click.UsageError("set FLASHCLAIM_REDIS_URL and FLASHCLAIM_SIGNING_SECRET")
    writer_main(settings)


def _metrics_dir(settings: Settings) -> None:
    """One multiprocess metrics directory for this supervisor's processes, emptied first."""
    from gateway.metrics import prepare_multiprocess_dir

    path = settings.metrics_dir or str(Path(settings.var_dir) / "metrics")
    prepare_multiprocess_dir(Path(path))


def _embedded_config(settings: Settings, port: int) -> dict[str, str]:
    """Secrets for the embedded default, generated once and kept in <var>/flashclaim.json."""
    path = Path(settings.var_dir) / "flashclaim.json"
    saved: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    for var in ("FLASHCLAIM_ADMIN_TOKEN", "FLASHCLAIM_IDENTITY_SECRET",
                "FLASHCLAIM_SIGNING_SECRET"):
        saved.setdefault(var, secrets.token_urlsafe(24))
    saved["FLASHCLAIM_URL"] = f"http://127.0.0.1:{port}"
    if not os.environ.get("FLASHCLAIM_REDIS_URL"):  # so `reconcile`, `tail` find it
        saved["FLASHCLAIM_REDIS_URL"] = EmbeddedRedis(Path(settings.var_dir)).url
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2) + "\n")
    path.chmod(0o600)
    return saved


def demo_spec() -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return {
        "id": "demo", "name": "Spend 100, save 30", "stock": 3,
        "starts_at": now.isoformat(), "ends_at": (now + dt.timedelta(days=7)).isoformat(),
        "coupons": [{"kind": "threshold", "value": 3000, "threshold": 10000,
                     "currency": "CNY", "valid_days": 30}],
    }


def _admin_base(settings: Settings, base: str) -> str | None:
    """Where the admin API answers over HTTP: the main port, FLASHCLAIM_ADMIN_LISTEN's
    host:port, or None for a unix socket."""
    from gateway.http.adminauth import Listen

    if not settings.admin_listen:
        return base
    listen = Listen.parse(settings.admin_listen)
    if listen.path:
        return None
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return f"http://{host}:{listen.port}"


def _create_demo(base: str, admin_token: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1):
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    status, body = admin_call(base, admin_token, "POST", "/v1/campaigns", demo_spec())
    if status in (201, 409):
        click.echo("demo campaign `demo` is ready (stock 3)" if status == 201
                   else "demo campaign `demo` already exists")
    else:
        click.echo(f"could not create the demo campaign: {status} {body}", err=True)


@main.command()
@click.option("--port", default=DEFAULT_PORT, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--demo", is_flag=True, help="Create a demo campaign `demo` with stock 3.")
def run(port: int, workers: int, demo: bool) -> None:
    """Everything on one box: a private redis-server (AOF in ./var) unless
    FLASHCLAIM_REDIS_URL is set, generated secrets, and the gateway."""
    settings = load_settings()
    setup_logging(settings.log_level)
    saved = _embedded_config(settings, port)
    embedded = None
    redis_url = os.environ.get("FLASHCLAIM_REDIS_URL")
    if not redis_url:
        embedded = EmbeddedRedis(Path(settings.var_dir))
        embedded.start()
        redis_url = embedded.url
    settings = msgspec.structs.replace(
        settings,
        redis_url=redis_url,
        admin_token=settings.admin_token or saved["FLASHCLAIM_ADMIN_TOKEN"],
        identity_secret=settings.identity_secret or saved["FLASHCLAIM_IDENTITY_SECRET"],
        signing_secret=settings.signing_secret or saved["FLASHCLAIM_SIGNING_SECRET"],
    )
    _check_admin_config(settings)
    _metrics_dir(settings)
    base = f"http://127.0.0.1:{port}"
    click.echo(f"""
flashclaim is running on {base} with {workers} workers
  redis:           {redis_url}{"  (private, AOF appendfsync always)" if embedded else ""}
  store:           {settings.store_url}  (the writer runs alongside)
  admin token:     {settings.admin_token}
  identity secret: {settings.identity_secret}
  (both kept in {Path(settings.var_dir) / "flashclaim.json"}; the CLI reads them from there)

Mint an identity token and claim:
  TOKEN=$(.venv/bin/flashclaim token --sub alice)
  curl -s -X POST {base}/v1/campaigns/demo/claims -H "Authorization: Bearer $TOKEN"
""")
    if demo:
        admin_base = _admin_base(settings, base)
        if admin_base is None:
            click.echo("--demo: the admin API listens on a unix socket; create it there", err=True)
        else:
            threading.Thread(target=_create_demo, args=(admin_base, settings.admin_token or ""),
                             daemon=True).start()
    try:
        roles = gateway_roles(settings, "127.0.0.1", port, workers)
        Supervisor([*roles, (writer_main, (settings,))], stop_timeout_s(settings)).run()
    finally:
        if embedded is not None:
            embedded.stop()


@main.command()
@click.option("--sub", required=True, help="User id (1-128 characters).")
@click.option("--dev", default=None, help="Device id.")
@click.option("--phone", default=None, help="Phone number.")
@click.option("--tags", default="", help="Comma-separated tags, e.g. verified,new_user.")
@click.option("--region", default=None)
@click.option("--ttl", default=3600, show_default=True, help="Seconds until `exp`.")
def token(sub: str, dev: str | None, phone: str | None, tags: str, region: str | None,
          ttl: int) -> None:
    """Mint a development identity token (HS256, FLASHCLAIM_IDENTITY_SECRET)."""
    settings = load_settings()
    if not settings.identity_secret:
        raise click.UsageError("FLASHCLAIM_IDENTITY_SECRET is not set (or run `flashclaim run`)")
    tag_list = [t for t in tags.split(",") if t]
    click.echo(mint_token(settings.identity_secret, sub, ttl_s=ttl, dev=dev, phone=phone,
                          tags=tag_list, region=region))


def _need_redis(settings: Settings) -> None:
    if not settings.redis_url:
        raise click.UsageError("FLASHCLAIM_REDIS_URL is not set (or run `flashclaim run`)")


@main.command()
@click.option("--campaign", "campaign_id", default=None, help="One campaign; default all.")
@click.option("--repair", is_flag=True, help="Re-insert what the stream has and the store lacks.")
def reconcile(campaign_id: str | None, repair: bool) -> None:
    """Compare Redis, the claim streams and the store; exit 1 on any difference."""
    from gateway.durable.reconcile import reconcile as check
    from gateway.durable.reconcile import render
    from gateway.durable.store import open_store
    from gateway.redis.client import connect, redis_client
    from gateway.redis.keys import CAMPAIGNS

    settings = load_settings()
    _need_redis(settings)

    async def go() -> bool:
        client = redis_client(settings)
        await connect(client)
        store = await open_store(settings.store_url)
        try:
            ids = [campaign_id] if campaign_id else sorted(
                str(i) for i in await client.smembers(CAMPAIGNS))
            reports = [await check(client, store, cid, signing_key=settings.signing_key,
                                   repair=repair) for cid in ids]
        finally:
            await store.close()
            await client.aclose()
        click.echo(render(reports))
        return all(r.ok for r in reports)

    try:
        ok = asyncio.run(go())
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--campaign", "campaign_id", required=True)
@click.option("--group", default="tail", show_default=True, help="Consumer group.")
@click.option("--from-start", is_flag=True, help="A new group starts at the first event.")
@click.option("--count", type=int, default=None, help="Stop after this many events.")
@click.option("--consumer", default=None,
              help="Consumer name; reuse it after a crash to get unacked events again.")
def tail(campaign_id: str, group: str, from_start: bool, count: int | None,
         consumer: str | None) -> None:
    """Print claim events as JSON lines through a consumer group (at-least-once)."""

    from gateway.events import subscribe
    from gateway.redis.client import connect, redis_client

    settings = load_settings()
    _need_redis(settings)

    async def go() -> None:
        client = redis_client(settings)
        await connect(client)
        seen = 0
        try:
            async for d in subscribe(client, campaign_id, group, consumer=consumer,
                                         from_start=from_start):
                click.echo(msgspec.json.encode(d.event).decode())
                await d.ack()
                seen += 1
                if count is not None and seen >= count:
                    return
        finally:
            await client.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())


@main.command()
@click.option("--campaign", "campaign_id", default=None, help="Actions on this campaign only.")
@click.option("--target", default=None, help="Actions on this target, e.g. campaign:ID.")
@click.option("--limit", default=100, show_default=True, help="The newest N entries.")
def audit(campaign_id: str | None, target: str | None, limit: int) -> None:
    """Print the admin audit log from the store (FLASHCLAIM_STORE_URL) as JSON lines, oldest
    first: when, who (the admin token's name), what, target, before, after, request id."""
    from gateway.domain import from_ms
    from gateway.durable.store import open_store

    if campaign_id and target:
        raise click.UsageError("give --campaign or --target, not both")
    settings = load_settings()

    async def go() -> None:
        store = await open_store(settings.store_url)
        try:
            await store.migrate()
            entries = await store.audit_entries(
                f"campaign:{campaign_id}" if campaign_id else target, limit)
        finally:
            await store.close()
        for e in entries:
            click.echo(json.dumps({
                "at": from_ms(e.at).isoformat(), "actor": e.actor, "action": e.action,
                "target": e.target, "request_id": e.request_id, "id": e.id,
                "before": None if e.before is None else json.loads(e.before),
                "after": None if e.after is None else json.loads(e.after),
            }, ensure_ascii=False))

    asyncio.run(go())


main.add_command(verify_command)
main.add_command(report)
main.add_command(codes)
main.add_command(campaign)
main.add_command(block)


if __name__ == "__main__":
    main()
