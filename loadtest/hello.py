"""The ceiling the claim endpoint is measured against: a bare aiohttp+uvloop POST endpoint,
served exactly like the gateway (same supervisor, N processes, SO_REUSEPORT, no access log)."""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

from gateway.serve import Supervisor

BODY = b'{"hello":"world"}'


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, status=201, content_type="application/json")


async def _serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_post("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True, backlog=4096).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def hello_main(host: str, port: int) -> None:
    uvloop.run(_serve(host, port))


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    Supervisor([(hello_main, ("127.0.0.1", port))] * workers, stop_timeout_s=5).run()
