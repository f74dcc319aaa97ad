"""The dashboard pages in a real browser: headless Chromium driven by Selenium.

A uvicorn server runs the dashboard in a background thread over a registry filled like
test_dashboard.py's (the same small real simulation plus a synthetic running DP/HE run). The test
signs in, checks that Plotly drew every panel of a finished run (non-empty SVG in the chart
divs), watches a running run's page update itself, and promotes and rolls back versions with the
page's buttons. Screenshots go to ``test-artifacts/`` (override with FEDCL_TEST_ARTIFACTS).

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/dashboard-deps.sh``) and
the ``selenium`` package; skipped, saying which is missing, otherwise. Selenium is pointed at
/usr/bin/chromedriver, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_dashboard import DEMO_RUN, DP_RUN, Dash, build_demo_snapshot, populated_dashboard

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 20

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        f"needs {CHROMIUM} and {CHROMEDRIVER}: run .ci/dashboard-deps.sh "
        "(apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def _artifacts_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / "test-artifacts"
    path = Path(os.environ.get("FEDCL_TEST_ARTIFACTS", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _uvicorn(app: Any, name: str) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Dash]]:
    """(base URL, dashboard) of a live uvicorn server in a background thread."""

    base = tmp_path_factory.mktemp("dashboard-browser")
    snapshot = build_demo_snapshot(tmp_path_factory.mktemp("dashboard-demo"))
    url = f"sqlite:///{base / 'registry.db'}"
    with populated_dashboard(url, base / "artifacts", snapshot) as dash:
        dash.app.state.poll_seconds = 1.0  # the running run's page polls every second
        with _uvicorn(dash.app, "dashboard-uvicorn") as base_url:
            yield base_url, dash


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    profile = tempfile.mkdtemp(prefix="fedcl-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: Any, condition: Any, what: str) -> Any:
    waiter = WebDriverWait(
        driver,
        WAIT_S,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    return waiter.until(condition, message=what)


def _svg_children(driver: Any, chart_id: str) -> int:
    """Drawn SVG elements inside a Plotly chart div (0 when Plotly drew nothing)."""
    return int(
        driver.execute_script(
            "const svg = document.querySelector('#' + arguments[0] + ' svg.main-svg');"
            "return svg ? svg.querySelectorAll('path, rect, image, text').length : 0;",
            chart_id,
        )
    )


def _browser_errors(driver: Any) -> list[str]:
    try:
        logs = driver.get_log("browser")
    except Exception:
        return []
    return [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]


def _screenshot(driver: Any, name: str, height: int) -> Path:
    driver.set_window_size(1400, height)
    path = _artifacts_dir() / name
    driver.save_screenshot(str(path))
    return path


def _sign_in(driver: Any, base: str, token: str) -> None:
    driver.get(f"{base}/login")
    driver.delete_all_cookies()
    driver.get(f"{base}/runs")
    _wait(driver, lambda d: "/login?next=/runs" in d.current_url, "redirect to the login page")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    _wait(driver, lambda d: urlsplit(d.current_url).path == "/runs", "on /runs after signing in")


def test_run_page_draws_every_panel_and_updates_live(
    served: tuple[str, Dash], browser: Any
) -> None:
    base, dash = served
    _sign_in(browser, base, dash.tokens["admin"])
    assert "alice (admin)" in browser.find_element(By.ID, "signed-in-as").text

    browser.find_element(By.LINK_TEXT, DEMO_RUN).click()
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.rendered"), "draw")
    for chart in ("chart-accuracy", "chart-matrix", "chart-rounds", "chart-bytes"):
        _wait(browser, lambda d, c=chart: _svg_children(d, c) > 10, f"{chart} drawn")
    traces = browser.find_elements(By.CSS_SELECTOR, "#chart-accuracy .scatterlayer .trace")
    assert len(traces) == 2  # one line per task
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-matrix .heatmaplayer image")
    # The plaintext demo run has no privacy rows: its panel stays hidden.
    assert not browser.find_element(By.ID, "panel-privacy").is_displayed()
    assert _browser_errors(browser) == []
    _screenshot(browser, "dashboard-run.png", 1050)

    # A running run: the ε panel appears, and the page follows the registry without a reload.
    browser.get(f"{base}/runs/{DP_RUN}")
    _wait(browser, lambda d: _svg_children(d, "chart-privacy") > 10, "ε chart drawn")
    assert browser.find_element(By.ID, "live").is_displayed()
    lines = browser.find_element(By.ID, "incidents").text.splitlines()  # grouped by cause
    assert any(line.startswith("refused (") and "site-2" in line for line in lines), lines
    assert any(line.startswith("failed (") and "site-1" in line for line in lines), lines
    _screenshot(browser, "dashboard-running-run.png", 1500)
    rendered = int(browser.execute_script("return document.body.dataset.rendered"))
    dash.registry.set_run_status(DP_RUN, "completed")
    # Its refused and failed site-rounds make it no plain success: the badge says so.
    _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#run-status .badge").text.startswith(
            "degraded · "
        ),
        "status badge updated by polling",
    )
    badge = browser.find_element(By.CSS_SELECTOR, "#run-status .badge")
    assert badge.text.endswith("site-rounds lost") and "completed-lost" in badge.get_attribute(
        "class"
    )
    assert int(browser.execute_script("return document.body.dataset.rendered")) > rendered
    assert not browser.find_element(By.ID, "live").is_displayed()


def test_run_page_draws_the_drift_map_and_its_alerts(
    served: tuple[str, Dash], browser: Any
) -> None:
    """A run whose task drift opened (issue 16): the site x round map and the alert list."""
    base, dash = served
    reg = dash.registry
    reg.create_run("drift-browser", name="d", scenario="digits-drift", config={}, tasks=["a", "b"])
    for server_round, kind in ((1, "train"), (2, "monitor")):
        rid = reg.begin_round(
            "drift-browser", task_index=0, round_in_task=server_round - 1,
            server_round=server_round, kind=kind,
        )  # fmt: skip
        for site in ("site-0", "site-1"):
            moved = server_round == 2 and site == "site-1"
            reg.record_drift("drift-browser", rid, site, score=1.9 if moved else 0.4, alert=moved)
        reg.complete_round(rid, seconds=1.0, bytes_up=10, bytes_down=10)
    reg.record_task_start("drift-browser", 1, server_round=4, trigger="drift", reason="site-1")
    reg.set_run_status("drift-browser", "completed")
    _sign_in(browser, base, dash.tokens["admin"])
    browser.get(f"{base}/runs/drift-browser")
    _wait(browser, lambda d: _svg_children(d, "chart-drift") > 5, "drift map drawn")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-drift .heatmaplayer image")
    alerts = browser.find_element(By.ID, "drift-alerts").text
    assert "round 2: site-1 drift (score 1.90)" in alerts
    assert "task 1 began at round 4" in alerts
    assert _browser_errors(browser) == []
    _screenshot(browser, "dashboard-drift.png", 1200)


def _click_version_action(driver: Any, version_id: int, action: str) -> None:
    row = driver.find_element(By.ID, f"version-{version_id}")
    row.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()


def _status_of(driver: Any, version_id: int) -> str:
    """A version row's status; read in one script call, so a page reload in between cannot leave
    a stale element reference."""
    return str(
        driver.execute_script(
            "const row = document.getElementById(arguments[0]);"
            "return row ? row.dataset.status : '';",
            f"version-{version_id}",
        )
    )


def test_versions_page_promotes_and_rolls_back(served: tuple[str, Dash], browser: Any) -> None:
    base, dash = served
    _sign_in(browser, base, dash.tokens["admin"])
    v1, v2, *_ = [v.id for v in dash.registry.list_model_versions(DEMO_RUN)]
    browser.get(f"{base}/versions?run={DEMO_RUN}")

    for version_id in (v1, v2):
        _click_version_action(browser, version_id, "promote")
        _wait(browser, lambda d, v=version_id: _status_of(d, v) == "production", "promoted")
    assert _status_of(browser, v1) == "archived"

    _click_version_action(browser, v2, "rollback")
    _wait(browser, lambda d: _status_of(d, v2) == "rolled_back", "rolled back")
    assert _status_of(browser, v1) == "production"
    notice = browser.find_element(By.ID, "action-result")
    assert f"restored version {v1}" in notice.text
    statuses = {v.id: v.status for v in dash.registry.list_model_versions(DEMO_RUN)}
    assert (statuses[v1], statuses[v2]) == ("production", "rolled_back")
    actors = {e.actor for e in dash.registry.list_audit(run_id=DEMO_RUN) if "version" in e.kind}
    assert actors == {"alice"}
    assert _browser_errors(browser) == []
    _screenshot(browser, "dashboard-versions.png", 900)


@contextmanager
def _attacker_site(page: bytes) -> Iterator[str]:
    """Another origin (``localhost`` on its own port, the dashboard is ``127.0.0.1``): serves one
    page, like the attacker's site of issue 13."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, name="attacker-site", daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_login_and_logout_csrf_fail_and_a_site_sees_no_other_tokens(
    served: tuple[str, Dash], browser: Any
) -> None:
    """Issue 13: a page elsewhere auto-posts /login with the attacker's token (and /logout);
    Chromium sends its Origin and Sec-Fetch-Site, the dashboard refuses both, and the admin
    stays signed in as themself. Then a site token's audit page names no other token."""
    base, dash = served
    _sign_in(browser, base, dash.tokens["admin"])
    for action, fields in (
        ("login", f'<input name="token" value="{dash.tokens["site-1"]}">'),
        ("logout", ""),
    ):
        form = (
            f'<html><body onload="document.forms[0].submit()"><form method="post" '
            f'action="{base}/{action}">{fields}<input name="next" value="/runs"></form>'
            "</body></html>"
        )
        with _attacker_site(form.encode()) as attacker:
            browser.get(f"{attacker}/")
            target = f"{base}/{action}"
            _wait(browser, lambda d, t=target: d.current_url.startswith(t), "form posted")
            body = browser.find_element(By.TAG_NAME, "body").text
            assert "cross-site request refused" in body and "Sec-Fetch-Site: cross-site" in body
        browser.get(f"{base}/audit")
        assert browser.find_element(By.ID, "signed-in-as").text == "alice (admin)", action

    dash.registry.create_token("site two admin", "site:site-2")
    _sign_in(browser, base, dash.tokens["site-1"])
    browser.get(f"{base}/audit")
    assert browser.find_element(By.ID, "signed-in-as").text == "site one admin (site:site-1)"
    table = browser.find_element(By.ID, "audit-table").text
    assert "site one admin" in table  # its own token and sign-in
    # No other token's name or role: not site-2's, not the viewer's, not the admin's token
    # event (the admin's name does show as the actor of federation events such as a promotion).
    for other in ("site two admin", "site:site-2", "victor", "role 'admin'"):
        assert other not in table
    token_lines = [line for line in table.splitlines() if " token." in line or " session." in line]
    assert token_lines and all("site one admin" in line for line in token_lines)
    assert not browser.find_elements(By.LINK_TEXT, "Tokens")
    # Chromium logs the two refused posts; nothing else went wrong.
    refused = [f"{base}/{a} - Failed to load resource: the server responded with a status of 403"
               for a in ("login", "logout")]  # fmt: skip
    assert [e for e in _browser_errors(browser) if not e.startswith(tuple(refused))] == []


