"""`flashclaim report --campaign ID [--csv FILE]`: a campaign's report from the admin API,
printed for a person, or saved as CSV."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from gateway.settings import load_settings


def fetch(path: str) -> tuple[int, bytes]:
    settings = load_settings()
    if not settings.admin_token:
        raise click.UsageError("FLASHCLAIM_ADMIN_TOKEN is not set (or run `flashclaim run`)")
    req = urllib.request.Request(settings.url + path, headers={
        "Authorization": f"Bearer {settings.admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise click.ClickException(f"cannot reach {settings.url}: {e}") from None


def render_text(r: dict[str, Any]) -> str:
    rate, budget = r["claim_rate"], r["budget"]
    sell_out = r["time_to_sell_out_s"]
    lines = [
        f"campaign {r['campaign_id']} ({r['name']}), {r['status']}",
        f"  issued {r['issued']}  claimed {r['claimed']}  remaining {r['remaining']}  "
        f"stored {r['stored']}",
        f"  first claim {r['first_claim_at'] or '-'}  last claim {r['last_claim_at'] or '-'}",
        "  time to sell out " + ("-" if sell_out is None else f"{sell_out:.3f} s"),
        f"  claim rate per {rate['bucket_s']} s: peak {rate['peak_per_s']}/s, "
        f"mean {rate['mean_per_s']}/s",
        f"  budget (minor units): used {budget['used']} of {budget['issued']} put up"
        + ("" if budget.get("cap") is None else f", cap {budget['cap']}"),
    ]
    for title, key in (("rejections", "rejections"), ("by channel", "by_channel"),
                       ("by region", "by_region")):
        items = r[key]
        body = ", ".join(f"{k or '(none)'} {v}" for k, v in items.items()) or "-"
        lines.append(f"  {title}: {body}")
    if rate["buckets"]:
        lines.append("  claims per bucket:")
        lines += [f"    {b['at']}  {b['claims']:>8}  {b['per_s']}/s" for b in rate["buckets"]]
    return "\n".join(lines)


@click.command()
@click.option("--campaign", "campaign_id", required=True)
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Write the report as CSV (section,key,value) to this file.")
@click.option("--bucket-s", type=int, default=60, show_default=True,
              help="Seconds per claim-rate bucket.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report(campaign_id: str, csv_file: str | None, bucket_s: int, as_json: bool) -> None:
    """Issued, claimed, remaining, claim rate, rejections, channels, regions, time to sell
    out and budget of one campaign (admin API at FLASHCLAIM_URL)."""
    query = urllib.parse.urlencode({"bucket_s": bucket_s, "format": "csv" if csv_file else "json"})
    status, body = fetch(f"/v1/campaigns/{urllib.parse.quote(campaign_id, safe='')}/report?{query}")
    if status >= 400:
        click.echo(body.decode(errors="replace"), err=True)
        sys.exit(1)
    if csv_file:
        with open(csv_file, "wb") as f:
            f.write(body)
        click.echo(f"wrote {csv_file}")
        return
    doc = json.loads(body)
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False) if as_json else render_text(doc))
