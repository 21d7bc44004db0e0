"""Events with bounded growth, breaker events and alerts, policy history and pruning."""

import io
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.utils import timezone

from quotas import alerts, events
from quotas.guards import check_tool_call
from quotas.models import (
    BreakerEvent,
    BudgetPolicy,
    PolicyChange,
    QuotaSession,
    RateLimitRule,
    RateLimitViolation,
    ToolCallCount,
    UsageRecord,
)
from quotas.policies import BudgetSpec
from quotas.redis_client import SharedRedis
from quotas.spend import CLOSED, HALF_OPEN, OPEN, SpendCounters
from quotas.testing import charge
from tests.fixtures.ledger import make_session, make_usage, quiet_events  # noqa: F401
from tests.fixtures.spend import T0, Clock

USD = 1_000_000
BUDGET = BudgetSpec(
    session_cap_usd=Decimal("100.00"),
    session_max_seconds=1800,
    hourly_cap_usd=Decimal("5.00"),
    breaker_threshold_usd=Decimal("10.00"),
    breaker_cooldown_seconds=600,
)


@pytest.fixture
def alert_mail(settings, mailoutbox):
    settings.QUOTAS_ALERT_EMAILS = ["ops@example.com"]
    settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    return mailoutbox


def subjects(outbox, text):
    return [m.subject for m in outbox if text in m.subject]


# -- violations and tool calls ------------------------------------------------------------


@pytest.mark.django_db
def test_429_flood_is_one_row_per_minute(client, default_policies, no_redis, quiet_events):
    quiet_events.clock = Clock(T0 + 5)
    statuses = [client.get("/status").status_code for _ in range(75)]
    refused = statuses.count(429)
    assert refused == 15  # /status allows 60 a minute
    assert RateLimitViolation.objects.count() == 0  # nothing written until the flush
    assert events.flush() == 1
    row = RateLimitViolation.objects.get()
    assert (row.rule, row.scope, row.endpoint, row.shadow) == ("status", "http", "/status", False)
    assert row.count == refused
    assert row.minute == datetime.fromtimestamp(T0, UTC)
    # More refusals in the same minute increment the same row (an upsert, not an INSERT).
    for _ in range(4):
        assert client.get("/status").status_code == 429
    events.flush()
    assert RateLimitViolation.objects.get().count == refused + 4
    # The next minute is a new row.
    quiet_events.clock.now += 60
    client.get("/status")
    events.flush()
    assert RateLimitViolation.objects.count() == 2


@pytest.mark.django_db
def test_shadow_rule_is_recorded_as_shadow(client, default_policies, no_redis, quiet_events):
    RateLimitRule.objects.create(
        name="status-shadow",
        scope="http",
        target="/status",
        limit=1,
        window_seconds=60,
        shadow=True,
    )
    for _ in range(3):
        assert client.get("/status").status_code == 200
    events.flush()
    row = RateLimitViolation.objects.get(rule="status-shadow")
    assert row.shadow and row.count == 2


@pytest.mark.django_db(transaction=True)
def test_tool_refusals_recorded_through_the_guard_and_registry(
    default_policies, no_redis, quiet_events
):
    from ducke.tools.registry import run_tool

    async def calls():
        for _ in range(10):  # the weather rule allows 10 an hour per client
            assert (await check_tool_call("weather", "192.0.2.7")).allowed
        refused = await run_tool(
            "get_current_weather", '{"location": "Berlin"}', client="192.0.2.7"
        )
        invalid = await run_tool("get_current_weather", "{", client="192.0.2.7")
        return refused, invalid

    refused, invalid = async_to_sync(calls)()
    assert refused.status == "refused" and invalid.status == "invalid"
    events.flush()
    violation = RateLimitViolation.objects.get()
    assert (violation.rule, violation.scope, violation.endpoint, violation.count) == (
        "tool-weather",
        "tool",
        "tool:weather",
        1,
    )
    counts = dict(ToolCallCount.objects.values_list("status", "count"))
    assert counts == {"refused": 1, "invalid": 1}


def test_buffer_is_bounded(quiet_events, monkeypatch):
    monkeypatch.setattr(events, "MAX_PENDING_KEYS", 3)
    for number in range(10):
        events.record_violation(f"rule-{number}", "http", "/")
    events.record_violation("rule-0", "http", "/")  # an existing key still counts
    assert quiet_events.pending() == 3
    assert quiet_events._violations[next(iter(quiet_events._violations))] == 2


@pytest.mark.django_db
def test_failed_flush_keeps_the_counts(quiet_events, monkeypatch):
    def broken(*args, **kwargs):
        raise events.DatabaseError("down")

    events.record_tool_call("weather", "ok")
    monkeypatch.setattr(events.EventRecorder, "_upsert_tool_calls", broken)
    assert events.flush() == 0
    monkeypatch.undo()
    assert events.flush() == 1
    assert ToolCallCount.objects.get().count == 1


