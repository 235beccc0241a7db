"""Settings: one frozen object read once from the FLASHCLAIM_* environment (and the optional
config file, which may add values but never override the environment), then passed down."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

DEFAULT_LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
_INSTALLED_LUA_DIR = Path(__file__).resolve().parent / "_lua"


def default_lua_dir() -> Path:
    """`lua/` beside the package in a checkout; `gateway/_lua` in an installed wheel."""
    return DEFAULT_LUA_DIR if DEFAULT_LUA_DIR.is_dir() else _INSTALLED_LUA_DIR


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str | None = None
    store_url: str = "sqlite:///./var/claims.db"
    admin_token: str | None = None  # a write-scope admin token named `admin`
    admin_tokens: str = ""  # more admin tokens: `name:scope:token,...`, scope read | write
    admin_tokens_file: str = ""  # the same, one `name:scope:token` a line
    admin_listen: str = ""  # `host:port` or `unix:/path`: admin API there only; empty: main port
    identity_secret: str | None = None
    identity_public_keys: str | None = None  # PEM or JWKS file, re-read when it changes
    identity_issuer: str = ""  # when set, tokens must carry this `iss`
    identity_audience: str = ""  # when set, tokens' `aud` must name it
    identity_leeway_s: float = 5.0  # clock skew allowed on `exp` and `nbf`
    signing_secret: str | None = None
    url: str = "http://127.0.0.1:8080"
    var_dir: str = "./var"
    lua_dir: str = ""
    claim_body_max: int = 16 * 1024
    header_max: int = 8190  # bytes in the request line and in any one header field
    header_timeout_s: float = 10.0  # a request head must be complete this soon; 0: off
    body_timeout_s: float = 10.0  # and a body must arrive this soon after its head; 0: off
    connections_per_ip: int = 0  # open connections per address per worker; 0: no cap
    idempotency_ttl_s: int = 24 * 3600
    redis_max_connections: int = 64
    redis_timeout_s: float = 1.0
    log_level: str = "INFO"
    drain_delay_s: float = 0.0  # on SIGTERM, /readyz answers 503 this long before listening stops
    shutdown_timeout_s: float = 10.0  # then in-flight requests get this long to finish
    metrics_dir: str = ""  # prometheus multiprocess files; default <var_dir>/metrics
    user_rate_per_s: float = 5.0  # claim requests per user per worker; 0 turns it off
    user_burst: int = 10
    ip_rate_per_s: float = 0.0  # off by default: behind NAT or a proxy many users share one
    ip_burst: int = 200
    trusted_proxies: str = ""  # CIDRs whose X-Forwarded-For names the caller; empty: none
    redis_inflight: int = 512  # claims per worker waiting on Redis at once
    redis_queue: int = 2048  # claims queued for a slot; beyond: 503
    redis_queue_wait_s: float = 0.5  # the longest a claim queues (shorter under overload)
    backlog_max: int = 200_000  # unwritten grants per campaign before claims get 503
    code_misses_per_min: int = 5  # wrong redemption codes per user per minute, then 429
    writer_batch: int = 1000
    writer_max_deliveries: int = 5
    writer_claim_idle_ms: int = 30_000  # reclaim a dead writer's entries after this long
    writer_name: str = ""  # consumer name; default <host>-<pid>
    writer_metrics_port: int = 0  # a standalone writer serves /metrics here when set
    writer_metrics_host: str = "127.0.0.1"  # 0.0.0.0 where Prometheus scrapes another host
    fault: str = ""  # test-only fault points: writer_crash_after_commit, skip_device_limit
    stream_retention_s: int = 7 * 24 * 3600  # keep acked events this long for subscribers

    @property
    def signing_key(self) -> bytes:
        if not self.signing_secret:
            raise RuntimeError("FLASHCLAIM_SIGNING_SECRET is not set")
        return self.signing_secret.encode()

    @property
    def scripts_dir(self) -> Path:
        return Path(self.lua_dir) if self.lua_dir else default_lua_dir()


_FIELDS = {f"FLASHCLAIM_{name.upper()}": name for name in Settings.__struct_fields__}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Environment first; then `FLASHCLAIM_CONFIG` (default `<var_dir>/flashclaim.json`, which
    `flashclaim run` writes) fills in what the environment leaves unset."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {name: env[var] for var, name in _FIELDS.items() if var in env}
    var_dir = values.get("var_dir", "./var")
    config = Path(env.get("FLASHCLAIM_CONFIG", str(Path(var_dir) / "flashclaim.json")))
    if config.is_file():
        for var, value in json.loads(config.read_text()).items():
            name = _FIELDS.get(var)
            if name is not None and name not in values:
                values[name] = str(value)
    return msgspec.convert(values, Settings, strict=False)


def config_names() -> list[str]:
    return sorted(_FIELDS)
