"""The web page (`GET /ui/`) in headless Chromium, on the live stack.

Debian's `chromium` and `chromium-driver` (installed by `make setup`) driven by Selenium with
the system's chromedriver: nothing is downloaded at test time. The page is served by an API
process of this tree started here (on a free port, with the stack's settings), not the stack's
API on 8080, which runs whatever code it was started with; the batch runs for real on the
stack's consumers, Prefect and worker.

With DHUB_UI_SCREENSHOTS=<dir> the run also saves the two screenshots the README shows
(`ui-batches.png`, `ui-batch.png`) into that directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from core.settings import ROOT, Settings
from pipelines.sales import demo_spec
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
SCREENSHOTS = os.environ.get("DHUB_UI_SCREENSHOTS")


class Api:
    """`python -m service` of this tree on one port, which the test can kill and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "DHUB_API_PORT": str(self.port), "DHUB_API_HOST": "127.0.0.1"}
        self.proc = proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            assert proc.poll() is None, f"the API process exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"the API did not come up on port {self.port}"
            time.sleep(0.05)

    def stop(self, grace_s: float = 3) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            # A push stream whose client has gone holds the API's shutdown until its next
            # keep-alive write (15 s); this process keeps no state of its own, so kill it then.
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def api(live: Settings) -> Iterator[Api]:
    server = Api(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base_url(api: Api) -> str:
    return api.url


@pytest.fixture(scope="module")
def token(live: Settings) -> str:
    return live.static_tokens()[0]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("chromium and chromedriver are needed: `make setup` installs them as root "
                    "(or apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # given, with the driver: Selenium Manager stays idle
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: WebDriver, check: Callable[[WebDriver], T | None], timeout: float = 20,
          what: str = "") -> T:
    """Polls `check` until it returns something truthy (no fixed sleeps). The page redraws
    parts of itself, so an element found a moment ago may be gone: that is one more poll."""
    result = WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(
        check, f"not within {timeout}s: {what}")
    assert result  # until() returns only a truthy value
    return result


def register(base_url: str, token: str, **config: Any) -> str:
    pipeline_id = f"ui-{uuid.uuid4().hex[:8]}"
    spec = demo_spec(name=pipeline_id, **config).model_dump(mode="json")
    answer = httpx.put(f"{base_url}/api/v1/pipelines/{pipeline_id}", json=spec,
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 201, answer.text
    return pipeline_id


def get_batch(base_url: str, token: str, pipeline_id: str, batch_id: str) -> httpx.Response:
    return httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}",
                     headers={"Authorization": f"Bearer {token}"}, timeout=10)


def offsets(driver: WebDriver) -> dict[str, int]:
    """Every partition bar's offset on the batch page, as `step/partition -> records`."""
    rows: dict[str, int] = driver.execute_script(
        "const out = {};"
        "for (const row of document.querySelectorAll('#steps .partition')) {"
        "  out[row.closest('.step').dataset.step + '/' + row.dataset.partition] ="
        "    Number(row.dataset.offset); }"
        "return out;")
    return rows


def listed(driver: WebDriver) -> list[str]:
    ids: list[str] = driver.execute_script(
        "return [...document.querySelectorAll('#batches tr[data-batch-id]')]"
        ".map(row => row.dataset.batchId)")
    return ids


def records_listed(driver: WebDriver, batch_id: str) -> int:
    """The records the list's Progress column shows for the batch ("extract: 1,234 records")."""
    text = driver.find_element(By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] td.num").text
    match = re.search(r"([\d,]+) records?", text)
    return int(match.group(1).replace(",", "")) if match else 0


def run_and_stop(base_url: str, token: str, pipeline_id: str) -> str:
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{base_url}/api/v1/batches/{pipeline_id}", headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    batch_id = str(answer.json()["item"])
    stop = httpx.put(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}/stop", headers=auth,
                     timeout=10)
    assert stop.status_code == 200, stop.text
    return batch_id


def more_than(driver: WebDriver, records: int) -> dict[str, int] | None:
    """The offsets once they add up to more than `records`, else None."""
    now = offsets(driver)
    return now if sum(now.values()) > records else None


