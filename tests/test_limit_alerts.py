"""Spend-limit alerts: once per limit, key and window at alert_at_percent; shadow limits over."""

import logging
from dataclasses import replace
from decimal import Decimal

import pytest

from quotas import alerts, testing
from quotas.caps import Identity
from quotas.policies import BudgetSpec, SpendLimitSpec
from quotas.spend import SpendCounters, entry_member
from quotas.testing import reserve, settle
from tests.fixtures.ledger import quiet_events  # noqa: F401
from tests.fixtures.spend import T0, Clock, engine  # noqa: F401
from tests.fixtures.webhook_receiver import webhook_receiver_fixture  # noqa: F401

USD = 1_000_000
CLIENT = "203.0.113.9"
BUDGET = BudgetSpec(
    session_cap_usd=Decimal("100.00"),
    hourly_cap_usd=Decimal("1000.00"),  # far away: no hourly alert gets in the way
    breaker_threshold_usd=Decimal("2000.00"),
)
CLIENT_HOUR = SpendLimitSpec(
    "client-hour", "client", Decimal("2.00"), "rolling", 3600, alert_at_percent=80
)
CLIENT_DAY = SpendLimitSpec("client-day", "client", Decimal("3.00"), "day", alert_at_percent=50)
USER_HOUR = SpendLimitSpec(
    "user-hour", "user", Decimal("1.00"), "rolling", 3600, alert_at_percent=90
)
EVERYONE_HOUR = SpendLimitSpec(
    "everyone-hour", "global", Decimal("10.00"), "rolling", 3600, alert_at_percent=50
)
WATCH = SpendLimitSpec("watch", "client", Decimal("0.10"), "rolling", 60, shadow=True)


@pytest.fixture
def alert_mail(settings, mailoutbox, quiet_events):
    settings.QUOTAS_ALERT_EMAILS = ["ops@example.com"]
    settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    settings.QUOTAS_BUDGET_TIMEZONE = "Europe/Paris"
    return mailoutbox


def caps(counters, limits, client=CLIENT, session="s1", **who):
    return counters.caps_for(
        BUDGET, Identity(client=client, **who), limits=limits, session_id=session
    )


def charge(counters, usd, limits, **who):
    return testing.charge(
        counters, "s1", int(Decimal(usd) * USD), BUDGET, caps=caps(counters, limits, **who)
    )


def limit_mails(outbox, event="spend_limit_alert"):
    assert alerts.flush(5)
    return [m for m in outbox if f"event: {event}" in m.body]


def test_an_alert_once_at_crossing_then_again_after_the_window(engine, alert_mail):
    clock = Clock()
    counters = engine(clock)
    charge(counters, "1.00", (CLIENT_HOUR,))  # 50 %: nothing yet
    assert limit_mails(alert_mail) == []
    charge(counters, "0.70", (CLIENT_HOUR,))  # 85 %: the alert
    clock.now += 60
    charge(counters, "0.10", (CLIENT_HOUR,))  # 90 %, same window: already told
    charge(counters, "0.50", (CLIENT_HOUR,))  # 115 %: still the same window
    mails = limit_mails(alert_mail)
    assert [m.subject for m in mails] == [
        "[DUCK-E] Spend limit client-hour: a client at 85 % ($1.70 of $2.00)"
    ]
    body = mails[0].body
    assert "85 % of the $2.00 cap (alert at 80 %)" in body
    assert "rolling 3600 s window" in body
    assert f"who: client:{CLIENT}" in body and "limit: client-hour" in body
    assert "spent_usd: 1.700000" in body and "cap_usd: 2.000000" in body
    # The window rolls on: every cent of that spend has left it; a new crossing is news.
    clock.now = T0 + 3600 + 61
    charge(counters, "1.80", (CLIENT_HOUR,))
    assert len(limit_mails(alert_mail)) == 2
    assert "90 % ($1.80 of $2.00)" in limit_mails(alert_mail)[-1].subject


