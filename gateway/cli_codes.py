"""`flashclaim codes`: generate a campaign's redemption codes into a file, or import a file of
the operator's own, through the admin API. Generated codes exist in clear only in that file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click


def _call(method: str, path: str, body: Any = None) -> Any:
    from gateway.cli_admin import admin_request  # the CLI's one admin client

    status, doc = admin_request(method, path, body)
    if status >= 400:
        detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
        raise click.ClickException(f"{status}: {detail}")
    return doc


@click.group()
def codes() -> None:
    """Redemption codes of a campaign with `redemption_codes` (admin API at FLASHCLAIM_URL)."""


@codes.command("generate")
@click.option("--campaign", "campaign_id", required=True)
@click.option("--count", type=click.IntRange(1, 100_000), required=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="New file for the codes, one per line (readable by you only).")
def generate(campaign_id: str, count: int, out: Path) -> None:
    """Generate COUNT one-time codes; the gateway keeps only their keyed hashes, so this
    file is the one copy of the codes."""
    # the file first: a code the gateway accepted must never be lost on the way to disk
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.UsageError(f"{out} exists; codes are never written over a file") from None
    with os.fdopen(fd, "w") as f:
        try:
            doc = _call("POST", f"/v1/campaigns/{campaign_id}/codes", {"generate": count})
        except BaseException:
            out.unlink()
            raise
        f.writelines(f"{c}\n" for c in doc["codes"])
    click.echo(f"{doc['added']} codes written to {out}; {doc['available']} unused in "
               f"campaign {campaign_id}")


@codes.command("import")
@click.option("--campaign", "campaign_id", required=True)
@click.option("--file", "path", type=click.File(), required=True, help="One code per line.")
def import_codes(campaign_id: str, path: Any) -> None:
    """Add the operator's own codes (6-64 letters and digits; case and dashes ignored)."""
    batch = [line.strip() for line in path if line.strip()]
    if not batch:
        raise click.UsageError("the file has no codes")
    doc = _call("POST", f"/v1/campaigns/{campaign_id}/codes", {"import": batch})
    click.echo(f"{doc['added']} codes added ({doc['duplicates']} already known); "
               f"{doc['available']} unused in campaign {campaign_id}")


@codes.command("count")
@click.option("--campaign", "campaign_id", required=True)
def count_codes(campaign_id: str) -> None:
    """How many codes are not yet used."""
    doc = _call("GET", f"/v1/campaigns/{campaign_id}/codes")
    click.echo(str(doc["available"]))
