"""`flashclaim run --demo` from an empty directory: private redis-server, generated secrets,
and the README walkthrough through the CLI, exactly as a newcomer types it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port

BIN = Path(sys.executable).parent


def _curl(url: str, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Path, str, dict[str, str]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")}
    env["FLASHCLAIM_URL"] = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "flashclaim"), "run", "--demo", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = _curl(base + "/v1/campaigns/demo/claims/mine")
                if status == 401:  # the demo campaign exists; a token is needed
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "flashclaim run did not come up"
            time.sleep(0.1)
        yield tmp_path, base, env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli(cwd: Path, env: dict[str, str], *args: str) -> str:
    out = subprocess.run([str(BIN / "flashclaim"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_run_and_walkthrough(embedded: tuple[Path, str, dict[str, str]]) -> None:
    cwd, base, env = embedded
    assert (cwd / "var" / "appendonlydir").is_dir(), "the private redis-server keeps an AOF"
    assert (cwd / "var" / "flashclaim.json").is_file()

    _cli(cwd, env, "campaign", "create", "--id", "tea", "--name", "Tea", "--stock", "2")
    a, b, c = (_cli(cwd, env, "token", "--sub", u) for u in ("alice", "bob", "carol"))
    claims = base + "/v1/campaigns/tea/claims"
    status, grant = _curl(claims, a, "POST")
    assert status == 201 and grant["user_id"] == "alice"
    status, body = _curl(claims, a, "POST")
    assert (status, body["code"], body["claims"]) == (409, "limit_reached", [grant["claim_id"]])
    assert _curl(claims, b, "POST")[0] == 201
    status, body = _curl(claims, c, "POST")
    assert (status, body["code"]) == (410, "sold_out")
    assert _curl(claims + "/mine", a)[1] == {"claims": [grant]}

    shown = json.loads(_cli(cwd, env, "campaign", "show", "tea"))
    assert (shown["stock"], shown["remaining"], shown["claimed"]) == (2, 0, 2)
    _cli(cwd, env, "campaign", "restock", "tea", "1")
    assert _curl(claims, c, "POST")[0] == 201
    assert json.loads(_cli(cwd, env, "campaign", "end", "tea"))["status"] == "ended"
    assert _curl(claims, c, "POST")[1]["code"] == "ended"

    # the writer runs alongside: the store catches up and reconcile agrees
    deadline = time.monotonic() + 20
    while (out := _cli(cwd, env, "reconcile", "--campaign", "tea")).splitlines()[-1].split()[5] \
            != "3":  # the `stored` column
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    assert out.splitlines()[-1].endswith("ok")
    events = _cli(cwd, env, "tail", "--campaign", "tea", "--from-start", "--count", "3")
    assert [json.loads(line)["user_id"] for line in events.splitlines()] == [
        "alice", "bob", "carol"]

    demo = base + "/v1/campaigns/demo/claims"
    assert _curl(demo, a, "POST")[0] == 201
