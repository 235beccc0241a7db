"""A local Redis Cluster for the tests: three masters on loopback ports, no replicas, each
redis-server in its own directory; `url` is the gateway's `redis+cluster://` form."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as SyncCluster

from tests.servers import free_port


class LocalCluster:
    def __init__(self, workdir: Path, masters: int = 3) -> None:
        exe = shutil.which("redis-server")
        if exe is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server/redis-cli are not installed; run `make setup`")
        self.exe = exe
        self.dir = workdir
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]  # a free port may be > 55535
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self) -> SyncCluster:
        nodes = [ClusterNode("127.0.0.1", p) for p in self.ports]
        return SyncCluster(startup_nodes=nodes, decode_responses=True)

    def start(self) -> None:
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            d = self.dir / str(port)
            d.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen([
                self.exe, "--port", str(port), "--cluster-port", str(bus),
                "--bind", "127.0.0.1", "--dir", str(d),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--logfile", str(d / "redis.log"),
            ], stdin=subprocess.DEVNULL))
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).ping(), "redis-server did not start")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60,
        )

        def ok() -> bool:
            for p in self.ports:
                info = redis.Redis(port=p, decode_responses=True).cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
            return True

        self._wait(ok, "the cluster did not reach cluster_state:ok")

    def _wait(self, ready: object, message: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if ready():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{message}; see {self.dir}/*/redis.log")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join((self.dir / str(p) / "redis.log").read_text(errors="replace")
                         for p in self.ports if (self.dir / str(p) / "redis.log").exists())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
