"""A local Redis Cluster for the tests: three masters on loopback ports, no replicas, each
redis-server in its own directory; `url` is the gateway's `redis+cluster://` form. `stack`:
a module's cluster with a 2-worker gateway and a writer into SQLite."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as SyncCluster

from tests.servers import Gateway, Writer, free_port


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


class Stack:
    def __init__(self, cluster: LocalCluster, gateway: Gateway, writer: Writer,
                 store: Path) -> None:
        self.cluster, self.gateway, self.writer, self.store = cluster, gateway, writer, store

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=self.writer.env,
                              capture_output=True, text=True, timeout=60, check=False)

    def logs(self) -> str:
        return "".join((self.gateway.dir / name).read_text(errors="replace")
                       for name in ("gateway.log", "writer.log")
                       if (self.gateway.dir / name).exists())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    gw_dir = tmp_path_factory.mktemp("gateway")
    store = gw_dir / "claims.db"
    gw = Gateway(cluster.url, gw_dir, workers=2)
    writer = Writer(gw, f"sqlite:///{store}")
    try:
        cluster.start()
        gw.start()
        writer.start()
        yield Stack(cluster, gw, writer, store)
    finally:
        writer.stop()
        gw.stop()
        cluster.stop()
    assert "CROSSSLOT" not in Stack(cluster, gw, writer, store).logs()


async def stored(stack: Stack, cid: str) -> int:
    def count() -> int:
        if not stack.store.exists():
            return 0
        with sqlite3.connect(stack.store) as db:
            try:
                return int(db.execute("SELECT count(*) FROM claims WHERE campaign_id = ?",
                                      (cid,)).fetchone()[0])
            except sqlite3.OperationalError:  # not migrated yet
                return 0

    return await asyncio.to_thread(count)


async def drained(stack: Stack, cid: str, grants: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while await stored(stack, cid) < grants:
        assert time.monotonic() < deadline, f"the writer stored {await stored(stack, cid)}"
        await asyncio.sleep(0.2)
