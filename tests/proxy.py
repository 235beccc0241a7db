"""A loopback TCP proxy for fault tests: it forwards to a real server and can cut the link
(drop every connection, refuse new ones), pause it (hold the bytes, like a frozen server)
or add latency (every chunk arrives `delay_s` later, in each direction)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from tests.servers import free_port

CHUNK = 64 * 1024


class TcpProxy:
    """Runs in the caller's event loop: `async with TcpProxy(host, port) as p:` then
    connect to 127.0.0.1:`p.port`; `cut()`, `pause()` and `restore()` at will.

    With `delay_s`, each chunk is forwarded `delay_s` after it was read (a delay line: the
    latency is added once per chunk, chunks in flight overlap, bandwidth is not limited)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, delay_s: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.port = free_port()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def state(self) -> str:
        if self._server is None:
            return "cut"
        return "open" if self._flowing.is_set() else "paused"

    async def __aenter__(self) -> TcpProxy:
        await self.restore()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restore(self) -> None:
        """Listen (again) and forward everything, including what a pause held back."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True)
        self._flowing.set()

    async def pause(self) -> None:
        """Keep accepting and keep every connection open, but forward nothing."""
        if self._server is None:
            await self.restore()
        self._flowing.clear()

    async def cut(self) -> None:
        """Stop listening (connects are refused) and reset every open connection."""
        self._flowing.clear()
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    def _track(self, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._track(client_w)
        server = self._server
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            return
        if self._server is None or self._server is not server:  # cut while connecting
            up_w.transport.abort()
            client_w.transport.abort()
            self._writers.discard(client_w)
            return
        self._track(up_w)
        self._spawn(self._pump(client_r, up_w))
        self._spawn(self._pump(up_r, client_w))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        if self.delay_s > 0:
            await self._delayed_pump(src, dst)
            return
        try:
            while data := await src.read(CHUNK):
                await self._flowing.wait()  # paused: hold the bytes, keep the socket
                if dst.transport.is_closing():
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.transport.abort()

    async def _delayed_pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await line.get()
                if not data:
                    return
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if dst.transport.is_closing():
                    return
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await src.read(CHUNK):
                line.put_nowait((loop.time() + self.delay_s, data))
                if sender.done():
                    break
            line.put_nowait((loop.time() + self.delay_s, b""))  # EOF, after the last chunk
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.transport.abort()
