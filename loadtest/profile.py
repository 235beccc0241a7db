"""Where a worker's time goes under load: the benchmark's stack (loadtest/bench.py), one phase
driven by wrk, and py-spy sampling one gateway worker (or hello process) meanwhile. Prints
own time by package and by function, and the project's functions by total time; keeps the
raw stacks (flamegraph.pl / speedscope read them) in loadtest/reports/profile-<phase>.txt.

    .venv/bin/python -m loadtest.profile --phase grant --duration 15
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from loadtest.bench import HERE, Stack

REPORTS = HERE / "reports"


def parse(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """py-spy's collapsed stacks ("frame;frame;... count") into own and total samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def package(frame: str) -> str:
    """"fn (path/to/module.py:12)" -> the top-level package of the module (or the file)."""
    where = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
    if "site-packages/" in where:
        return where.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if where.startswith("gateway/") or "/gateway/" in where:
        return "gateway." + where.rpartition("gateway/")[2].removesuffix(".py").replace("/", ".")
    return where.rpartition("/")[2] or frame


def table(title: str, counts: collections.Counter[str], samples: int, top: int,
          keep: str = "") -> str:
    lines = [title]
    rows = [(f, n) for f, n in counts.most_common() if keep in f][:top]
    for frame, n in rows:
        lines.append(f"{100 * n / max(samples, 1):6.1f}%  {frame}")
    return "\n".join(lines)


@click.command()
@click.option("--phase", type=click.Choice(["grant", "soldout", "hello"]), default="grant",
              show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--duration", default=15, show_default=True)
@click.option("--connections", default=64, show_default=True)
@click.option("--top", default=30, show_default=True)
@click.option("--idle/--no-idle", default=False, help="Count samples of an idle loop too.")
def main(phase: str, workers: int, duration: int, connections: int, top: int,
         idle: bool) -> None:
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        raise click.ClickException("py-spy is missing (pip install py-spy)")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    REPORTS.mkdir(exist_ok=True)
    raw = REPORTS / f"profile-{phase}.txt"
    with Stack(workers, n_tokens=200_000) as stack:
        cid = ""
        if phase == "grant":
            cid = "profiled"
            stack.campaign(cid, stock=100_000_000)
            time.sleep(1.0)
        load = threading.Thread(target=stack.drive, args=(phase, duration + 2, connections, cid))
        load.start()
        time.sleep(1.0)
        pid = stack.worker_pids(hello=phase == "hello")[0]
        cmd = [spy, "record", "--pid", str(pid), "--duration",
               str(duration), "--rate", "250", "--format", "raw", "--output", str(raw),
               "--nonblocking", "--function"] + (["--idle"] if idle else [])
        subprocess.run(cmd, check=True, capture_output=True)
        load.join()
    own, total, samples = parse(raw)
    click.echo(f"{samples} samples of one worker, phase {phase}; raw stacks in {raw}\n")
    by_package: collections.Counter[str] = collections.Counter()
    for frame, n in own.items():
        by_package[package(frame)] += n
    click.echo(table("own time by package or module", by_package, samples, top))
    click.echo()
    click.echo(table("own time", own, samples, top))
    click.echo()
    click.echo(table("total time, the project's functions", total, samples, top,
                     keep="gateway/"))


if __name__ == "__main__":
    main()