# -- breaker events and alerts ------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
def engine_counters(request):
    """Counters factory on the in-process twin or on a real Redis (the Lua script)."""
    if request.param == "local":
        return lambda clock: SpendCounters(None, timer=clock, ledger=False)
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return lambda clock: SpendCounters(SharedRedis(url), timer=clock, prefix=prefix, ledger=False)


@pytest.mark.django_db
def test_breaker_trip_records_an_event_and_sends_one_alert(
    alert_mail, quiet_events, engine_counters
):
    clock = Clock()
    counters = engine_counters(clock)
    state = charge(counters, "s1", 11 * USD, BUDGET)
    assert state.tripped and state.breaker == OPEN
    events.flush()
    assert alerts.flush(5)
    event = BreakerEvent.objects.get()
    assert (event.kind, event.hour_cost_usd, event.threshold_usd, event.actor) == (
        "opened",
        Decimal("11.000000"),
        Decimal("10.000000"),
        "system",
    )
    assert event.at.timestamp() == T0
    assert subjects(alert_mail, "Circuit breaker opened") == ["[DUCK-E] Circuit breaker opened"]
    # Cool-down over: half-open; another charge re-trips within the same hour -> no new mail.
    clock.now += 601
    assert counters.read(BUDGET).breaker == HALF_OPEN
    assert charge(counters, "s1", 1 * USD, BUDGET).tripped
    events.flush()
    alerts.flush(5)
    kinds = list(BreakerEvent.objects.order_by("at", "id").values_list("kind", flat=True))
    assert kinds == ["opened", "half_open", "opened"]
    assert len(subjects(alert_mail, "Circuit breaker opened")) == 1


@pytest.mark.django_db
def test_breaker_closing_by_itself_is_recorded_and_alerted(
    alert_mail, quiet_events, engine_counters
):
    clock = Clock()
    counters = engine_counters(clock)
    charge(counters, "s1", 11 * USD, BUDGET)
    clock.now += 3601  # the hour's spend has expired and the cool-down is over
    assert counters.read(BUDGET).breaker == CLOSED
    events.flush()
    alerts.flush(5)
    closed = BreakerEvent.objects.get(kind="closed")
    assert closed.hour_cost_usd == Decimal("0")
    assert subjects(alert_mail, "Circuit breaker closed")


@pytest.mark.django_db
def test_hourly_alerts_once_each_per_hour(alert_mail, quiet_events):
    clock = Clock()
    counters = SpendCounters(None, timer=clock, ledger=False)
    charge(counters, "s1", 3 * USD, BUDGET)  # 60 %: nothing
    charge(counters, "s1", int(1.2 * USD), BUDGET)  # 84 %
    charge(counters, "s1", int(0.1 * USD), BUDGET)  # 86 %: already told
    clock.now += 10
    charge(counters, "s1", 1 * USD, BUDGET)  # 106 %
    charge(counters, "s1", 1 * USD, BUDGET)  # 126 %: already told (and the breaker is far)
    alerts.flush(5)
    assert len(subjects(alert_mail, "80 %")) == 1
    assert len(subjects(alert_mail, "100 %")) == 1
    assert "$5.30" in next(m for m in alert_mail if "100 %" in m.subject).body


@pytest.mark.django_db
def test_reset_action_records_who(admin_client, alert_mail, no_redis, quiet_events):
    from quotas.policies import policy_cache
    from quotas.spend import spend_counters

    budget = policy_cache.get().budget
    charge(spend_counters(), "s1", int(budget.breaker_threshold_usd * USD), budget)
    policy = BudgetPolicy.objects.get(active=True)
    response = admin_client.post(
        "/admin/quotas/budgetpolicy/",
        {"action": "reset_circuit_breaker", "_selected_action": [policy.pk]},
    )
    assert response.status_code == 302
    events.flush()
    alerts.flush(5)
    reset = BreakerEvent.objects.get(kind="reset")
    assert reset.actor == "admin"
    assert reset.hour_cost_usd == budget.breaker_threshold_usd
    assert subjects(alert_mail, "reset by hand")
    assert "admin" in next(m for m in alert_mail if "reset by hand" in m.subject).body


# -- policy history -----------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_edit_records_user_and_before_after(admin_client):
    rule = RateLimitRule.objects.get(name="status")
    form = {
        "name": "status",
        "scope": "http",
        "target": "/status",
        "key": "ip",
        "limit": "120",
        "window_seconds": "60",
        "enabled": "on",
    }
    response = admin_client.post(f"/admin/quotas/ratelimitrule/{rule.pk}/change/", form)
    assert response.status_code == 302
    change = PolicyChange.objects.filter(object_id=str(rule.pk)).latest("id")
    assert (change.actor, change.action, change.object_type) == (
        "admin",
        "changed",
        "quotas.ratelimitrule",
    )
    assert change.before["limit"] == 60 and change.after["limit"] == 120
    assert change.changed_fields == ["limit"]
    history = admin_client.get(f"/admin/quotas/ratelimitrule/{rule.pk}/history/")
    assert "Policy changes" in history.content.decode()
    listing = admin_client.get("/admin/quotas/policychange/", {"actor": "admin"})
    assert listing.status_code == 200 and "status" in listing.content.decode()


