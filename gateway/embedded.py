"""The private `redis-server` of `flashclaim run`: AOF on with `appendfsync always` (the
zero-loss profile) in the var directory, reached over a unix socket, stopped with us."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedis:
    def __init__(self, var_dir: Path, appendfsync: str = "always") -> None:
        self.dir = var_dir.resolve()
        self.appendfsync = appendfsync
        self.socket = self.dir / "redis.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is missing (Debian: apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [
            exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--no-appendfsync-on-rewrite", "no", "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.dir / "redis.log"), "--daemonize", "no",
        ]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket))
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.dir / 'redis.log'}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not become ready")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
