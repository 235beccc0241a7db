"""Serving: one worker process runs the aiohttp app on uvloop with SO_REUSEPORT; the
supervisor starts N of them on one port (plus one for the admin API when it listens apart),
restarts any that die, and drains them on SIGTERM: `/readyz` 503 for
FLASHCLAIM_DRAIN_DELAY_S, then stop listening, then in-flight requests get
FLASHCLAIM_SHUTDOWN_TIMEOUT_S to finish before the app's resources close."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

import uvloop
from aiohttp import web

from gateway.http.adminauth import Listen
from gateway.http.app import Part, create_app
from gateway.http.connections import ConnectionGuard, GuardedSite, handler_limits
from gateway.http.peer import PeerResolver
from gateway.http.problems import DRAIN
from gateway.settings import Settings

log = logging.getLogger(__name__)

STOP_MARGIN_S = 5.0  # beyond drain and shutdown: closing Redis, the store, the metrics files


def stop_timeout_s(settings: Settings) -> float:
    """How long the supervisor waits for its processes after SIGTERM before it kills them;
    a container's grace period (terminationGracePeriodSeconds) must cover it."""
    return settings.drain_delay_s + settings.shutdown_timeout_s + STOP_MARGIN_S


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


async def _serve(settings: Settings, listen: Listen, part: Part) -> None:
    app = create_app(settings, part=part)
    handler_kwargs = {"access_log": None, **handler_limits(settings)}
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, **handler_kwargs)
    await runner.setup()
    # Start-up objects live for the whole process: keep the collector off them, and let
    # young garbage pile up longer between collections (fewer, shorter pauses under load).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    site: web.BaseSite
    if listen.path:
        site = web.UnixSite(runner, listen.path)
        await site.start()
        os.chmod(listen.path, 0o600)  # the admin API: only this user's processes
    else:
        guard = ConnectionGuard(settings, PeerResolver(settings.trusted_proxies))
        site = GuardedSite(runner, listen.host, listen.port, guard, backlog=4096,
                           **handler_kwargs)
        await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app[DRAIN].start()
    if settings.drain_delay_s > 0:
        log.info("draining: /readyz answers 503 for %.1fs before listening stops",
                 settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
    # Stops listening, lets in-flight requests finish (up to the shutdown timeout), then
    # closes the app's resources: the claim batcher answers every claim it holds first.
    await runner.cleanup()


def worker_main(settings: Settings, host: str, port: int, part: Part = "all") -> None:
    setup_logging(settings.log_level)
    uvloop.run(_serve(settings, Listen(host, port, ""), part))


def admin_main(settings: Settings) -> None:
    """The admin API alone, on FLASHCLAIM_ADMIN_LISTEN."""
    setup_logging(settings.log_level)
    uvloop.run(_serve(settings, Listen.parse(settings.admin_listen), "admin"))


def writer_main(settings: Settings) -> None:
    from gateway.durable.writer import serve_writer

    setup_logging(settings.log_level)
    uvloop.run(serve_writer(settings))


Role = tuple[Callable[..., None], tuple[Any, ...]]


def gateway_roles(settings: Settings, host: str, port: int, workers: int) -> list[Role]:
    """N workers on the port; when the admin API listens apart, they serve no admin route
    and one more process serves only those (admin traffic is light and never shares a
    worker's event loop with a release's claims)."""
    if not settings.admin_listen:
        return [(worker_main, (settings, host, port))] * workers
    return [(worker_main, (settings, host, port, "public"))] * workers + [
        (admin_main, (settings,))]


class Supervisor:
    """Keeps one process per role running until stopped (SIGTERM/SIGINT)."""

    def __init__(self, roles: list[Role], stop_timeout_s: float) -> None:
        self._roles = roles
        self._stop_timeout_s = stop_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._stopping = False

    def _spawn(self, role: Role) -> BaseProcess:
        p = self._ctx.Process(target=role[0], args=role[1], daemon=False)
        p.start()
        return p

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._procs = [self._spawn(r) for r in self._roles]
        while not self._stopping:
            wait([p.sentinel for p in self._procs], timeout=0.2)
            for i, p in enumerate(self._procs):
                if not p.is_alive() and not self._stopping:
                    log.error("process %s exited with %s; restarting", p.pid, p.exitcode)
                    time.sleep(0.2)
                    self._procs[i] = self._spawn(self._roles[i])
        self.shutdown()

    def shutdown(self) -> None:
        for p in self._procs:
            if p.is_alive() and p.pid is not None:
                p.terminate()
        deadline = time.monotonic() + self._stop_timeout_s
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
