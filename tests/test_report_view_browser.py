"""The run report in Airflow's UI, in a real browser (issue 11, item 1, done-when): a real
api-server, scheduler and dag-processor on PostgreSQL run retention_nightly against the Mailchimp
stand-in (a dry run, a run the plan guard halts, an erasing run); headless Chromium (Debian's, via
scripts/browser.sh) logs in through Airflow's login page, opens the report view from Airflow's
menu and directly, and finds each run's counts, the plan guard's numbers and the chart. The
scheduler wrote each run's note. Screenshots for a human go to RETENTION_SCREENSHOTS
(default /tmp/retention-screenshots), printed at the end.

Without a login the view refuses every page: 401 without a token, 403 with a bad one.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from test_alerts import mailchimp  # noqa: F401 - the Mailchimp stand-in with 300 members
from test_backfill import fresh_database

from airflow_services import ROOT, AirflowServices

PASSWORD = "test-only-admin-" + uuid.uuid4().hex[:8]
SHOTS = Path(os.environ.get("RETENTION_SCREENSHOTS", "/tmp/retention-screenshots"))


def browser():
    """Headless Chromium through its WebDriver, both from Debian (installed when missing)."""
    out = subprocess.run([str(ROOT / "scripts" / "browser.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000", "--disable-gpu",
                "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shot(driver, name: str) -> Path:
    """A screenshot of the whole page, beyond the window (Chromium's DevTools protocol)."""
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(data))
    return path


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def token(api: str) -> str:
    r = requests.post(f"{api}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10)
    r.raise_for_status()
    return r.json()["access_token"]


def run_nightly(af: AirflowServices, headers: dict, run_id: str, conf: dict) -> dict:
    af.airflow("dags", "trigger", "retention_nightly", "--run-id", run_id, "--conf", json.dumps(conf))

    def finished():
        try:
            r = requests.get(f"{af.api}/api/v2/dags/retention_nightly/dagRuns/{run_id}", headers=headers, timeout=30)
        except requests.Timeout:  # a busy api-server: ask again
            return None
        return r.json() if r.ok and r.json()["state"] in ("success", "failed") else None

    return wait_for(finished, 480, f"run {run_id}")


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1800)
def test_the_report_view_shows_real_runs_in_a_real_browser(tmp_path, postgres_url_for, retention_home, mailchimp):  # noqa: F811
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    meta = fresh_database(postgres_url_for("retention_airflow_reports"))
    af = AirflowServices(tmp_path / "airflow", meta, {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        # Only the runs this test triggers: unpausing must not start the schedule's own run.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    })
    driver = None
    try:
        af.start()
        pools = subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, capture_output=True, text=True)
        assert pools.returncode == 0, pools.stderr
        af.wait_for_dag("retention_nightly")
        af.airflow("dags", "unpause", "retention_nightly")
        view = f"{af.api}/retention/reports/"

        # No login, a bad token: refused, and nothing of a report in the answer.
        assert requests.get(view, timeout=10).status_code == 401
        assert requests.get(view, headers={"Authorization": "Bearer not-a-token"}, timeout=10).status_code == 403
        headers = {"Authorization": f"Bearer {token(af.api)}"}
        assert requests.get(view, headers=headers, timeout=10).status_code == 200

        runs = {
            "dry": run_nightly(af, headers, "manual__dry", {"systems": ["newsletter"], "dry_run": True}),
            "guard": run_nightly(af, headers, "manual__guard", {"systems": ["newsletter"], "max_plan_share": 0.01}),
            "real": run_nightly(af, headers, "manual__real", {"systems": ["newsletter"]}),
        }
        assert {k: r["state"] for k, r in runs.items()} == {"dry": "success", "guard": "failed", "real": "success"}, af.tail()
        # The notes the scheduler wrote, as Airflow's REST API (and its grid) shows them.
        due = int(runs["dry"]["note"].rsplit(" ", 1)[1])
        assert runs["dry"]["note"] == f"DRY RUN, nothing erased: would erase {due}", runs["dry"]
        assert runs["guard"]["note"] == f"erased 0, halted {due}, newsletter: plan guard {due} planned, 3 allowed", runs["guard"]
        assert runs["real"]["note"] == f"erased {due}", runs["real"]

        driver = browser()
        # Airflow's own login page, then back to the report view.
        driver.get(f"{af.api}/retention/reports/")
        assert "Log in" in driver.page_source  # 401: the view's page with the login link
        driver.get(f"{af.api}/auth/login?next={view}")
        from selenium.webdriver.common.by import By

        wait_for(lambda: driver.find_elements(By.NAME, "username"), 60, "the login form")
        shot(driver, "01-airflow-login")
        driver.find_element(By.NAME, "username").send_keys("admin")
        driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: any(c["name"] == "_token" for c in driver.get_cookies()), 60, "the login cookie")

        # The view inside Airflow's UI, from its menu entry (an iframe at /plugin/<route>).
        driver.get(f"{af.api}/plugin/retention-reports")
        frame = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "iframe[title='Retention reports']"), 60, "the plugin's iframe")
        time.sleep(2)
        shot(driver, "02-airflow-menu-retention-reports")
        driver.switch_to.frame(frame[0])
        wait_for(lambda: "manual__real" in driver.page_source, 30, "the runs inside Airflow's UI")
        driver.switch_to.default_content()

        # The list of runs, with the chart.
        driver.get(view)
        page = driver.page_source
        for text in ("manual__dry", "manual__guard", "manual__real", runs["dry"]["note"], runs["guard"]["note"], runs["real"]["note"]):
            assert text in page, text
        chart = driver.find_element(By.CSS_SELECTOR, "svg.history-chart")
        assert chart.is_displayed() and chart.size["height"] > 200
        bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        assert len(bars) == 2, "the erasing run's two rules"
        assert len(chart.find_elements(By.CSS_SELECTOR, "circle")) == 3, "the due backlog of each run"
        shot(driver, "03-report-list")

        # One run's page: its counts per rule, its validation.
        driver.find_element(By.LINK_TEXT, "manual__real").click()
        wait_for(lambda: "Counts per system and rule" in driver.page_source, 30, "the run's page")
        cells = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "table.counts td")]
        assert "newsletter-pending" in cells and "newsletter-unsubscribed" in cells, cells
        total = driver.find_elements(By.CSS_SELECTOR, "table.counts tbody tr:last-child th")
        assert total[1].text == str(due), [t.text for t in total]
        assert "policy version" in driver.page_source and "erasing" in driver.page_source
        shot(driver, "04-report-erasing-run")

        driver.get(f"{view}runs/retention_nightly/manual__guard")
        page = driver.page_source
        assert f"{due} planned, 3 allowed of 300 extracted" in page and "failed" in page
        assert "halted" in page and "validation rejected the plan" in page
        shot(driver, "05-report-guard-halted")
        driver.get(f"{view}runs/retention_nightly/manual__dry")
        assert "DRY RUN" in driver.page_source and "would erase" in driver.page_source
        shot(driver, "06-report-dry-run")

        # Airflow's grid of the DAG, where the runs' notes are.
        driver.get(f"{af.api}/dags/retention_nightly/runs/manual__real")
        time.sleep(4)
        shot(driver, "07-airflow-run-with-note")
    except BaseException:
        print(af.tail())  # what the services said, for the failure's cause
        raise
    finally:
        if driver is not None:
            driver.quit()
        af.stop()
    print(f"\nscreenshots for a human: {SHOTS}")
    assert sorted(p.name for p in SHOTS.glob("*.png"))[:1] == ["01-airflow-login.png"]
