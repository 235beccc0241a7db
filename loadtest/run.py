"""One command per rehearsal: starts the embedded gateway (`flashclaim run`, with the
scenario's settings) unless `--url` names one, creates the scenario's campaign, runs its
Locust scenario headless with CSV and HTML reports, and exits with Locust's exit code —
the verifier's verdict.

    .venv/bin/python -m loadtest.run release [--url URL] [--users N] [--hold S] [--stock N]
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from gateway.cli_admin import admin_call
from gateway.settings import load_settings
from loadtest.plan import (
    GATEWAY_ENV,
    NO_CONTROLS_ENV,
    SCENARIOS,
    TRUSTED_PROXY,
    Knobs,
    campaign_spec,
)

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtest" / "reports"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 8:  # several answers in a row: every worker is up
        if proc.poll() is not None:
            raise click.ClickException("the embedded gateway exited; see its log")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                streak = streak + 1 if r.status == 200 else 0
        except (urllib.error.URLError, OSError):
            streak = 0
            time.sleep(0.1)
        if time.monotonic() > deadline:
            raise click.ClickException(f"the embedded gateway at {base} did not get ready")


def embedded(scenario: str, out: Path, workers: int, fault: str,
             controls: bool) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """`flashclaim run` in <out>/var, trusting X-Forwarded-For from this machine."""
    var = out / "var"
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")}
    env.update({"FLASHCLAIM_VAR_DIR": str(var),
                "FLASHCLAIM_STORE_URL": f"sqlite:///{var / 'claims.db'}",
                "FLASHCLAIM_TRUSTED_PROXIES": TRUSTED_PROXY,
                "FLASHCLAIM_LOG_LEVEL": "WARNING", "FLASHCLAIM_FAULT": fault,
                **GATEWAY_ENV[scenario], **({} if controls else NO_CONTROLS_ENV)})
    log = (out / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--port", str(port),
         "--workers", str(workers)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, base, env


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@click.command()
@click.argument("scenario", type=click.Choice(SCENARIOS))
@click.option("--url", default=None,
              help="A running gateway (FLASHCLAIM_* settings from the environment); "
                   "default: start `flashclaim run`.")
@click.option("--users", default=0, help="Peak simulated users (0: the scenario's default).")
@click.option("--hold", default=20.0, show_default=True, help="Seconds at the peak.")
@click.option("--drain", default=5.0, show_default=True, help="Seconds of ramp-down.")
@click.option("--stock", default=0, help="Campaign stock (0: the scenario's default).")
@click.option("--bot-factor", default=100.0, show_default=True,
              help="bots: request rate per bot identity over a human's.")
@click.option("--lead", default=4.0, show_default=True,
              help="Seconds from now to T0, the campaign's start (Locust starts meanwhile).")
@click.option("--workers", default=2, show_default=True, help="Embedded gateway workers.")
@click.option("--fault", default="", help="Embedded gateway only: a test-only fault point "
              "(FLASHCLAIM_FAULT), e.g. skip_device_limit; the verdict must then be FAIL.")
@click.option("--no-controls", is_flag=True,
              help="bots, embedded: no device/address limits, no request rates (the "
                   "contrast: the fairness check should then fail).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report directory; default loadtest/reports/SCENARIO.")
def main(scenario: str, url: str | None, users: int, hold: float, drain: float, stock: int,
         bot_factor: float, lead: float, workers: int, fault: str, no_controls: bool,
         out: Path | None) -> None:
    """Rehearse a release with Locust and exit with the verifier's verdict."""
    out = (out or REPORTS / scenario).resolve()
    shutil.rmtree(out / "grants", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    proc = None
    if url is None:
        proc, url, env = embedded(scenario, out, workers, fault, not no_controls)
    elif fault or no_controls:
        raise click.UsageError("--fault and --no-controls apply to the embedded gateway only")
    else:
        env = {**os.environ, "FLASHCLAIM_URL": url}
    try:
        settings = load_settings(env)
        cid = f"{scenario.replace('_', '-')}-{dt.datetime.now():%m%d-%H%M%S}"
        knobs = Knobs(scenario, cid, str(out), time.time() + lead, users, hold, drain, stock,
                      bot_factor, int(not no_controls))
        status, body = admin_call(url, settings.admin_token or "", "POST", "/v1/campaigns",
                                  campaign_spec(knobs))
        if status != 201:
            raise click.ClickException(f"could not create the campaign: {status} {body}")
        click.echo(f"{scenario}: campaign {cid}, T0 in {lead:g} s, reports in {out}", err=True)
        cmd = [sys.executable, "-m", "locust", "-f", f"loadtest/scenarios/{scenario}.py",
               "--headless", "--only-summary", "--host", url,
               "--csv", str(out / scenario), "--html", str(out / f"{scenario}.html")]
        rc = subprocess.call(cmd, env={**env, **knobs.env()}, cwd=ROOT)
    finally:
        if proc is not None:
            stop(proc)
    sys.exit(rc)


if __name__ == "__main__":
    main()
