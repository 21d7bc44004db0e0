"""The spend report in a real browser: chromium (Playwright) against a daphne server.

Seeds the server's own SQLite database through a subprocess with the server's environment
(a superuser with a known password and a few days of ledger rows), signs in to the admin and
checks that the chart is an inline SVG with drawn shapes, and that the admin and every report
page render under the Content-Security-Policy without a violation. Skips when chromium is
missing, unless DUCKE_REQUIRE_BROWSER=1.
"""

import subprocess
import sys

import pytest

from quotas.reports import REPORTS
from tests.fixtures import live_server
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    csp_violations,
    record_csp_violations,
    require_chromium,
)

daphne_server_factory = live_server.daphne_server_factory

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

PASSWORD = "duck-report-pw-1"
SEED = f"""
import django
django.setup()
from datetime import timedelta
from decimal import Decimal
from django.contrib.auth import get_user_model
from django.utils import timezone
from quotas.models import QuotaSession, UsageRecord

get_user_model().objects.create_superuser("operator", "ops@example.com", {PASSWORD!r})
now = timezone.now()
for day in range(5):
    when = now - timedelta(days=day, hours=1)
    session = QuotaSession.objects.create(
        client=f"203.0.113.{{day}}", model="gpt-realtime", started_at=when, ended_at=when,
        end_reason="client_closed", cost_usd=Decimal(day + 1),
    )
    UsageRecord.objects.create(
        session=session, kind="response", model="gpt-realtime", response_id=f"r{{day}}",
        audio_output=5000 * (day + 1), cost_usd=Decimal(day + 1), created_at=when,
    )
print("seeded")
"""


def seed(server):
    result = subprocess.run(
        [sys.executable, "-c", SEED],
        cwd=live_server.PROJECT_ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "seeded" in result.stdout, result.stderr


def test_spend_report_chart_renders_in_chromium(daphne_server_factory, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    server = daphne_server_factory()
    seed(server)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=20_000
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors, requests = [], []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            record_csp_violations(page)
            target = "/admin/quotas/reports/spend-by-day/"
            page.goto(f"{server.url}/admin/login/?next={target}")
            page.fill("#id_username", "operator")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_selector("#report-chart svg", timeout=20_000)
            assert page.url.endswith(target)
            shapes = page.locator("#report-chart svg path, #report-chart svg rect").count()
            assert shapes > 5
            box = page.locator("#report-chart svg").bounding_box()
            assert box["width"] > 200 and box["height"] > 100
            cells = page.locator("#report-table tbody tr").count()
            assert cells == 5
            assert not errors
            # Everything the page loaded came from the server itself (no CDN).
            assert all(url.startswith(server.url) for url in requests), requests
            page.screenshot(path=str(tmp_path / "spend-by-day.png"), full_page=True)
            assert (tmp_path / "spend-by-day.png").stat().st_size > 10_000
            # The chart's styles applied: pygal's <style> (allowed by its nonce) colours the
            # first series; blocked, the series would be drawn in the default black.
            fill = page.evaluate(
                "() => getComputedStyle(document.querySelector('#report-chart svg .serie-0')).fill"
            )
            assert fill not in ("", "rgb(0, 0, 0)", "none"), fill
            assert csp_violations(page) == []
            # The admin index, the reports index and every report render without a violation.
            for path in ["/admin/", "/admin/quotas/reports/"] + [
                f"/admin/quotas/reports/{name}/" for name in REPORTS
            ]:
                page.goto(f"{server.url}{path}")
                page.wait_for_load_state("load")
                assert page.url == f"{server.url}{path}", path
                assert csp_violations(page) == [], path
            assert not errors
        finally:
            browser.close()