def test_a_rolling_total_back_under_the_threshold_rearms_the_alert(engine, alert_mail):
    clock = Clock()
    counters = engine(clock)
    charge(counters, "1.00", (CLIENT_HOUR,))
    clock.now = T0 + 1800
    charge(counters, "0.70", (CLIENT_HOUR,))  # 85 %: alert
    clock.now = T0 + 3601  # the first dollar has left the window: 35 %
    charge(counters, "0.05", (CLIENT_HOUR,))  # seen under the threshold
    assert len(limit_mails(alert_mail)) == 1
    clock.now = T0 + 3700
    charge(counters, "1.00", (CLIENT_HOUR,))  # 87 % again, less than a window after the alert
    assert len(limit_mails(alert_mail)) == 2


def test_another_client_or_limit_is_its_own_alert(engine, alert_mail):
    counters = engine(Clock())
    charge(counters, "1.70", (CLIENT_HOUR, CLIENT_DAY))  # 85 % of the hour, 56 % of the day
    charge(counters, "1.60", (CLIENT_HOUR, CLIENT_DAY), client="203.0.113.10")
    mails = limit_mails(alert_mail)
    assert sorted(m.subject.split(":")[0] for m in mails) == [
        "[DUCK-E] Spend limit client-day",
        "[DUCK-E] Spend limit client-day",
        "[DUCK-E] Spend limit client-hour",
        "[DUCK-E] Spend limit client-hour",
    ]
    assert all("203.0.113" not in m.subject for m in mails)
    assert sum("who: client:203.0.113.10" in m.body for m in mails) == 2


def test_a_calendar_limit_alerts_once_per_period(engine, alert_mail):
    clock = Clock()
    counters = engine(clock)
    charge(counters, "1.60", (CLIENT_DAY,))  # 53 % of the day: alert
    clock.now = T0 + 14 * 3600  # 23:00 in Paris, the same day
    charge(counters, "1.00", (CLIENT_DAY,))
    mails = limit_mails(alert_mail)
    assert len(mails) == 1
    assert "period since 2027-01-15 00:00 CET" in mails[0].body
    assert "resets_at: 2027-01-15T23:00:00+00:00" in mails[0].body
    clock.now = T0 + 15 * 3600 + 1  # just after midnight in Paris: a new period
    charge(counters, "1.50", (CLIENT_DAY,))  # 50 % of the new day
    mails = limit_mails(alert_mail)
    assert len(mails) == 2
    assert "period since 2027-01-16 00:00 CET" in mails[1].body


def test_a_reservation_alone_does_not_alert_its_settlement_does(engine, alert_mail):
    counters = engine(Clock())
    mine = caps(counters, (CLIENT_HOUR,))
    held = reserve(counters, mine, int(1.9 * USD), entry_member(1_900_000, "r1"), BUDGET)
    assert held.allowed
    assert limit_mails(alert_mail) == []  # a worst case is not spend yet
    settle(
        counters, mine, entry_member(1_900_000, "r1"), 1_700_000, entry_member(1_700_000, 9), BUDGET
    )
    assert [m.subject for m in limit_mails(alert_mail)] == [
        "[DUCK-E] Spend limit client-hour: a client at 85 % ($1.70 of $2.00)"
    ]


def test_user_and_global_limits_name_their_key(engine, alert_mail):
    counters = engine(Clock())
    charge(counters, "0.95", (USER_HOUR, EVERYONE_HOUR), user_id=7)
    charge(counters, "4.10", (USER_HOUR, EVERYONE_HOUR))  # anonymous: its client's user-hour
    subjects = sorted(m.subject for m in limit_mails(alert_mail))
    assert subjects == [
        "[DUCK-E] Spend limit everyone-hour: everyone at 50 % ($5.05 of $10.00)",
        "[DUCK-E] Spend limit user-hour: a client at 410 % ($4.10 of $1.00)",
        "[DUCK-E] Spend limit user-hour: user #7 at 95 % ($0.95 of $1.00)",
    ]


