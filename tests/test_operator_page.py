"""The operator page at /admin in Debian's headless Chromium (through selenium and Debian's
chromedriver): sign in with the admin token, watch a campaign's live numbers and claim
rate, restock, pause and resume it, and check each effect through the admin API. Saves the
screenshot the docs show (docs/img/operator-page.png)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import spec
from tests.servers import Gateway, private_stack

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "operator-page.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,420")
T = TypeVar("T")


def api(gw: Gateway, method: str, path: str, body: Any = None,
        token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {token or gw.admin_token}"}
    req = urllib.request.Request(gw.base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def claim(gw: Gateway, cid: str, user: str) -> int:
    status, _ = api(gw, "POST", f"/v1/campaigns/{cid}/claims", {}, token=gw.token(user))
    return status


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with private_stack(tmp_path_factory.mktemp("page-redis"),
                       tmp_path_factory.mktemp("page-gateway")) as (_, gw):
        yield gw


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("Debian's chromium and chromium-driver are missing: run scripts/system-deps")
    profile = tempfile.mkdtemp(prefix="flashclaim-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(b: WebDriver, what: Callable[[], T | None], timeout_s: float = 15) -> T:
    """Polls `what` until it returns something truthy; the page polls once a second."""
    result: T = WebDriverWait(b, timeout_s, poll_frequency=0.1).until(lambda _: what())
    return result


def row_text(b: WebDriver, cid: str, cls: str) -> str:
    cells = b.find_elements(By.CSS_SELECTOR, f'tr[data-id="{cid}"] td.{cls}')
    try:
        return cells[0].text if cells else ""
    except StaleElementReferenceException:  # a campaign's row is gone when it is
        return ""


def click(b: WebDriver, css: str) -> None:
    """Clicks once the button is shown: the page re-renders a row on each poll."""
    def shown() -> Any:
        try:
            el = b.find_element(By.CSS_SELECTOR, css)
            return el if el.is_displayed() and el.is_enabled() else None
        except StaleElementReferenceException:
            return None
    wait(b, shown).click()


def sign_in(b: WebDriver, gw: Gateway, token: str) -> None:
    b.get(gw.base + "/admin")
    field = b.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    b.find_element(By.ID, "signin").click()


def test_page_is_self_contained(gw: Gateway) -> None:
    with urllib.request.urlopen(gw.base + "/admin", timeout=10) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert gw.admin_token not in html


def test_wrong_token_is_refused(gw: Gateway, browser: WebDriver) -> None:
    sign_in(browser, gw, "not-the-token")
    message = wait(browser, lambda: browser.find_element(By.ID, "login-error").text)
    assert "not valid" in message
    assert browser.execute_script("return sessionStorage.getItem('flashclaim-admin-token')") \
        is None


def test_operator_watches_restocks_pauses(gw: Gateway, browser: WebDriver) -> None:
    for doc in (spec(id="tea-30-off", name="Tea: spend 100, save 30", stock=500),
                spec(id="city-vouchers", name="City consumer vouchers", stock=2000,
                     budget_cap=2000 * 3000)):
        assert api(gw, "POST", "/v1/campaigns", doc)[0] == 201
    cid = "tea-30-off"
    for i in range(40):
        assert claim(gw, cid, f"early-{i}") == 201
    for i in range(300):
        assert claim(gw, "city-vouchers", f"city-{i}") == 201
    api(gw, "POST", "/v1/campaigns/city-vouchers/pause")

    sign_in(browser, gw, gw.admin_token)
    wait(browser, lambda: row_text(browser, cid, "claimed") == "40")
    assert row_text(browser, cid, "remaining") == "460"
    assert browser.execute_script(
        "return sessionStorage.getItem('flashclaim-admin-token')") == gw.admin_token

    # claims keep arriving: the page shows them and a claim rate above zero
    stop = threading.Event()

    def rush() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            claim(gw, cid, f"rush-{i}")
            i += 1
            time.sleep(0.02)

    flow = threading.Thread(target=rush)
    flow.start()
    try:
        rate = wait(browser, lambda: float(row_text(browser, cid, "rate") or 0) > 0
                    and row_text(browser, cid, "rate"))
        assert float(rate) > 0
    finally:
        stop.set()
        flow.join()
    _, shown = api(gw, "GET", f"/v1/campaigns/{cid}")
    wait(browser, lambda: row_text(browser, cid, "claimed") == str(shown["claimed"]))

    # restock 250 from the page
    row = f'tr[data-id="{cid}"]'
    qty = browser.find_element(By.CSS_SELECTOR, f"{row} input.quantity")
    qty.clear()
    qty.send_keys("250")
    click(browser, f"{row} button.restock")
    wait(browser, lambda: api(gw, "GET", f"/v1/campaigns/{cid}")[1]["stock"] == 750)
    wait(browser, lambda: row_text(browser, cid, "stock") == "750")

    # pause, then resume
    click(browser, f"{row} button.pause")
    wait(browser, lambda: api(gw, "GET", f"/v1/campaigns/{cid}")[1]["status"] == "paused")
    assert claim(gw, cid, "during-pause") == 409
    click(browser, f"{row} button.resume")
    wait(browser, lambda: api(gw, "GET", f"/v1/campaigns/{cid}")[1]["status"] == "live")
    wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, f"{row} button.pause")
         .is_displayed())

    # the screenshot in the docs: a few live claims so the rate column shows a figure
    for i in range(30):
        claim(gw, cid, f"shot-{i}")
    wait(browser, lambda: float(row_text(browser, cid, "rate") or 0) > 0)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
