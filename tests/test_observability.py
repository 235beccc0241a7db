"""Observability: alert rules pass promtool, every dashboard and rule expression parses and
names only live metrics, and a real Prometheus counts exactly the claims clients saw."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import errors
from gateway.redis.keys import CampaignKeys
from tests.conftest import claim, create_campaign, spec
from tests.servers import Gateway, RedisServer, Writer, free_port, terminate

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "flashclaim.yml"
RULE_TESTS = PROM / "rules" / "flashclaim_test.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
HINT = "install Debian's prometheus package: `apt-get install -y prometheus` (make setup does)"
SYNTHETIC = {"up"}  # made by Prometheus itself, not exported by the gateway
OUTCOMES = {"granted"} | {c.code for c in vars(errors).values()
                          if isinstance(c, type) and issubclass(c, errors.Problem)}
_STR = r'"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(r"(?<![\w:$])(flashclaim_[a-z0-9_]+|up)(?![\w:(])"
                      r"(\{(?:[^{}\"]|" + _STR + r")*\})?")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*(" + _STR + ")")
RECORDED = re.compile(r"(?<![\w:])flashclaim:[a-z0-9_:]+")
DEADLINE_S = 30.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {HINT}")
    return path


def promtool(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def eventually(what: str, check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def http_json(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
              method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"null")


def dashboard_exprs() -> list[str]:
    return [t["expr"] for d in DASHBOARDS for p in json.loads(d.read_text())["panels"]
            for t in p.get("targets", [])]


def concrete(expr: str, campaign: str) -> str:
    """A dashboard expression with Grafana's variables filled in as Grafana would."""
    for var, value in (("$__rate_interval", "1m"), ("$__range", "5m"),
                       ("${campaign}", campaign), ("$campaign", campaign)):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


@dataclass
class Scrape:
    samples: dict[str, set[str]]  # sample name -> label names seen on it
    values: dict[str, set[str]]  # label name -> values seen (any sample)

    @classmethod
    def of(cls, text: str) -> Scrape:
        samples: dict[str, set[str]] = {}
        values: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, set()).update(s.labels)
                for k, v in s.labels.items():
                    values.setdefault(k, set()).add(v)
        return cls(samples, values)


def scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(gw.base + "/metrics", timeout=10) as r:
        return str(r.read().decode())


class Prometheus:
    """Debian's prometheus on a free port, scraping `targets` every second, with our rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.dir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps({  # JSON is YAML; the test variant of the deploy file
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "flashclaim", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        promtool("check", "config", str(self.config))
        self.log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.config}",
             f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"prometheus exited; see {self.dir / 'prometheus.log'}"
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False
        eventually("prometheus to be ready", ready)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if hasattr(self, "log"):
            self.log.close()

    def api(self, path: str, **params: str) -> tuple[int, Any]:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        return http_json(url)

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, doc = self.api("query", query=expr)
        assert status == 200 and doc["status"] == "success", f"{expr}: {doc}"
        return list(doc["data"]["result"])


@dataclass
class Rig:
    redis: RedisServer
    gw: Gateway
    writer: Writer
    sold: str = ""  # a campaign sold out, with a dead letter
    open: str = ""  # a campaign with stock, claimed while Redis was down
    scrape: Scrape | None = None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Our own Redis (this module stops it), a 2-worker gateway, and a writer that shares the
    gateway's metrics directory, as under `flashclaim run`."""
    tmp = tmp_path_factory.mktemp("observability")
    redis = RedisServer(tmp / "redis")
    gw = Gateway(redis.url, tmp / "gateway", workers=2)
    writer = Writer(gw, f"sqlite:///{tmp / 'claims.db'}", writer_max_deliveries="1")
    writer.env["PROMETHEUS_MULTIPROC_DIR"] = str(gw.dir / "var" / "metrics")
    try:
        redis.start()
        gw.start()
        writer.start()
        yield Rig(redis, gw, writer)
    finally:
        writer.stop()
        gw.stop()
        redis.stop()


def post_claim(gw: Gateway, cid: str, sub: str, *, token: str | None = None,
               body: bytes = b"{}") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token or gw.token(sub)}",
               "Content-Type": "application/json"}
    return http_json(f"{gw.base}/v1/campaigns/{cid}/claims", body, headers, "POST")