# ----------------------------------------------------------------------------------------------
# The version lifecycle over a real run (tests/lifecycle_helpers.py: CKKS + EWC + the unattended
# canary, round 4 sabotaged), served by a second uvicorn in the same browser session.


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    """(base URL, registry, lifecycle run) of a dashboard over the real lifecycle run."""
    from lifecycle_helpers import lifecycle_run

    from fedcl.server.dashboard import create_app

    run = lifecycle_run(tmp_path_factory.mktemp("lifecycle-browser"))
    app = create_app(run.url, artifacts_dir=run.artifacts)
    registry = app.state.registry
    registry.create_token("carol", "admin")
    try:
        with _uvicorn(app, "lifecycle-uvicorn") as base_url:
            yield base_url, registry, run
    finally:
        registry.close()


def _fetch(driver: Any, url: str, method: str = "GET") -> dict[str, Any]:
    """fetch() from the page (its cookie and the dashboard's header): status, body, headers."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: arguments[1], credentials: 'same-origin',"
        "  headers: {'X-Fedcl-Dashboard': '1', Accept: 'application/json'}})"
        ".then(r => r.arrayBuffer().then(b => done({status: r.status, size: b.byteLength,"
        "  text: new TextDecoder().decode(b.slice(0, 2000)),"
        "  sha: r.headers.get('X-Fedcl-Sha256'), type: r.headers.get('Content-Type')})))"
        ".catch(e => done({status: -1, text: String(e)}));",
        url,
        method,
    )


def _publish(name: str, as_name: str) -> None:
    """Copy a screenshot into docs/screenshots/ when FEDCL_UPDATE_SCREENSHOTS=1 (the committed
    ones the docs quote; other runs leave the tree untouched)."""
    if os.environ.get("FEDCL_UPDATE_SCREENSHOTS") != "1":
        return
    target = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(_artifacts_dir() / name, target / as_name)


def test_version_lifecycle_in_the_browser(lifecycle: tuple[str, Any, Any], browser: Any) -> None:
    """Promote is refused for a Fisher; the canary promoted and rolled back by itself; a site's
    release of the encrypted production model downloads as safetensors."""
    from fedcl.cli.main import main as fedcl_main

    base, registry, run = lifecycle
    token = registry.create_token("carol-browser", "admin")
    _sign_in(browser, base, token)
    versions = {(v.kind, v.server_round): v for v in registry.list_model_versions("test-run")}
    fisher = next(v for (kind, _), v in versions.items() if kind == "fisher")

    browser.get(f"{base}/versions?run=test-run")
    row = browser.find_element(By.ID, f"version-{fisher.id}")
    assert row.get_attribute("data-kind") == "fisher"
    assert not row.find_element(By.CSS_SELECTOR, 'button[data-action="promote"]').is_enabled()
    refused = _fetch(browser, f"/api/versions/{fisher.id}/promote", "POST")
    assert refused["status"] == 409 and "is a fisher" in refused["text"], refused
    # Unattended: nobody clicked anything, yet round 4 is rolled back and round 5 is production.
    assert _status_of(browser, versions[("model", 4)].id) == "rolled_back"
    assert _status_of(browser, versions[("model", 5)].id) == "production"

    production = versions[("model", 5)]
    site_toml = run.sites_dir / "site-0.toml"
    assert (
        fedcl_main(
            [
                "site",
                "release",
                str(site_toml),
                "--version",
                str(production.id),
                "--db",
                run.url,
                "--artifacts",
                str(run.artifacts),
            ]
        )  # fmt: skip
        == 0
    )
    release = next(v for v in registry.list_model_versions("test-run") if v.kind == "release")
    browser.get(f"{base}/versions?run=test-run")
    link = browser.find_element(By.CSS_SELECTOR, f"#version-{production.id} a.release")
    assert link.get_attribute("href").endswith(f"/api/versions/{release.id}/download")
    got = _fetch(browser, f"/api/versions/{release.id}/download")
    assert got["status"] == 200 and got["sha"] == release.sha256 and got["size"] > 1000
    errors = _browser_errors(browser)
    assert all("409" in e for e in errors), errors  # only the refused promote was logged
    _screenshot(browser, "dashboard-versions-lifecycle.png", 900)
    _publish("dashboard-versions-lifecycle.png", "versions.png")

    # The pages a coordinator steers by, photographed for the docs.
    from test_dashboard import replay

    # A second real run beside it (the demo simulation the other tests share) to compare with.
    replay(build_demo_snapshot(Path(tempfile.mkdtemp(prefix="fedcl-demo-"))), registry)
    browser.get(f"{base}/runs")
    assert (
        browser.find_element(By.CSS_SELECTOR, 'tr[data-run="test-run"]').get_attribute(
            "data-health"
        )
        == "degraded"
    )
    _screenshot(browser, "dashboard-runs.png", 700)
    _publish("dashboard-runs.png", "runs.png")
    browser.get(f"{base}/runs/test-run")
    _wait(browser, lambda d: _svg_children(d, "chart-accuracy") > 10, "accuracy drawn")
    alerts = browser.find_element(By.ID, "alerts").text
    assert "round 4: mean accuracy fell from" in alerts
    assert "hidden (HE)" in browser.find_element(By.ID, "sites-table").text
    _screenshot(browser, "dashboard-run-lifecycle.png", 1900)
    _publish("dashboard-run-lifecycle.png", "run.png")
    browser.get(f"{base}/runs")
    browser.find_element(By.CSS_SELECTOR, 'input[name="run"][value="test-run"]').click()
    browser.find_element(By.CSS_SELECTOR, f'input[name="run"][value="{DEMO_RUN}"]').click()
    browser.find_element(By.ID, "compare-selected").click()
    _wait(browser, lambda d: urlsplit(d.current_url).path == "/compare", "on the comparison")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#matrices table.matrix")) == 2
    _screenshot(browser, "dashboard-compare.png", 1000)
    _publish("dashboard-compare.png", "compare.png")
