"""Spend limits in the admin: validation, defaults, live snapshot, history; budget warnings."""

import html
from decimal import Decimal

import pytest

from quotas.models import BudgetPolicy, PolicyChange, SpendLimit, ToolPrice
from quotas.policies import policy_cache

pytestmark = pytest.mark.django_db

LIMIT_FORM = {
    "name": "team-week",
    "key": "user",
    "cap_usd": "25.00",
    "period": "week",
    "window_seconds": "",
    "group": "",
    "alert_at_percent": "80",
    "enabled": "on",
}


def page_text(response):
    return html.unescape(response.content.decode())


def test_fresh_install_has_the_default_spend_limits_and_tool_price():
    limits = {limit.name: limit for limit in SpendLimit.objects.all()}
    assert set(limits) == {"client-hour", "client-day"}
    assert (limits["client-hour"].key, limits["client-hour"].cap_usd) == ("client", Decimal("10"))
    assert (limits["client-hour"].period, limits["client-hour"].window_seconds) == (
        "rolling",
        3600,
    )
    assert (limits["client-day"].cap_usd, limits["client-day"].window_seconds) == (
        Decimal("20"),
        86400,
    )
    assert BudgetPolicy.objects.get(active=True).max_output_tokens_per_response == 1000
    assert ToolPrice.objects.get(tool="web_search").per_call_usd > 0


def test_load_defaults_restores_a_deleted_limit():
    from django.core.management import call_command

    SpendLimit.objects.filter(name="client-day").delete()
    call_command("quotas_load_defaults")
    assert SpendLimit.objects.filter(name="client-day").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"period": "rolling", "window_seconds": ""},
            "A rolling limit needs its window in seconds",
        ),
        ({"cap_usd": "0"}, "The cap must be more than $0."),
        ({"cap_usd": "-1"}, "The cap must be more than $0."),
        ({"alert_at_percent": "100"}, "Ensure this value is less than or equal to 99."),
        ({"alert_at_percent": "0"}, "Ensure this value is greater than or equal to 1."),
        ({"window_seconds": "60"}, "Only rolling limits take a window"),
    ],
)
def test_admin_refuses_bad_spend_limits_with_clear_messages(admin_client, changes, message):
    response = admin_client.post("/admin/quotas/spendlimit/add/", {**LIMIT_FORM, **changes})
    assert response.status_code == 200, "the form was accepted"
    assert message in page_text(response)
    assert not SpendLimit.objects.filter(name="team-week").exists()


def test_a_saved_limit_is_in_the_snapshot_and_the_history(admin_client):
    before = policy_cache.get().version
    response = admin_client.post("/admin/quotas/spendlimit/add/", LIMIT_FORM)
    assert response.status_code == 302
    snapshot = policy_cache.get()
    assert snapshot.version > before
    limit = next(limit for limit in snapshot.spend_limits if limit.name == "team-week")
    assert (limit.key, limit.cap_usd, limit.period, limit.alert_at_percent) == (
        "user",
        Decimal("25.00"),
        "week",
        80,
    )
    change = PolicyChange.objects.get(object_type="quotas.spendlimit", action="created")
    assert change.actor == "admin" and change.after["cap_usd"] == "25.000000"


def test_a_disabled_limit_leaves_the_snapshot():
    SpendLimit.objects.filter(name="client-day").update(enabled=False)
    from quotas.signals import bump_policy_version

    bump_policy_version()
    assert "client-day" not in {limit.name for limit in policy_cache.get().spend_limits}


def test_budget_policy_warns_when_a_session_may_spend_the_hour(admin_client):
    policy = BudgetPolicy.objects.get(active=True)
    form = {
        "name": policy.name,
        "active": "on",
        "session_cap_usd": "60.00",
        "session_max_seconds": "1800",
        "hourly_cap_usd": "50.00",
        "breaker_threshold_usd": "100.00",
        "breaker_cooldown_seconds": "3600",
        "max_concurrent_sessions_per_client": "2",
        "max_output_tokens_per_response": "1000",
    }
    response = admin_client.post(
        f"/admin/quotas/budgetpolicy/{policy.pk}/change/", form, follow=True
    )
    text = page_text(response)
    assert "above the hourly cap" in text
    assert "above the circuit-breaker threshold" not in text
    assert BudgetPolicy.objects.get(pk=policy.pk).session_cap_usd == Decimal("60")


def test_max_output_tokens_is_bounded_like_upstream(admin_client):
    policy = BudgetPolicy.objects.get(active=True)
    form = {
        "name": policy.name,
        "active": "on",
        "session_cap_usd": "5.00",
        "session_max_seconds": "1800",
        "hourly_cap_usd": "50.00",
        "breaker_threshold_usd": "100.00",
        "breaker_cooldown_seconds": "3600",
        "max_concurrent_sessions_per_client": "2",
        "max_output_tokens_per_response": "5000",
    }
    response = admin_client.post(f"/admin/quotas/budgetpolicy/{policy.pk}/change/", form)
    assert "Ensure this value is less than or equal to 4096." in page_text(response)


def test_an_unknown_budget_time_zone_stops_start_up(settings):
    from django.core.checks import run_checks

    settings.QUOTAS_BUDGET_TIMEZONE = "Mars/Olympus_Mons"
    errors = [m for m in run_checks() if m.id == "quotas.E006"]
    assert len(errors) == 1 and "Mars/Olympus_Mons" in errors[0].msg
    settings.QUOTAS_BUDGET_TIMEZONE = "Europe/Paris"
    assert not [m for m in run_checks() if m.id == "quotas.E006"]