def test_no_alert_for_a_limit_without_alert_at_percent(engine, alert_mail):
    quiet = SpendLimitSpec("client-hour", "client", Decimal("2.00"), "rolling", 3600)
    counters = engine(Clock())
    charge(counters, "3.00", (quiet,))  # 150 % of it: counted, no alert asked for
    assert alerts.flush(5)
    assert alert_mail == []


def test_a_shadow_limit_over_its_cap_logs_once_and_alerts(engine, alert_mail, caplog):
    clock = Clock()
    counters = engine(clock)
    with caplog.at_level(logging.WARNING, logger="quotas.notifications"):
        charge(counters, "0.08", (WATCH,))  # under its cap: nothing
        charge(counters, "0.04", (WATCH,))  # $0.12 of $0.10: over, never refused
        clock.now += 10
        charge(counters, "0.05", (WATCH,))
    warnings = [r.getMessage() for r in caplog.records if r.name == "quotas.notifications"]
    assert warnings == [
        f"shadow spend limit watch over its cap for client:{CLIENT}: $0.120000 of $0.100000 "
        "in its rolling 60 s window (not refused)"
    ]
    mails = limit_mails(alert_mail, "spend_limit_shadow_over")
    assert [m.subject for m in mails] == [
        "[DUCK-E] Shadow spend limit watch over its cap for a client ($0.12 of $0.10)"
    ]
    assert "nothing was refused" in mails[0].body
    assert limit_mails(alert_mail) == []  # no alert_at_percent: no threshold alert


def test_a_shadow_limit_that_would_refuse_a_reservation_alerts(engine, alert_mail, caplog):
    counters = engine(Clock())
    mine = caps(counters, (WATCH,))
    with caplog.at_level(logging.WARNING, logger="quotas.notifications"):
        held = reserve(counters, mine, 500_000, entry_member(500_000, "r1"), BUDGET)
        assert held.allowed  # a shadow limit never refuses
        settle(
            counters, mine, entry_member(500_000, "r1"), 400_000, entry_member(400_000, 1), BUDGET
        )
    assert len(limit_mails(alert_mail, "spend_limit_shadow_over")) == 1
    shadow_lines = [r for r in caplog.records if "shadow spend limit watch" in r.getMessage()]
    assert len(shadow_lines) == 1


def test_the_webhook_carries_the_event_and_the_key(
    engine, settings, quiet_events, webhook_receiver
):
    settings.QUOTAS_ALERT_EMAILS = []
    settings.ADMINS = []
    settings.QUOTAS_ALERT_WEBHOOK_URL = webhook_receiver.url
    counters = engine(Clock())
    charge(counters, "1.70", (CLIENT_HOUR,))
    charge(counters, "0.10", (CLIENT_HOUR,))
    assert alerts.flush(5)
    assert len(webhook_receiver.requests) == 1
    payload = webhook_receiver.requests[0].json()
    assert payload["event"] == "spend_limit_alert"
    assert payload["details"]["who"] == f"client:{CLIENT}"
    assert payload["details"]["percent"] == 85
    assert CLIENT not in payload["blocks"][0]["text"]["text"]


def test_dedupe_key_holds_across_processes_within_a_window(alert_mail):
    """Two processes (two notifiers' memories) sharing one dedupe cache send one alert."""
    from quotas.notifications import SpendNotifier

    first, second = SpendNotifier(), SpendNotifier()
    counters = SpendCounters(None, timer=Clock(), ledger=False)
    state = counters.decide("read", caps(counters, (CLIENT_HOUR,)), BUDGET)
    cap = next(c for c, _ in state.totals if c.name == "client-hour")
    over = replace(state, totals=((cap, 1_800_000),))  # 90 % of the limit
    first.observe(over, BUDGET, T0 + 10, charged=True)
    second.observe(over, BUDGET, T0 + 20, charged=True)
    assert len(limit_mails(alert_mail)) == 1
    second.observe(over, BUDGET, T0 + 3600 + 20, charged=True)  # the next bucket
    assert len(limit_mails(alert_mail)) == 2