@pytest.fixture(scope="module")
def exercised(rig: Rig) -> Rig:
    """Claims of many outcomes, a dead letter, and a Redis outage (gateway and writer errors),
    so that every metric the boards and rules name has samples."""
    gw = rig.gw

    def create(stock: int, **over: Any) -> str:
        body = json.dumps(spec(stock=stock, **over)).encode()
        status, doc = http_json(gw.base + "/v1/campaigns", body,
                                {**gw.admin_headers, "Content-Type": "application/json"}, "POST")
        assert status == 201, doc
        return str(doc["id"])

    def names() -> set[str]:
        return set(Scrape.of(scrape(gw)).samples)

    rig.sold, rig.open = create(3), create(1000)
    room = create(10, admission={"admit_per_s": 10, "waiting_room": True})
    for i in range(4):  # new connections: both workers learn the room campaign
        assert post_claim(gw, room, f"queued-{i}")[0] == 202
    assert post_claim(gw, rig.sold, "u1")[0] == 201
    assert post_claim(gw, rig.sold, "u1")[1]["code"] == "limit_reached"
    assert post_claim(gw, rig.sold, "u9", token="not-a-token")[1]["code"] == "unauthorized"
    assert post_claim(gw, rig.sold, "u9", body=b"{nope")[1]["code"] == "malformed_json"
    assert [post_claim(gw, rig.sold, u)[0] for u in ("u2", "u3", "u4")] == [201, 201, 410]
    assert post_claim(gw, "no-such-campaign", "u1")[0] == 404
    for i in range(12):  # new connections: both workers learn the open campaign
        assert post_claim(gw, rig.open, f"w{i}")[0] == 201
    r = rig.redis.client()
    try:
        r.xadd(CampaignKeys.of(rig.sold).events, {"v": "1", "claim_id": "broken"})
    finally:
        r.close()
    writer_side = {"flashclaim_writer_written_total", "flashclaim_writer_dead_lettered_total",
                   "flashclaim_waiting_room_tickets"}
    eventually("writer metrics on /metrics", lambda: writer_side <= names())
    rig.redis.stop()
    try:
        n = iter(range(10**6))
        outage = {"flashclaim_redis_errors_total", "flashclaim_writer_errors_total"}

        def errors_counted() -> bool:
            post_claim(gw, rig.open, f"x{next(n)}")
            return outage <= names()
        eventually("Redis errors on /metrics", errors_counted)
    finally:
        rig.redis.start()
    gw.wait_ready()
    rig.scrape = Scrape.of(scrape(gw))
    return rig


@pytest.fixture(scope="module")
def prometheus(exercised: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"),
                      [exercised.gw.base.removeprefix("http://")])
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in promtool("check", "config", str(PROM / "prometheus.yml"))


def test_every_alert_has_unit_tests_firing_and_quiet() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    text = RULE_TESTS.read_text()
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", text))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", text))
    assert len(alerts) >= 12
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"


def test_dashboards_are_well_formed_and_their_expressions_parse(tmp_path: Path) -> None:
    assert [d.name for d in DASHBOARDS] == [
        "durability.json", "gateway-health.json", "release-overview.json"]
    uids = [json.loads(d.read_text())["uid"] for d in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    for d in DASHBOARDS:
        doc = json.loads(d.read_text())
        ids = [p["id"] for p in doc["panels"]]
        assert len(set(ids)) == len(ids), d.name
        for p in doc["panels"]:
            if p["type"] != "row":
                assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    exprs = dashboard_exprs()
    wrapped = tmp_path / "dashboards.yml"  # each expression as a recording rule
    wrapped.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": concrete(e, "c1")}
        for i, e in enumerate(exprs)]}]}))
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", str(wrapped))


def loaded_rules(prom: Prometheus) -> list[dict[str, Any]]:
    status, doc = prom.api("rules")
    assert status == 200, doc
    return [r for g in doc["data"]["groups"] for r in g["rules"]]


def test_rules_load_and_evaluate_cleanly_in_prometheus(prometheus: Prometheus) -> None:
    count = int(re.findall(r"SUCCESS: (\d+) rules found", promtool("check", "rules",
                                                                   str(RULES)))[0])
    eventually("every rule to be evaluated", lambda: len(loaded_rules(prometheus)) == count
               and all(r["health"] != "unknown" for r in loaded_rules(prometheus)))
    for rule in loaded_rules(prometheus):
        assert rule["health"] == "ok", rule
        if rule["type"] == "alerting":
            assert rule["labels"]["severity"] in {"page", "warning", "info"}, rule["name"]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule


