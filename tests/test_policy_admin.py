"""Policies edited in the admin: validation messages, and edits live without a restart."""

import html
import time

import pytest
from django.db.models import F

from quotas.models import BudgetPolicy, ModelPrice, PolicyVersion, RateLimitRule
from quotas.policies import policy_cache

pytestmark = pytest.mark.django_db

RULE_FORM = {
    "name": "api",
    "scope": "http",
    "target": "/api/*",
    "key": "ip",
    "limit": "10",
    "window_seconds": "60",
    "enabled": "on",
}
BUDGET_FORM = {
    "name": "second",
    "active": "on",
    "session_cap_usd": "5.00",
    "session_max_seconds": "1800",
    "hourly_cap_usd": "50.00",
    "breaker_threshold_usd": "100.00",
    "breaker_cooldown_seconds": "3600",
    "max_concurrent_sessions_per_client": "2",
}
PRICE_FORM = {
    "model": "gpt-test",
    "text_input": "1",
    "cached_text_input": "1",
    "audio_input": "1",
    "cached_audio_input": "1",
    "text_output": "2",
    "audio_output": "2",
    "effective_from_0": "2026-12-01",
    "effective_from_1": "00:00:00",
    "note": "",
}


def page_text(response):
    return html.unescape(response.content.decode())


def assert_refused(response, message):
    """The admin re-shows the form (200, not a redirect) with ``message``."""
    assert response.status_code == 200, "the form was accepted"
    assert message in page_text(response)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"limit": "0"}, "Ensure this value is greater than or equal to 1."),
        ({"window_seconds": "0"}, "Ensure this value is greater than or equal to 1."),
        ({"target": "status page"}, "Use an exact path starting with / (/status)"),
        ({"target": "no-such-url"}, "No URL is named 'no-such-url'"),
        ({"target": "/a*b"}, "a prefix ending in a single * (/api/*)"),
        ({"target": "/api/**"}, "a prefix ending in a single * (/api/*)"),
        ({"scope": "tool", "target": "/weather"}, "A tool rule's target is a tool name"),
    ],
)
def test_rule_add_form_rejects(admin_client, changes, message):
    response = admin_client.post("/admin/quotas/ratelimitrule/add/", {**RULE_FORM, **changes})
    assert_refused(response, message)
    assert not RateLimitRule.objects.filter(name="api").exists()


def test_rule_add_form_accepts_a_good_rule(admin_client):
    response = admin_client.post("/admin/quotas/ratelimitrule/add/", RULE_FORM)
    assert response.status_code == 302
    assert RateLimitRule.objects.get(name="api").target == "/api/*"


def test_rule_change_form_rejects_a_zero_limit(admin_client):
    rule = RateLimitRule.objects.get(name="status")
    data = {**RULE_FORM, "name": "status", "target": "/status", "limit": "0"}
    response = admin_client.post(f"/admin/quotas/ratelimitrule/{rule.pk}/change/", data)
    assert_refused(response, "Ensure this value is greater than or equal to 1.")
    rule.refresh_from_db()
    assert rule.limit == 60


def test_price_form_rejects_a_negative_price(admin_client):
    response = admin_client.post(
        "/admin/quotas/modelprice/add/", {**PRICE_FORM, "audio_output": "-0.01"}
    )
    assert_refused(response, "Ensure this value is greater than or equal to 0.")
    assert not ModelPrice.objects.filter(model="gpt-test").exists()


def test_budget_form_rejects_a_second_active_policy(admin_client):
    response = admin_client.post("/admin/quotas/budgetpolicy/add/", BUDGET_FORM)
    assert_refused(response, "Only one budget policy can be active; deactivate 'default' first.")
    assert BudgetPolicy.objects.count() == 1


def test_budget_form_rejects_a_breaker_below_the_hourly_cap(admin_client):
    policy = BudgetPolicy.objects.get(active=True)
    data = {**BUDGET_FORM, "name": "default", "breaker_threshold_usd": "40.00"}
    response = admin_client.post(f"/admin/quotas/budgetpolicy/{policy.pk}/change/", data)
    assert_refused(response, "The circuit-breaker threshold must be at least the hourly cap")
    policy.refresh_from_db()
    assert policy.breaker_threshold_usd == 100


def test_budget_form_rejects_zero_caps(admin_client):
    data = {**BUDGET_FORM, "active": "", "session_cap_usd": "0", "hourly_cap_usd": "0"}
    response = admin_client.post("/admin/quotas/budgetpolicy/add/", data)
    assert_refused(response, "The session cap must be more than $0.")
    assert "The hourly cap must be more than $0." in page_text(response)


def remaining(client):
    return client.get("/status")["RateLimit-Limit"]


def test_admin_edit_is_live_on_the_next_request(admin_client, client, no_redis):
    assert remaining(client) == "60"
    rule = RateLimitRule.objects.get(name="status")
    data = {**RULE_FORM, "name": "status", "target": "/status", "limit": "2"}
    response = admin_client.post(f"/admin/quotas/ratelimitrule/{rule.pk}/change/", data)
    assert response.status_code == 302
    codes = [client.get("/status").status_code for _ in range(3)]
    assert codes == [200, 429, 429]  # the hit before the edit counts too


def test_orm_edit_is_live_on_the_next_request(client, no_redis):
    assert remaining(client) == "60"
    rule = RateLimitRule.objects.get(name="status")
    rule.limit = 7
    rule.save()
    assert remaining(client) == "7"
    rule.delete()
    assert remaining(client) == "100"  # only `default` left


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def edit_from_another_process(**fields):
    """What another instance's save looks like here: new rows and a new version, no signal."""
    RateLimitRule.objects.filter(name="status").update(**fields)
    PolicyVersion.objects.filter(pk=1).update(version=F("version") + 1)


def test_edit_from_another_process_is_seen_after_the_refresh_interval(
    client, no_redis, monkeypatch, settings
):
    settings.QUOTAS_POLICY_REFRESH_SECONDS = 0.5
    clock = FakeClock()
    monkeypatch.setattr(policy_cache, "timer", clock)
    policy_cache.invalidate()
    assert remaining(client) == "60"
    edit_from_another_process(limit=3)
    clock.now += 0.4
    assert remaining(client) == "60"  # not due yet: no database read per request
    clock.now += 0.1
    assert remaining(client) == "3"


def test_edit_from_another_process_is_seen_within_one_second(client, no_redis):
    assert remaining(client) == "60"
    edit_from_another_process(limit=4)
    started = time.monotonic()
    while remaining(client) != "4":
        assert time.monotonic() - started < 1.0, "edit not seen within one second"
        time.sleep(0.02)


def test_a_row_change_without_a_version_bump_waits_for_one(client, no_redis, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(policy_cache, "timer", clock)
    policy_cache.invalidate()
    assert remaining(client) == "60"
    RateLimitRule.objects.filter(name="status").update(limit=5)
    clock.now += 10
    assert remaining(client) == "60"  # the version is what tells processes to reload
    PolicyVersion.objects.filter(pk=1).update(version=F("version") + 1)
    clock.now += 10
    assert remaining(client) == "5"


def test_database_outage_keeps_the_last_policies(client, no_redis, monkeypatch):
    from django.db import OperationalError

    from quotas import policies

    clock = FakeClock()
    monkeypatch.setattr(policy_cache, "timer", clock)
    policy_cache.invalidate()
    assert remaining(client) == "60"

    def unavailable():
        raise OperationalError("database is away")

    monkeypatch.setattr(policies, "read_version", unavailable)
    clock.now += 10
    assert policy_cache.get().rules_for("http", "/status")[0].limit == 60
