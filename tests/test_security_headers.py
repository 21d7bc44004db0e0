"""Response headers: Content-Security-Policy and Permissions-Policy next to Django's own.

The browser tests (test_browser.py, test_reports_browser.py) show that the page and the admin
reports run under the policy with no violation; these check the headers and the markup."""

import re

import pytest
from django.test import Client, override_settings

from quotas.reports import REPORTS
from tests.fixtures.ledger import at, make_session, make_usage, quiet_events  # noqa: F401

pytestmark = pytest.mark.django_db

RANGE = {"since": "2026-11-19 00:00", "until": "2026-11-23 00:00"}
INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>", re.I)
EVENT_HANDLER = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)


def policy(response):
    """The Content-Security-Policy as ``{directive: [sources]}``."""
    header = response["Content-Security-Policy"]
    directives = {}
    for part in header.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


def assert_security_headers(response):
    csp = policy(response)
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in response["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response["Content-Security-Policy"]
    assert response["Permissions-Policy"] == "microphone=(self), camera=(), geolocation=()"
    # Django's headers, kept.
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    return csp


def test_the_page_has_the_headers_and_may_open_its_own_websocket(client):
    response = client.get("/", HTTP_HOST="127.0.0.1:8000")
    assert response.status_code == 200
    csp = assert_security_headers(response)
    assert csp["connect-src"] == ["'self'", "ws://127.0.0.1:8000", "wss://127.0.0.1:8000"]
    assert csp["style-src"] == ["'self'"]  # the page asked for no nonce
    content = response.content.decode()
    assert not INLINE_SCRIPT.search(content) and not EVENT_HANDLER.search(content)
    assert "style=" not in content


def test_status_has_the_headers(client):
    response = client.get("/status")
    assert response.status_code == 200
    assert_security_headers(response)


def test_an_admin_page_has_the_headers(admin_client):
    response = admin_client.get("/admin/")
    assert response.status_code == 200
    assert_security_headers(response)
    login = Client().get("/admin/login/")
    assert_security_headers(login)
    assert not INLINE_SCRIPT.search(login.content.decode())


def test_static_files_have_the_headers(client):
    # WhiteNoise answers before XFrameOptionsMiddleware; the policy is set outside it.
    response = client.get("/static/ducke/app.js")
    assert response.status_code == 200
    assert policy(response)["script-src"] == ["'self'"]
    assert response["Permissions-Policy"].startswith("microphone=(self)")


@override_settings(SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_behind_tls_only_wss_is_listed(client):
    response = client.get("/", HTTP_HOST="localhost", HTTP_X_FORWARDED_PROTO="https")
    assert policy(response)["connect-src"] == ["'self'", "wss://localhost"]


def test_a_disallowed_host_gets_a_policy_without_websocket_sources(client):
    response = client.get("/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert policy(response)["connect-src"] == ["'self'"]


@override_settings(DEBUG=True)
def test_debug_error_pages_keep_their_inline_style(client):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert "Content-Security-Policy" not in response
    assert response["Permissions-Policy"]


def test_a_view_own_policy_is_kept(rf):
    from django.http import HttpResponse

    from ducke.security import SecurityHeadersMiddleware

    def view(request):
        response = HttpResponse("x")
        response["Content-Security-Policy"] = "default-src 'none'"
        return response

    response = SecurityHeadersMiddleware(view)(rf.get("/"))
    assert response["Content-Security-Policy"] == "default-src 'none'"


@pytest.fixture
def seeded_ledger(db):
    session = make_session("203.0.113.1", "gpt-realtime", at("2026-11-20 10:00"))
    make_usage(session, at("2026-11-20 10:05"), "0.200000", text_input=1000, audio_output=500)
    make_usage(session, at("2026-11-21 11:30"), "0.300000", audio_input=2000)


def test_report_pages_use_the_nonce_for_their_chart_style_only(
    admin_client, seeded_ledger, quiet_events
):
    for name in ("", *(f"{report}/" for report in REPORTS)):
        response = admin_client.get(f"/admin/quotas/reports/{name}", RANGE)
        assert response.status_code == 200, name
        csp = assert_security_headers(response)
        content = response.content.decode()
        assert not INLINE_SCRIPT.search(content), name
        assert not EVENT_HANDLER.search(content), name
        assert not re.search(r"\sstyle=", content), name  # no style attributes
        styles = re.findall(r"<style\b([^>]*)>", content)
        nonces = {re.search(r'nonce="([^"]+)"', attrs).group(1) for attrs in styles}
        if name:  # every report page has a chart; its <style> carries the nonce
            assert len(styles) == 1 and len(nonces) == 1, (name, styles)
            assert csp["style-src"] == ["'self'", f"'nonce-{nonces.pop()}'"], name
        else:
            assert styles == [] and csp["style-src"] == ["'self'"]


def test_each_response_gets_its_own_nonce(admin_client, seeded_ledger, quiet_events):
    url = f"/admin/quotas/reports/{next(iter(REPORTS))}/"
    first = policy(admin_client.get(url, RANGE))["style-src"]
    second = policy(admin_client.get(url, RANGE))["style-src"]
    assert first != second and len(first) == len(second) == 2