def test_expressions_name_only_metrics_a_live_gateway_exports(
    exercised: Rig, prometheus: Prometheus
) -> None:
    live = exercised.scrape
    assert live is not None
    rules = loaded_rules(prometheus)
    recorded = {r["name"] for r in rules if r["type"] == "recording"}
    exprs = ([concrete(e, exercised.sold) for e in dashboard_exprs()]
             + [r["query"] for r in rules])
    selectors: set[str] = set()
    for expr in exprs:
        assert set(RECORDED.findall(expr)) <= recorded, expr
        found = SELECTOR.findall(expr)
        assert found or RECORDED.search(expr), f"names no metric: {expr}"
        for name, braces in found:
            assert name in live.samples or name in SYNTHETIC, f"{name} is not exported: {expr}"
            for label, op, value in MATCHER.findall(braces):
                if name not in SYNTHETIC:
                    assert label in live.samples[name] | {"job", "instance"}, (name, label)
                if label == "outcome" and op in ("=", "=~", "!="):
                    assert set(json.loads(value).split("|")) <= OUTCOMES, expr
                if label == "route" and op == "=":
                    assert json.loads(value) in live.values["route"], expr
            selectors.add(name + braces)

    def has_series(selector: str) -> bool:
        return bool(prometheus.query(f"count({selector})"))
    for sel in sorted(selectors):  # every selector picks live series in Prometheus
        eventually(f"series for {sel}", functools.partial(has_series, sel))
    for d in DASHBOARDS:
        for var in json.loads(d.read_text())["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"])
                assert m is not None, var
                assert m[2] in live.samples[m[1]], var


def test_dashboard_queries_evaluate_in_prometheus(
    exercised: Rig, prometheus: Prometheus
) -> None:
    for expr in dashboard_exprs():
        prometheus.query(concrete(expr, exercised.sold))  # asserts success


def test_metrics_endpoint_passes_promtool_lint(exercised: Rig) -> None:
    promtool("check", "metrics", stdin=scrape(exercised.gw))


async def test_prometheus_counts_exactly_what_clients_saw(
    exercised: Rig, prometheus: Prometheus, http: aiohttp.ClientSession
) -> None:
    gw, stock = exercised.gw, 200
    cid = str((await create_campaign(http, gw, stock=stock))["id"])
    seen: Counter[str] = Counter()
    gate = asyncio.Semaphore(64)

    async def one(sub: str, token: str | None = None, raw: bytes | None = None) -> None:
        async with gate:
            if raw is None:
                status, doc, _ = await claim(http, gw, cid, token or gw.token(sub))
            else:
                async with http.post(f"{gw.base}/v1/campaigns/{cid}/claims", data=raw, headers={
                        "Authorization": f"Bearer {gw.token(sub)}",
                        "Content-Type": "application/json"}) as r:
                    status, doc = r.status, await r.json(content_type=None)
        seen["granted" if status == 201 else doc["code"]] += 1

    users = [f"load-{i}" for i in range(300)]
    await asyncio.gather(*[one(f"forger-{i}", token=f"x.{i}.y") for i in range(20)],
                         *[one(f"clumsy-{i}", raw=b'{"channel": ') for i in range(10)])
    await asyncio.gather(*[one(u) for u in users])
    await asyncio.gather(*[one(u) for u in users[:50]])  # limit_reached or sold_out
    assert (seen["unauthorized"], seen["malformed_json"]) == (20, 10), seen
    assert (seen["granted"], sum(seen.values())) == (stock, 380), seen
    expr = f'sum by (outcome) (flashclaim_claims_total{{campaign="{cid}"}})'

    def counted() -> dict[str, int]:
        return {s["metric"]["outcome"]: int(float(s["value"][1]))
                for s in prometheus.query(expr)}
    deadline = time.monotonic() + DEADLINE_S
    while (got := await asyncio.to_thread(counted)) != dict(seen):
        assert time.monotonic() < deadline, f"prometheus {got} != clients {dict(seen)}"
        await asyncio.sleep(0.25)
    stock_expr = (f'max(flashclaim_stock_issued{{campaign="{cid}"}}) - '
                  f'max(flashclaim_stock_remaining{{campaign="{cid}"}})')

    def all_claimed() -> bool:  # the stock gauges follow within a view refresh (1 s)
        got = prometheus.query(stock_expr)
        return bool(got) and got[0]["value"][1] == str(stock)
    await asyncio.to_thread(eventually, "stock - remaining to equal the grants", all_claimed)
