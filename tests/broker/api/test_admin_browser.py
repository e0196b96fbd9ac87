"""The admin page in a real headless Chromium (Debian chromium + chromium-driver, Selenium),
on SQLite and PostgreSQL: log in through PAM, see the credentials with the expiring one
marked, filter the audit by job id, run an explain, see attacker-chosen DNs and job ids
as text, and a non-admin refused.  Screenshots go to $BROKER_ARTEFACTS (default
tests-artefacts/ in the checkout); the test prints the directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker.api.admin_support import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    JOB_ID,
    OTHER_PASSWORD,
    OTHER_USER,
    PILOT_DN,
    XSS_DN,
    XSS_JOB,
    AdminBroker,
    start_admin_broker,
)
from tests.pkifixtures import GridPki
from tests.prerequisites import require_tools

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def artefacts(request: pytest.FixtureRequest) -> Path:
    base = Path(os.environ.get("BROKER_ARTEFACTS") or REPO / "tests-artefacts")
    out = base / "admin-browser" / request.node.callspec.id
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nadmin page screenshots: {out}")
    return out


@pytest.fixture
def browser() -> Iterator[Any]:
    require_tools("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="broker-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # The broker's host certificate comes from the test PKI, not a public CA.
    options.accept_insecure_certs = True
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def admin_broker(
    request: pytest.FixtureRequest, grid_pki: GridPki, tmp_path: Path
) -> Iterator[AdminBroker]:
    url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_database"))
    running = start_admin_broker(grid_pki, tmp_path, database_url=url)
    try:
        yield running
    finally:
        running.broker.stop()


def _login(driver: Any, base: str, username: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    d: Any = driver
    d.get(f"{base}/admin/")
    assert d.current_url.endswith("/admin/login")
    d.find_element(By.ID, "username").send_keys(username)
    d.find_element(By.ID, "password").send_keys(password)
    _click_and_wait(d, d.find_element(By.ID, "sign-in"))


def _click_and_wait(driver: Any, element: Any) -> None:
    """Click a submit button and wait until the browser has left the old page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def left(_driver: Any) -> bool:
        # Chromium answers a look at an element of the page being replaced either "stale
        # element" or "node does not belong to the document": both mean the old page is gone.
        try:
            old.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 15).until(left)


def _no_alert(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def test_admin_page_in_chromium(browser: Any, admin_broker: AdminBroker, artefacts: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d: Any = browser
    base = f"https://localhost:{admin_broker.broker.port}"

    def shot(name: str) -> None:
        assert d.save_screenshot(str(artefacts / f"{name}.png"))

    def find(by: str, value: str) -> Any:
        return d.find_element(by, value)

    # -- log in, credentials with the expiring one marked
    d.get(f"{base}/admin/login")
    shot("01-login")
    _login(d, base, ADMIN_USER, ADMIN_PASSWORD)
    assert d.current_url.endswith("/admin/")
    assert find(By.ID, "who").text == f"PAM user {ADMIN_USER}"
    rows = {
        r.get_attribute("data-username"): r
        for r in d.find_elements(By.CSS_SELECTOR, "#credentials tbody tr")
    }
    assert set(rows) == {"alice", "bob", "xss"}
    assert "expiring" in rows["alice"].get_attribute("class")
    assert "expiring soon" in rows["alice"].text
    assert "expiring soon" not in rows["bob"].text
    # the attacker's DN is text in a cell, not a script element
    assert XSS_DN in rows["xss"].text
    assert d.find_elements(By.CSS_SELECTOR, "main script, td script") == []
    _no_alert(d)
    assert find(By.ID, "activity-chart").is_displayed()
    shot("02-credentials")

    # -- the audit, filtered by job id
    d.get(f"{base}/admin/audit")
    job_cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#audit td.job-id")]
    assert XSS_JOB in job_cells  # shown as text
    assert d.find_elements(By.CSS_SELECTOR, "#audit img") == []
    _no_alert(d)
    box = find(By.ID, "filter-job-id")
    box.clear()
    box.send_keys(JOB_ID)
    Select(find(By.NAME, "decision")).select_by_value("deny")
    _click_and_wait(d, find(By.ID, "apply-filters"))
    cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#audit td.job-id")]
    assert cells == [JOB_ID]
    shot("03-audit-filtered")
    Select(find(By.NAME, "decision")).select_by_value("")
    _click_and_wait(d, find(By.ID, "apply-filters"))
    assert [c.text for c in d.find_elements(By.CSS_SELECTOR, "#audit td.job-id")] == [
        JOB_ID,
        JOB_ID,
    ]

    # -- a "why": the pilot retrieving Alice's credential
    d.get(f"{base}/admin/explain")
    find(By.ID, "explain-requester").send_keys(PILOT_DN)
    find(By.ID, "explain-owner").send_keys(admin_broker.alice_dn)
    Select(find(By.ID, "explain-action")).select_by_value("retrieve")
    _click_and_wait(d, find(By.ID, "explain-run"))
    assert find(By.ID, "explain-decision").text == "allow"
    trace = find(By.ID, "explain-trace").text
    assert "pilots retrieve for users" in trace
    shot("04-explain")
    d.get(f"{base}/admin/policy")
    assert "site-admins" in find(By.ID, "groups").text
    shot("05-policy")

    # -- sign out; a PAM user outside the admin group is refused with a sentence
    _click_and_wait(d, find(By.CSS_SELECTOR, "header form button"))
    assert d.current_url.endswith("/admin/login")
    d.get(f"{base}/admin/")
    assert d.current_url.endswith("/admin/login")
    _login(d, base, OTHER_USER, OTHER_PASSWORD)
    message = find(By.ID, "message").text
    assert f"PAM user {OTHER_USER}, who is not a site admin" in message
    assert d.find_elements(By.ID, "credentials") == []
    shot("06-refused")
