"""GET /metrics restricted by DUCKE_METRICS_ALLOWED_CIDRS and DUCKE_METRICS_TOKEN."""

import hmac
from unittest import mock

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from ducke import metrics_access

pytestmark = [pytest.mark.urls("tests.urls_metrics"), pytest.mark.django_db]

TOKEN = "s3cret-scrape-token-0123456789"


def scrape(client, remote_addr="127.0.0.1", forwarded_for=None, authorization=None):
    headers = {}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    if authorization is not None:
        headers["Authorization"] = authorization
    return client.get("/metrics", REMOTE_ADDR=remote_addr, headers=headers)


def assert_refused(response, *secrets):
    assert response.status_code == 403
    body = response.content.decode()
    for secret in secrets:
        assert secret not in body
    assert "# TYPE" not in body


def assert_metrics(response):
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert "# TYPE" in response.content.decode()


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="", DUCKE_METRICS_TOKEN="")
def test_open_when_nothing_is_configured(client):
    assert_metrics(scrape(client, remote_addr="203.0.113.9"))


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8, 127.0.0.1/32", DUCKE_METRICS_TOKEN="")
@pytest.mark.parametrize(
    ("remote_addr", "allowed"),
    [("127.0.0.1", True), ("10.20.30.40", True), ("127.0.0.2", False), ("203.0.113.9", False)],
)
def test_cidr_allowlist(client, remote_addr, allowed):
    response = scrape(client, remote_addr=remote_addr)
    if allowed:
        assert_metrics(response)
    else:
        assert_refused(response, remote_addr, "10.0.0.0/8")


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="2001:db8::5/128", DUCKE_METRICS_TOKEN="")
def test_allowlist_judges_the_address_not_the_clients_64(client):
    assert_metrics(scrape(client, remote_addr="2001:db8::5"))
    assert_refused(scrape(client, remote_addr="2001:db8::6"))  # same /64, another host


@override_settings(
    DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8", DUCKE_METRICS_TOKEN="", QUOTAS_TRUSTED_PROXIES=""
)
def test_forged_forwarded_for_from_untrusted_peer_changes_nothing(client):
    assert_refused(scrape(client, remote_addr="203.0.113.9", forwarded_for="10.0.0.5"))


@override_settings(
    DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8",
    DUCKE_METRICS_TOKEN="",
    QUOTAS_TRUSTED_PROXIES="172.28.0.0/24",
)
def test_client_behind_trusted_proxy_is_judged_by_forwarded_for(client):
    assert_metrics(scrape(client, remote_addr="172.28.0.10", forwarded_for="10.0.0.5"))
    assert_refused(scrape(client, remote_addr="172.28.0.10", forwarded_for="203.0.113.9"))
    # The proxy's own address is not in the allowlist: an external client does not get in.
    assert_refused(scrape(client, remote_addr="172.28.0.10", forwarded_for="garbage, 172.28.0.3"))


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="", DUCKE_METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
def test_token_refused(client, authorization):
    assert_refused(scrape(client, authorization=authorization), TOKEN)


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="", DUCKE_METRICS_TOKEN=TOKEN)
def test_token_accepted_and_compared_in_constant_time(client):
    with mock.patch.object(metrics_access.hmac, "compare_digest", wraps=hmac.compare_digest) as cmp:
        assert_metrics(scrape(client, authorization=f"Bearer {TOKEN}"))
        assert_metrics(scrape(client, authorization=f"bearer {TOKEN}"))
    assert cmp.call_count == 2


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8", DUCKE_METRICS_TOKEN=TOKEN)
def test_both_configured_requires_both(client):
    good = f"Bearer {TOKEN}"
    assert_metrics(scrape(client, remote_addr="10.1.1.1", authorization=good))
    assert_refused(scrape(client, remote_addr="10.1.1.1", authorization="Bearer nope"), TOKEN)
    assert_refused(scrape(client, remote_addr="192.0.2.1", authorization=good), TOKEN)


def test_settings_are_read_at_request_time(client):
    with override_settings(DUCKE_METRICS_TOKEN="", DUCKE_METRICS_ALLOWED_CIDRS=""):
        assert_metrics(scrape(client))
    with override_settings(DUCKE_METRICS_TOKEN=TOKEN, DUCKE_METRICS_ALLOWED_CIDRS=""):
        assert_refused(scrape(client), TOKEN)
    with override_settings(DUCKE_METRICS_TOKEN="", DUCKE_METRICS_ALLOWED_CIDRS="192.0.2.0/24"):
        assert_refused(scrape(client))


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8,not-a-network", DUCKE_METRICS_TOKEN="")
def test_malformed_allowlist_refuses_and_is_reported(client, caplog):
    assert_refused(scrape(client, remote_addr="10.0.0.1"))
    assert "malformed" in caplog.text
    errors = [m for m in run_checks() if m.id == "ducke.E010"]
    assert len(errors) == 1
    assert "not-a-network" in errors[0].msg


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="10.0.0.0/8", DUCKE_METRICS_TOKEN="")
def test_valid_allowlist_passes_the_check():
    assert [m for m in run_checks() if m.id == "ducke.E010"] == []


@override_settings(DUCKE_METRICS_ALLOWED_CIDRS="", DUCKE_METRICS_TOKEN="")
def test_only_get(client):
    assert client.post("/metrics").status_code == 405
