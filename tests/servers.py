"""Real processes for the tests: a private redis-server on a free port (the tests may stop,
restart or reconfigure it) and `flashclaim serve` as a subprocess with N workers."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import redis

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, and never one this test process handed out before: a
    server picks its port before it binds, so two pickers could otherwise collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def terminate(proc: subprocess.Popen[bytes] | None, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    def __init__(self, workdir: Path, *, appendonly: bool = True) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run `make setup`")
        self.exe = exe
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def start(self) -> None:
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec", "--enable-debug-command", "yes",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        c = self.client()
        while True:
            try:
                if c.ping():
                    c.close()
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def digest(self) -> str:
        """A digest of the whole dataset: equal digests, unchanged state."""
        c = self.client()
        try:
            return str(c.execute_command("DEBUG", "DIGEST"))
        finally:
            c.close()


class Gateway:
    """`flashclaim serve` with its own secrets, against a given Redis URL."""

    def __init__(
        self, redis_url: str, workdir: Path, *, workers: int = 2, **env: str
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(16)
        self.identity_secret = secrets.token_urlsafe(24)
        self.signing_secret = secrets.token_urlsafe(24)
        self.workers = workers
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")},
            "FLASHCLAIM_REDIS_URL": redis_url,
            "FLASHCLAIM_ADMIN_TOKEN": self.admin_token,
            "FLASHCLAIM_IDENTITY_SECRET": self.identity_secret,
            "FLASHCLAIM_SIGNING_SECRET": self.signing_secret,
            "FLASHCLAIM_VAR_DIR": str(self.dir / "var"),
            "FLASHCLAIM_URL": self.base,
            "FLASHCLAIM_LOG_LEVEL": "WARNING",
            **{f"FLASHCLAIM_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = open(self.dir / "gateway.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port),
             "--workers", str(self.workers)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 40) -> None:
        """Ready when /readyz answered 200 several times in a row (reaching every worker)."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while streak < 4 * self.workers:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited; see {self.dir / 'gateway.log'}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    streak = streak + 1 if r.status == 200 else 0
            except (urllib.error.URLError, OSError):
                streak = 0
                time.sleep(0.05)
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready; see {self.dir / 'gateway.log'}")
        time.sleep(0.2)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if hasattr(self, "log"):
            self.log.close()

    def token(self, sub: str, **claims: object) -> str:
        from gateway.identity import mint_token

        return mint_token(self.identity_secret, sub, **claims)  # type: ignore[arg-type]

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


class Writer:
    """`flashclaim writer` as a subprocess, sharing a gateway's secrets; SIGKILL-able."""

    def __init__(self, gateway: Gateway, store_url: str, **env: str) -> None:
        self.dir = gateway.dir
        self.env = {
            **gateway.env,
            "FLASHCLAIM_STORE_URL": store_url,
            "FLASHCLAIM_WRITER_CLAIM_IDLE_MS": "1000",
            **{f"FLASHCLAIM_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        extra = {f"FLASHCLAIM_{k.upper()}": v for k, v in env.items()}
        with open(self.dir / "writer.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "writer"],
                env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


@contextlib.contextmanager
def private_stack(
    redis_dir: Path, gateway_dir: Path, *, workers: int = 2, **env: str
) -> Iterator[tuple[RedisServer, Gateway]]:
    """A Redis and a gateway of the caller's own (to stop, kill or reconfigure)."""
    rs = RedisServer(redis_dir)
    gw = Gateway(rs.url, gateway_dir, workers=workers, **env)
    try:
        rs.start()
        gw.start()
        yield rs, gw
    finally:
        gw.stop()
        rs.stop()


PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_pg_database() -> str:
    """A fresh database on the local PostgreSQL; fails loudly when the server is not there."""
    import asyncio

    import asyncpg

    name = f"flashclaim_test_{secrets.token_hex(6)}"

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go())
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    import asyncio

    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())
