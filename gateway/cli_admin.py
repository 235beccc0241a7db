"""The operator verbs `flashclaim campaign ...` and `flashclaim block ...`: thin clients of the
admin API at FLASHCLAIM_URL with the configured admin token."""

from __future__ import annotations

import datetime as dt
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from gateway.settings import load_settings


def admin_call(base: str, admin_token: str, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def admin_request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One admin API call with the configured URL and token; usage errors for the CLI."""
    settings = load_settings()
    if not settings.admin_token:
        raise click.UsageError("FLASHCLAIM_ADMIN_TOKEN is not set (or run `flashclaim run`)")
    try:
        return admin_call(settings.url, settings.admin_token, method, path, body)
    except (urllib.error.URLError, OSError) as e:
        raise click.ClickException(f"cannot reach {settings.url}: {e}") from None


def _admin(method: str, path: str, body: Any = None) -> None:
    status, doc = admin_request(method, path, body)
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    if status >= 400:
        sys.exit(1)


@click.group()
def campaign() -> None:
    """Create and steer campaigns (admin API at FLASHCLAIM_URL)."""


@campaign.command("create")
@click.option("--file", "spec_file", type=click.File(), help="A campaign spec as JSON.")
@click.option("--id", "cid", default=None, help="Slug; generated when absent.")
@click.option("--name", default=None)
@click.option("--stock", type=int, default=None)
@click.option("--starts-in", type=float, default=0, show_default=True, help="Seconds from now.")
@click.option("--duration", type=float, default=3600, show_default=True, help="Seconds.")
@click.option("--per-user", type=int, default=1, show_default=True)
@click.option("--per-device", type=int, default=None)
@click.option("--per-phone", type=int, default=None)
@click.option("--per-ip", type=int, default=None)
@click.option("--per-subnet", type=int, default=None, help="Grants per IPv4 /24 or IPv6 /48.")
@click.option("--coupon", default="threshold:3000:10000", show_default=True,
              help="KIND:VALUE[:THRESHOLD], money in minor units.")
@click.option("--valid-days", type=int, default=30, show_default=True)
@click.option("--currency", default="CNY", show_default=True)
@click.option("--shards", type=int, default=1, show_default=True,
              help="Split the stock over this many Redis slots (a hot campaign on a cluster).")
def campaign_create(spec_file: Any, cid: str | None, name: str | None, stock: int | None,
                    starts_in: float, duration: float, per_user: int, per_device: int | None,
                    per_phone: int | None, per_ip: int | None, per_subnet: int | None,
                    coupon: str, valid_days: int, currency: str, shards: int) -> None:
    """Create a campaign from --file, or from the options."""
    if spec_file is not None:
        _admin("POST", "/v1/campaigns", json.load(spec_file))
        return
    if not name or stock is None:
        raise click.UsageError("give --file, or at least --name and --stock")
    kind, _, rest = coupon.partition(":")
    value, _, threshold = rest.partition(":")
    start = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=starts_in)
    limits = {k: v for k, v in [("per_user", per_user), ("per_device", per_device),
                                ("per_phone", per_phone), ("per_ip", per_ip),
                                ("per_subnet", per_subnet)] if v is not None}
    spec: dict[str, Any] = {
        "name": name, "stock": stock, "limits": limits,
        "starts_at": start.isoformat(),
        "ends_at": (start + dt.timedelta(seconds=duration)).isoformat(),
        "coupons": [{"kind": kind, "value": int(value or 0), "threshold": int(threshold or 0),
                     "currency": currency, "valid_days": valid_days}],
    }
    if cid:
        spec["id"] = cid
    if shards > 1:
        spec["shards"] = shards
    _admin("POST", "/v1/campaigns", spec)


@campaign.command("list")
def campaign_list() -> None:
    """All campaigns with their live numbers."""
    _admin("GET", "/v1/campaigns")


@campaign.command("show")
@click.argument("campaign_id")
def campaign_show(campaign_id: str) -> None:
    """One campaign: spec, status, stock, remaining, claimed."""
    _admin("GET", f"/v1/campaigns/{campaign_id}")


def _status_verb(verb: str) -> None:
    @campaign.command(verb, help=f"{verb.capitalize()} a campaign.")
    @click.argument("campaign_id")
    def cmd(campaign_id: str) -> None:
        _admin("POST", f"/v1/campaigns/{campaign_id}/{verb}")


for _verb in ("pause", "resume", "end"):
    _status_verb(_verb)


@campaign.command("restock")
@click.argument("campaign_id")
@click.argument("quantity", type=int)
def campaign_restock(campaign_id: str, quantity: int) -> None:
    """Add QUANTITY units to a campaign that has not ended."""
    _admin("POST", f"/v1/campaigns/{campaign_id}/restock", {"quantity": quantity})


@campaign.command("patch")
@click.argument("campaign_id")
@click.argument("patch", required=False)
@click.option("--file", "patch_file", type=click.File(), help="The merge patch as JSON.")
def campaign_patch(campaign_id: str, patch: str | None, patch_file: Any) -> None:
    """Change a running campaign's limits, eligibility or admission with a JSON merge patch
    (RFC 7396), e.g. '{"limits": {"per_ip": 3}}'; prints the fields before and after."""
    text = patch_file.read() if patch_file is not None else patch
    if not text:
        raise click.UsageError("give the patch as an argument or with --file")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="PATCH") from None
    _admin("PATCH", f"/v1/campaigns/{campaign_id}", body)


_KIND = click.Choice(["user", "device", "ip"])


@click.group()
def block() -> None:
    """Blocklists of users, devices and addresses/CIDRs (admin API at FLASHCLAIM_URL)."""


@block.command("add")
@click.argument("kind", type=_KIND)
@click.argument("value")
@click.option("--reason", default="", help="Why, for the record.")
@click.option("--hashed", is_flag=True, help="VALUE is a device's keyed hash (as `top` shows).")
def block_add(kind: str, value: str, reason: str, hashed: bool) -> None:
    """Block a user id, a device id or an address/CIDR on every worker."""
    _admin("POST", f"/v1/blocks/{kind}", {"value": value, "reason": reason, "hashed": hashed})


@block.command("remove")
@click.argument("kind", type=_KIND)
@click.argument("value")
@click.option("--hashed", is_flag=True, help="VALUE is a device's keyed hash.")
def block_remove(kind: str, value: str, hashed: bool) -> None:
    """Unblock; every worker follows within a second."""
    query = urllib.parse.urlencode({"value": value, **({"hashed": "true"} if hashed else {})})
    _admin("DELETE", f"/v1/blocks/{kind}?{query}")


@block.command("list")
@click.argument("kind", type=_KIND)
def block_list(kind: str) -> None:
    """One blocklist (devices as keyed hashes)."""
    _admin("GET", f"/v1/blocks/{kind}")