@pytest.mark.django_db
def test_orm_changes_are_recorded_as_system():
    rule = RateLimitRule.objects.create(
        name="api", scope="http", target="/api/*", limit=10, window_seconds=60
    )
    rule.limit = 20
    rule.save()
    rule.save()  # nothing changed: no row
    rule_id = str(rule.pk)
    rule.delete()
    rows = PolicyChange.objects.filter(object_id=rule_id, object_type="quotas.ratelimitrule")
    assert list(rows.order_by("id").values_list("action", "actor")) == [
        ("created", "system"),
        ("changed", "system"),
        ("deleted", "system"),
    ]
    created, changed, deleted = rows.order_by("id")
    assert created.before is None and created.after["limit"] == 10
    assert changed.before["limit"] == 10 and changed.after["limit"] == 20
    assert deleted.before["limit"] == 20 and deleted.after is None


@pytest.mark.django_db
def test_price_and_budget_changes_are_recorded(admin_client):
    budget = BudgetPolicy.objects.get(active=True)
    budget.hourly_cap_usd = Decimal("60.00")
    budget.save()
    change = PolicyChange.objects.filter(object_type="quotas.budgetpolicy").latest("id")
    assert change.before["hourly_cap_usd"] == "50.000000"
    assert change.after["hourly_cap_usd"] == "60.000000"


def test_policy_change_admin_is_read_only(admin_client, db):
    assert admin_client.get("/admin/quotas/policychange/add/").status_code == 403


# -- pruning ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_prune_removes_only_what_is_past_retention():
    now = timezone.now()
    old, recent = now - timedelta(days=91), now - timedelta(days=89)
    for when in (old, recent):
        minute = when.replace(second=0, microsecond=0)
        RateLimitViolation.objects.create(
            minute=minute, rule="status", scope="http", endpoint="/status", count=3
        )
        ToolCallCount.objects.create(minute=minute, tool="weather", status="ok", count=1)
        BreakerEvent.objects.create(at=when, kind="opened")
    old_session = make_session(started_at=old, ended_at=old)
    make_usage(old_session, old, "1")
    new_session = make_session(started_at=recent, ended_at=recent)
    make_usage(new_session, recent, "1")

    out = io.StringIO()
    call_command("quotas_prune", "--dry-run", stdout=out)
    assert "would delete 1 rate-limit violation rows" in out.getvalue()
    assert RateLimitViolation.objects.count() == 2 and BreakerEvent.objects.count() == 2

    out = io.StringIO()
    call_command("quotas_prune", stdout=out)
    assert "deleted 1 breaker events" in out.getvalue()
    assert RateLimitViolation.objects.get().minute > old
    assert ToolCallCount.objects.count() == 1 and BreakerEvent.objects.count() == 1
    assert UsageRecord.objects.count() == 2  # the ledger is kept unless asked

    out = io.StringIO()
    call_command("quotas_prune", "--ledger", stdout=out)
    assert "deleted 1 usage records" in out.getvalue() and "deleted 1 sessions" in out.getvalue()
    assert list(QuotaSession.objects.values_list("pk", flat=True)) == [new_session.pk]

    call_command("quotas_prune", "--days", "30", stdout=io.StringIO())
    assert BreakerEvent.objects.count() == 0


@pytest.mark.django_db(transaction=True)
async def test_connection_guard_refusals_are_recorded(
    default_policies, no_redis, quiet_events, close_worker_connections
):
    from channels.testing import WebsocketCommunicator

    from quotas.guards import ConnectionGuard

    async def accept_and_close(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    guard = ConnectionGuard(accept_and_close)
    codes = []
    for _ in range(7):  # session-connect allows 5 a minute
        communicator = WebsocketCommunicator(guard, "/session")
        communicator.scope["client"] = ("192.0.2.9", 50000)
        await communicator.connect()
        while True:
            message = await communicator.receive_output(timeout=2)
            if message["type"] == "websocket.close":
                codes.append(message["code"])
                break
        await communicator.wait()
    assert codes == [1000] * 5 + [4429, 4429]
    await database_sync_to_async(events.flush)()
    row = await RateLimitViolation.objects.aget()
    assert (row.rule, row.scope, row.endpoint, row.count) == (
        "session-connect",
        "websocket",
        "/session",
        2,
    )


def test_exiting_without_django_settings_is_quiet():
    """A script that imports quotas but never configures Django exits without a traceback
    from the recorder's exit hook."""
    import subprocess
    import sys

    from tests.fixtures.live_server import PROJECT_ROOT

    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", "import quotas.events"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "Traceback" not in done.stderr, done.stderr