def screenshot(driver: WebDriver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def sign_out(driver: WebDriver, base_url: str) -> None:
    driver.get(f"{base_url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()


def test_the_page_and_its_files_are_served_safely(base_url: str) -> None:
    page = httpx.get(f"{base_url}/ui/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-cache"
    again = httpx.get(f"{base_url}/ui/", headers={"If-None-Match": page.headers["ETag"]}, timeout=10)
    assert again.status_code == 304 and not again.content
    script = httpx.get(f"{base_url}/ui/app.js", timeout=10)
    assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert 'from "./session.js"' in script.text  # the entry module, importing the others
    # The stream reader is a module of its own now: every one the page imports is checked in
    # tests/test_ui_modules.py.
    assert "text/event-stream" in httpx.get(f"{base_url}/ui/stream.js", timeout=10).text
    assert httpx.get(f"{base_url}/ui", timeout=10).text == page.text
    # Only the page's own files: nothing else of the package or the disk.
    for path in ("/ui/ui.py", "/ui/..%2Fui.py", "/ui/%2E%2E/ui.py", "/ui/../ui.py",
                 "/ui/..%2F..%2Fpyproject.toml", "/ui/nope.js", "/ui/sub/app.js"):
        answer = httpx.get(base_url + path, timeout=10)
        assert answer.status_code == 404, path


def test_a_wrong_token_is_refused_and_a_fragment_token_is_taken_then_wiped(
        browser: WebDriver, base_url: str, token: str) -> None:
    sign_out(browser, base_url)
    field = until(browser, lambda d: d.find_element(By.ID, "token"), what="the login form")
    field.send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    error = until(browser, lambda d: d.find_element(By.ID, "login-error").text, what="refusal")
    assert "401" in error
    assert browser.execute_script("return sessionStorage.getItem('dhub.token')") is None

    browser.get(f"{base_url}/ui/#token={token}")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pipelines tr[data-pipeline-id]"),
          what="the pipelines after a fragment token")
    assert token not in browser.current_url
    assert browser.execute_script("return location.hash") == ""
    assert browser.execute_script("return sessionStorage.getItem('dhub.token')") == token


def test_log_in_run_a_batch_watch_its_bars_move_stop_and_delete_it(
        browser: WebDriver, api: Api, base_url: str, token: str) -> None:
    # ~30 s a step (30,000 records at 1,000/s): the bars are seen moving and the batch is
    # stopped well before its first step ends.
    pipeline_id = register(base_url, token, rows=30_000, partitions=3, throttle=1_000)
    sign_out(browser, base_url)
    field = until(browser, lambda d: d.find_element(By.ID, "token"), what="the login form")
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    link = until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#pipelines tr[data-pipeline-id='{pipeline_id}'] a"), what="pipeline")
    assert browser.execute_script("return sessionStorage.getItem('dhub.token')") == token
    link.click()

    # Run: the new batch appears in the list by itself (the pipeline's push stream).
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="list stream")
    if SCREENSHOTS:  # the list's picture shows a stopped batch beside the running one
        other = run_and_stop(base_url, token, pipeline_id)
        until(browser, lambda d: d.find_element(
            By.CSS_SELECTOR, f"#batches tr[data-batch-id='{other}'][data-state='stop']"),
              timeout=40, what="the other batch stopped")
    before = set(listed(browser))
    browser.find_element(By.ID, "run").click()
    batch_id = until(browser, lambda d: next((b for b in listed(d) if b not in before), None),
                     what="the new batch in the list")
    until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}']").get_attribute("data-state")
        == "running", timeout=40, what="the list showing the batch running")
    until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] .steps-mini span.running"),
          what="the list showing a step running")
    # (The README's picture waits for a few hundred records.)
    until(browser, lambda d: records_listed(d, batch_id) > (300 if SCREENSHOTS else 0),
          what="the list's records growing")
    screenshot(browser, "ui-batches.png")

    # The batch's page: per-partition bars whose offsets grow while we watch.
    browser.find_element(By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}'] a").click()
    first = until(browser, lambda d: more_than(d, 0), what="offsets on the batch page")
    later = until(browser, lambda d: more_than(d, sum(first.values())), what="the offsets growing")
    assert all(later.get(k, 0) >= v for k, v in first.items()), (first, later)
    assert browser.find_elements(By.CSS_SELECTOR, "#steps .step[data-state='running'] .bar")

    # The API goes away under the page and comes back: the page says so, reconnects on its
    # own (resuming with Last-Event-ID) and the bars keep moving.
    api.stop(grace_s=0)
    until(browser, lambda d: d.find_element(By.ID, "live").text == "reconnecting…",
          what="the page noticing the dropped stream")
    frozen = sum(offsets(browser).values())  # nothing can move the bars while it is down
    api.start()
    until(browser, lambda d: d.find_element(By.ID, "live").text == "live", what="reconnected")
    until(browser, lambda d: more_than(d, frozen), what="offsets after reconnecting")
    if SCREENSHOTS:
        until(browser, lambda d: more_than(d, 3_000), what="a few thousand records")
    screenshot(browser, "ui-batch.png")

    # Stop: the page reaches `stop` on its own, the stream ends, the button is disabled.
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_enabled()
    stop.click()
    until(browser, lambda d: d.find_element(By.ID, "batch").get_attribute("data-state") == "stop",
          timeout=40, what="the batch page showing stop")
    until(browser, lambda d: d.find_element(By.ID, "live").text == "final", what="stream ended")
    assert not browser.find_element(By.ID, "stop").is_enabled()
    stopped = get_batch(base_url, token, pipeline_id, batch_id).json()
    assert stopped["state"]["state"] == "stop"
    assert stopped["outcome"] != "completed", stopped  # stopped by the button, not finished
    assert sum(offsets(browser).values()) < 3 * 30_000

    # Delete asks first: dismissed, nothing happens; accepted, the batch is gone.
    browser.find_element(By.ID, "delete").click()
    until(browser, lambda d: _alert(d), what="the confirmation").dismiss()
    assert get_batch(base_url, token, pipeline_id, batch_id).status_code == 200
    browser.find_element(By.ID, "delete").click()
    until(browser, lambda d: _alert(d), what="the confirmation").accept()
    until(browser, lambda d: d.find_elements(By.ID, "batches"), what="back on the list")
    until(browser, lambda d: not d.find_elements(
        By.CSS_SELECTOR, f"#batches tr[data-batch-id='{batch_id}']"), what="the row gone")
    assert get_batch(base_url, token, pipeline_id, batch_id).status_code == 404


def _alert(driver: WebDriver) -> Any:
    try:
        alert = driver.switch_to.alert
        _ = alert.text
        return alert
    except NoAlertPresentException:
        return False
