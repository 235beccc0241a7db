"""A slowloris attacker for the hardening tests, in its own process so that its event loop
does not slow the legitimate client that measures: `python -m tests.slowloris PORT SOCKETS`
holds SOCKETS connections from 127.0.0.10-.19 (opened over 2 s), each sending one header
line every 0.5 s and reconnecting when cut, until stdin closes; then prints how often the
server cut one."""

from __future__ import annotations

import asyncio
import sys


async def attack(port: int, sockets: int) -> int:
    stop = asyncio.Event()
    cuts = 0

    async def one(i: int) -> None:
        nonlocal cuts
        await asyncio.sleep(i * 2.0 / sockets)  # staggered, as a real attack settles into
        while not stop.is_set():
            try:
                _, w = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(f"127.0.0.{10 + i % 10}", 0))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                w.write(b"POST /v1/campaigns/x/claims HTTP/1.1\r\nHost: x\r\n")
                n = 0
                while not stop.is_set():
                    await asyncio.sleep(0.5)
                    w.write(b"X-Slow-%d: %d\r\n" % (n, n))
                    await w.drain()
                    n += 1
            except (ConnectionError, OSError):
                cuts += 1
            finally:
                w.close()

    tasks = [asyncio.create_task(one(i)) for i in range(sockets)]
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cuts


if __name__ == "__main__":
    print(asyncio.run(attack(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
