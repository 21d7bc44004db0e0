"""Report pages, CSV and the quotas_report command against a seeded ledger."""

import csv
import io
import json
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from quotas.models import BreakerEvent, RateLimitViolation, ToolCallCount, UsageRecord
from quotas.reports import REPORTS
from quotas.testing import charge
from tests.fixtures.ledger import at, make_session, make_usage, quiet_events  # noqa: F401

pytestmark = pytest.mark.django_db

SINCE, UNTIL = "2026-11-19 00:00", "2026-11-23 00:00"
RANGE = {"since": SINCE, "until": UNTIL}
BASE = "/admin/quotas/reports/"


class TableParser(HTMLParser):
    """Cells of ``<table id="report-table">``'s body rows, and whether an ``<svg>`` has shapes."""

    def __init__(self):
        super().__init__()
        self.rows, self._in_table, self._in_body, self._cell = [], False, False, None
        self.svg_shapes = 0
        self._in_svg = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "report-table":
            self._in_table = True
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
        elif self._in_body and tag == "td":
            self._cell = ""
        elif tag == "svg":
            self._in_svg = True
        elif self._in_svg and tag in ("path", "rect", "circle"):
            self.svg_shapes += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._in_table:
            self._in_table = self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "svg":
            self._in_svg = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(response):
    parser = TableParser()
    parser.feed(response.content.decode())
    return parser


@pytest.fixture
def ledger(db):
    """Three sessions in the range (one open), one before it; costs = tokens x fresh prices."""
    a1 = make_session("203.0.113.1", "gpt-realtime", at("2026-11-20 10:00"))
    b = make_session("203.0.113.2", "gpt-5", at("2026-11-21 09:00"), end_reason="budget")
    a2 = make_session(
        "203.0.113.1", "gpt-realtime", at("2026-11-22 12:00"), ended_at=None, end_reason=""
    )
    old = make_session("203.0.113.3", "gpt-realtime", at("2026-11-10 08:00"))
    # gpt-realtime: $100 per 1M input tokens, $200 per 1M output; gpt-5: $10 / $30.
    make_usage(a1, at("2026-11-20 10:05"), "0.200000", text_input=1000, audio_output=500)
    make_usage(a1, at("2026-11-20 11:30"), "0.200000", audio_input=2000)
    make_usage(b, at("2026-11-21 09:10"), "0.130000", text_input=10_000, text_output=1000)
    make_usage(a2, at("2026-11-22 12:01"), "0.100000", cached_audio_input=1000)
    make_usage(old, at("2026-11-10 08:05"), "5.000000", audio_output=25_000)
    for session in (a1, b, a2, old):
        session.cost_usd = sum(u.cost_usd for u in session.usage.all())
        session.save()
    return {"sessions": [a1, b, a2, old]}


def in_range():
    return [u for u in UsageRecord.objects.all() if at(SINCE) <= u.created_at < at(UNTIL)]


def usd(value):
    return str(Decimal(value).quantize(Decimal("0.000001")))


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    client.force_login(user)
    return client


def test_staff_sees_every_report_with_chart_and_table(admin_client, ledger, quiet_events):
    index = admin_client.get(BASE)
    assert index.status_code == 200
    for name in REPORTS:
        assert f"{BASE}{name}/" in index.content.decode()
        page = admin_client.get(f"{BASE}{name}/", RANGE)
        assert page.status_code == 200, name
        content = page.content.decode()
        assert 'id="report-table"' in content, name
        assert "<svg" in content and parse(page).svg_shapes > 0, name
        chart = content.split('id="report-chart"')[1].split("</figure>")[0]
        assert "<script" not in chart
        # No URL at all, except the SVG namespace name (which is never fetched).
        assert chart.replace('xmlns="http://www.w3.org/2000/svg"', "").count("://") == 0, name


def test_admin_index_links_to_reports(admin_client):
    assert BASE in admin_client.get("/admin/").content.decode()


def test_staff_without_permissions_sees_reports(staff_client, ledger):
    assert staff_client.get(f"{BASE}spend-by-day/", RANGE).status_code == 200


def test_anonymous_is_sent_to_login(client):
    response = client.get(f"{BASE}spend-by-day/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert client.get(BASE).status_code == 302


def test_signed_in_non_staff_gets_403(client):
    user = get_user_model().objects.create_user("visitor", password="pw")
    client.force_login(user)
    assert client.get(f"{BASE}spend-by-day/").status_code == 403
    assert client.get(BASE).status_code == 403


def test_unknown_report_is_404(admin_client):
    assert admin_client.get(f"{BASE}no-such-report/").status_code == 404


def test_spend_by_day_matches_the_ledger_and_csv(admin_client, ledger):
    expected = defaultdict(lambda: [0, Decimal(0)])
    for usage in in_range():
        day = usage.created_at.strftime("%Y-%m-%d 00:00")
        expected[day][0] += 1
        expected[day][1] += usage.cost_usd
    expected_rows = [[day, str(n), usd(cost)] for day, (n, cost) in sorted(expected.items())]
    page = admin_client.get(f"{BASE}spend-by-day/", RANGE)
    assert parse(page).rows == expected_rows
    download = admin_client.get(f"{BASE}spend-by-day/", {**RANGE, "format": "csv"})
    assert download["Content-Type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(download.content.decode())))
    assert lines[0] == ["day", "usage records", "cost (USD)"]
    assert lines[1:] == expected_rows


def test_spend_by_hour_sums_each_hour(admin_client, ledger):
    rows = parse(admin_client.get(f"{BASE}spend-by-hour/", RANGE)).rows
    assert rows[0] == ["2026-11-20 10:00", "1", "0.200000"]
    assert sum(Decimal(r[2]) for r in rows) == sum(u.cost_usd for u in in_range())


def test_spend_by_model_matches_the_ledger(admin_client, ledger):
    rows = parse(admin_client.get(f"{BASE}spend-by-model/", RANGE)).rows
    by_model = defaultdict(lambda: Decimal(0))
    for usage in in_range():
        by_model[usage.model] += usage.cost_usd
    assert {r[0]: r[-1] for r in rows} == {m: usd(c) for m, c in by_model.items()}
    realtime = next(r for r in rows if r[0] == "gpt-realtime")
    assert realtime[1:8] == ["3", "1000", "0", "2000", "1000", "0", "500"]


def test_spend_by_token_kind_prices_tokens_at_the_price_in_force(admin_client, ledger):
    rows = {r[0]: r[1:] for r in parse(admin_client.get(f"{BASE}spend-by-token-kind/", RANGE)).rows}
    assert rows["text_input"] == ["11000", "0.200000"]  # 1000 x $100/1M + 10000 x $10/1M
    assert rows["audio_output"] == ["500", "0.100000"]
    assert rows["text_output"] == ["1000", "0.030000"]
    total = sum(Decimal(cost) for _, cost in rows.values())
    assert total == sum(u.cost_usd for u in in_range())


def test_sessions_reports(admin_client, ledger):
    a1, b, a2, _old = ledger["sessions"]
    top = parse(admin_client.get(f"{BASE}top-sessions/", RANGE)).rows
    assert [r[0] for r in top] == [str(a1.id), str(b.id), str(a2.id)]
    assert top[2][5] == "(open)"
    clients = parse(admin_client.get(f"{BASE}top-clients/", RANGE)).rows
    assert clients[0][:3] == ["203.0.113.1", "2", usd(a1.cost_usd + a2.cost_usd)]
    reasons = {
        r[0]: r[1:] for r in parse(admin_client.get(f"{BASE}sessions-by-end-reason/", RANGE)).rows
    }
    assert reasons == {
        "client_closed": ["1", usd(a1.cost_usd)],
        "budget": ["1", usd(b.cost_usd)],
        "(open)": ["1", usd(a2.cost_usd)],
    }


def test_date_filter_limits_the_rows(admin_client, ledger):
    narrow = {"since": "2026-11-21 00:00", "until": "2026-11-22 00:00"}
    rows = parse(admin_client.get(f"{BASE}spend-by-day/", narrow)).rows
    assert rows == [["2026-11-21 00:00", "1", "0.130000"]]
    wide = {"since": "2026-11-01 00:00", "until": UNTIL}
    assert len(parse(admin_client.get(f"{BASE}spend-by-day/", wide)).rows) == 4


def test_default_range_is_the_last_seven_days(admin_client, db):
    from django.utils import timezone

    session = make_session(started_at=timezone.now() - timedelta(days=1))
    make_usage(session, timezone.now() - timedelta(days=1), "1.5")
    old = make_session(started_at=timezone.now() - timedelta(days=9))
    make_usage(old, timezone.now() - timedelta(days=9), "7")
    rows = parse(admin_client.get(f"{BASE}spend-by-day/")).rows
    assert [r[2] for r in rows] == ["1.500000"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": "yesterday"}, "Enter a valid date/time"),
        ({"since": "2026-11-22", "until": "2026-11-20"}, "must be after its start"),
        ({"since": "2020-01-01", "until": "2026-01-01"}, "at most 400 days"),
    ],
)
def test_bad_dates_show_a_message(admin_client, query, message):
    page = admin_client.get(f"{BASE}spend-by-day/", query)
    assert page.status_code == 400
    assert message in page.content.decode()
    assert 'id="report-table"' not in page.content.decode()
    download = admin_client.get(f"{BASE}spend-by-day/", {**query, "format": "csv"})
    assert download.status_code == 400 and message in download.content.decode()


def test_event_reports_show_recorded_events(admin_client, db):
    RateLimitViolation.objects.create(
        minute=at("2026-11-20 10:00"), rule="status", scope="http", endpoint="/status", count=7
    )
    RateLimitViolation.objects.create(
        minute=at("2026-11-20 10:01"), rule="status", scope="http", endpoint="/status", count=5
    )
    RateLimitViolation.objects.create(
        minute=at("2026-11-01 10:01"), rule="status", scope="http", endpoint="/status", count=99
    )
    ToolCallCount.objects.create(
        minute=at("2026-11-20 10:00"), tool="weather", status="ok", count=3
    )
    ToolCallCount.objects.create(
        minute=at("2026-11-20 10:02"), tool="weather", status="refused", count=2
    )
    BreakerEvent.objects.create(at=at("2026-11-20 10:00"), kind="opened", hour_cost_usd="101")
    BreakerEvent.objects.create(at=at("2026-11-20 10:30"), kind="reset", actor="admin")
    violations = parse(admin_client.get(f"{BASE}violations/", RANGE)).rows
    assert violations == [
        ["status", "http", "/status", "no", "12", "2", "2026-11-20 10:00", "2026-11-20 10:01"]
    ]
    tools = parse(admin_client.get(f"{BASE}tool-calls/", RANGE)).rows
    assert tools == [["weather", "5", "3", "2", "0", "0", "0"]]
    breaker = parse(admin_client.get(f"{BASE}breaker-events/", RANGE)).rows
    assert [r[1] for r in breaker] == ["opened", "reset"] and breaker[1][4] == "admin"


def test_budget_report_is_live(admin_client, db, no_redis, quiet_events):
    from quotas.policies import policy_cache
    from quotas.spend import spend_counters

    budget = policy_cache.get().budget
    charge(spend_counters(), "s1", 12_500_000, budget)  # $12.50 of a $50 hourly cap
    page = admin_client.get(f"{BASE}budget/")
    rows = {r[0]: r[1:] for r in parse(page).rows}
    assert rows["rolling hour spend (counters)"] == ["12.500000", ""]
    assert rows["hourly cap"] == ["50.000000", "25.0"]
    assert rows["breaker threshold"] == ["100.000000", "12.5"]
    assert "Circuit breaker: closed" in page.content.decode()


# -- the command ---------------------------------------------------------------------------


def run(*args):
    out = io.StringIO()
    call_command("quotas_report", *args, stdout=out)
    return out.getvalue()


def test_command_prints_the_same_figures_in_every_format(admin_client, ledger):
    page_rows = parse(admin_client.get(f"{BASE}spend-by-model/", RANGE)).rows
    common = ["--since", "2026-11-19", "--until", "2026-11-23T00:00:00+00:00"]
    as_csv = run(*common, "--report", "spend-by-model", "--format", "csv")
    assert list(csv.reader(io.StringIO(as_csv)))[1:] == page_rows
    as_json = json.loads(run(*common, "--report", "spend-by-model", "--format", "json"))
    assert [[str(v) for v in row.values()] for row in as_json[0]["rows"]] == page_rows
    assert as_json[0]["rows"][0]["records"] == 3  # counts stay integers
    table = run(*common, "--report", "spend-by-model")
    for row in page_rows:
        assert row[0] in table and row[-1] in table
    everything = json.loads(run(*common, "--format", "json"))
    assert [r["report"] for r in everything] == list(REPORTS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last week"], "is not an ISO date"),
        (["--since", "2026-11-22", "--until", "2026-11-20"], "must be after its start"),
    ],
)
def test_command_bad_dates(db, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


# -- top users, limits against their tightest spend limit, budget refusals -------------------


@pytest.fixture
def spenders(db):
    """Users (one in the gold tier) and clients with spend in and around the current windows.

    Besides the fresh-install client limits (client-hour $10 / 3600 s, client-day $20 /
    86400 s): user-hour $3 (gold: $6) per hour, user-day $5 per rolling day, a shadow
    $0.50 per 10 min and a disabled $0.01 (neither may be the tightest).
    """
    from django.contrib.auth.models import Group
    from django.utils import timezone

    from quotas.models import SpendLimit

    now = timezone.now()
    users = get_user_model().objects
    gold = Group.objects.create(name="gold")
    ann = users.create_user("ann", password="pw")
    ann.groups.add(gold)
    bob = users.create_user("bob", password="pw")
    carl = users.create_user("carl", password="pw")
    rolling = {"key": "user", "period": "rolling"}
    SpendLimit.objects.create(name="user-hour", cap_usd="3", window_seconds=3600, **rolling)
    SpendLimit.objects.create(
        name="gold-hour", cap_usd="6", window_seconds=3600, group=gold, **rolling
    )
    SpendLimit.objects.create(name="user-day", cap_usd="5", window_seconds=86400, **rolling)
    SpendLimit.objects.create(
        name="watch", cap_usd="0.50", window_seconds=600, shadow=True, **rolling
    )
    SpendLimit.objects.create(
        name="off", cap_usd="0.01", window_seconds=3600, enabled=False, **rolling
    )

    def session(client, started, usage, user=None, open_=False):
        started_at = now - started
        last = max((now - ago for ago, _ in usage), default=started_at)
        row = make_session(
            client,
            started_at=started_at,
            user=user,
            ended_at=None if open_ else last + timedelta(minutes=1),
            end_reason="" if open_ else "client_closed",
        )
        for ago, cost in usage:
            make_usage(row, now - ago, cost)
        row.cost_usd = sum(Decimal(cost) for _, cost in usage)
        row.save()
        return row

    minutes = lambda n: timedelta(minutes=n)  # noqa: E731
    # ann: two sessions in the range, and an open one from before it still spending now.
    a1 = session("203.0.113.1", minutes(180), [(minutes(175), "2.00")], ann)
    a2 = session("203.0.113.1", minutes(30), [(minutes(20), "1.50")], ann)
    session("203.0.113.1", timedelta(days=8), [(minutes(10), "0.25")], ann, open_=True)
    # bob: one session now, one long ago; an anonymous session on bob's client.
    b1 = session("203.0.113.2", minutes(40), [(minutes(30), "2.40")], bob)
    session("203.0.113.2", timedelta(days=10), [(timedelta(days=10), "9.00")], bob)
    anon = session("203.0.113.2", minutes(90), [(minutes(80), "4.00")])
    # carl: nothing started in the range (a window sum alone makes no row).
    session("203.0.113.3", timedelta(days=9), [(minutes(5), "0.70")], carl, open_=True)
    return {"now": now, "ann": (a1, a2), "bob": b1, "anon": anon}


def shown(moment):
    from django.utils import timezone

    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


def test_top_users_show_their_tightest_limit(admin_client, spenders):
    ann_last, bob_last = shown(spenders["ann"][1].started_at), shown(spenders["bob"].started_at)
    page = admin_client.get(f"{BASE}top-users/")
    assert page.status_code == 200
    assert parse(page).rows == [
        # gold replaces user-hour for ann: $6 - 1.75 left, user-day $5 - 3.75 is tighter.
        [
            "ann",
            "2",
            "3.500000",
            ann_last,
            "user-day",
            "rolling 86400 s",
            "5.000000",
            "3.750000",
            "75.0",
        ],
        [
            "bob",
            "1",
            "2.400000",
            bob_last,
            "user-hour",
            "rolling 3600 s",
            "3.000000",
            "2.400000",
            "80.0",
        ],
    ]
    content = page.content.decode()
    assert "Signed-in users only" in content
    download = admin_client.get(f"{BASE}top-users/", {"format": "csv"})
    lines = list(csv.reader(io.StringIO(download.content.decode())))
    assert lines[0] == [
        "user",
        "sessions",
        "cost (USD)",
        "last session",
        "tightest limit",
        "its window",
        "limit cap (USD)",
        "spent in the window (USD)",
        "% of the limit",
    ]
    assert lines[1:] == parse(page).rows


def test_top_clients_show_their_tightest_client_limit(admin_client, spenders):
    hour = ["client-hour", "rolling 3600 s", "10.000000"]
    page = admin_client.get(f"{BASE}top-clients/")
    assert parse(page).rows == [
        [
            "203.0.113.2",
            "2",
            "6.400000",
            shown(spenders["bob"].started_at),
            *hour,
            "2.400000",
            "24.0",
        ],
        [
            "203.0.113.1",
            "2",
            "3.500000",
            shown(spenders["ann"][1].started_at),
            *hour,
            "1.750000",
            "17.5",
        ],
    ]


def test_a_calendar_limit_window_starts_at_local_midnight(db, settings):
    from quotas.models import SpendLimit
    from quotas.reports import Period, cells, top_clients

    settings.QUOTAS_BUDGET_TIMEZONE = "America/New_York"
    SpendLimit.objects.create(name="client-today", key="client", cap_usd="1.50", period="day")
    session = make_session("192.0.2.7", started_at=at("2026-11-20 04:00"))
    make_usage(session, at("2026-11-20 04:30"), "2.00")  # 23:30 the day before, in New York
    make_usage(session, at("2026-11-20 06:00"), "1.00")  # 01:00 local: today
    session.cost_usd = Decimal("3.00")
    session.save()
    period = Period(at("2026-11-19 00:00"), at("2026-11-21 00:00"))
    result = top_clients(period, now=at("2026-11-20 15:00"))
    assert cells(result) == [
        [
            "192.0.2.7",
            "1",
            "3.000000",
            "2026-11-20 04:00",
            "client-today",
            "day",
            "1.500000",
            "1.000000",
            "66.7",
        ]
    ]


def test_top_users_and_clients_take_one_ledger_query_whatever_the_rows(db, spenders):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from quotas.reports import Period, top_clients, top_users

    def ledger_queries(build):
        with CaptureQueriesContext(connection) as queries:
            build(Period.last_days())
        return [q["sql"] for q in queries if "quotas_quotasession" in q["sql"]]

    few = [len(ledger_queries(build)) for build in (top_users, top_clients)]
    for number in range(5):
        user = get_user_model().objects.create_user(f"user{number}")
        make_usage(make_session(f"192.0.2.{number}", user=user), at("2026-11-20 10:05"), "1")
    assert [len(ledger_queries(build)) for build in (top_users, top_clients)] == few == [1, 1]


def test_anonymous_sessions_are_not_users(admin_client, db):
    from django.utils import timezone

    make_usage(make_session(started_at=timezone.now()), timezone.now(), "1.00")
    assert parse(admin_client.get(f"{BASE}top-users/")).rows == [["No rows in this range."]]
    assert len(parse(admin_client.get(f"{BASE}top-clients/")).rows) == 1


@pytest.fixture
def refusals(db):
    """Budget refusals at connect (violation rows) and mid-session (end reasons)."""

    def violation(minute, rule, count, **fields):
        fields.setdefault("scope", "websocket")
        fields.setdefault("endpoint", "/session")
        RateLimitViolation.objects.create(minute=at(minute), rule=rule, count=count, **fields)

    violation("2026-11-20 10:00", "budget:client_budget", 3)
    violation("2026-11-20 10:01", "budget:client_budget", 2)
    violation("2026-11-21 08:00", "budget:concurrent_sessions", 1)
    violation("2026-11-21 09:00", "budget:hourly_cap", 1)
    violation("2026-11-20 10:00", "status", 7, scope="http", endpoint="/status")  # not a budget
    violation("2026-11-10 10:00", "budget:client_budget", 50)  # before the range

    def ended(reason, when, started="2026-11-20 09:00"):
        make_session(started_at=at(started), ended_at=at(when), end_reason=reason)

    ended("client_budget", "2026-11-20 09:30")
    ended("client_budget", "2026-11-21 09:30")
    ended("breaker", "2026-11-19 00:10", started="2026-11-18 23:50")  # ended in the range
    ended("budget", "2026-11-22 12:00")
    ended("client_closed", "2026-11-20 09:40")  # not a refusal
    ended("duration", "2026-11-20 09:45")  # not a budget refusal either
    ended("hourly_cap", "2026-11-23 00:00", started="2026-11-22 23:00")  # after the range


EXPECTED_REFUSALS = [
    ["client spend limit", "client_budget", "at connect", "5"],
    ["client spend limit", "client_budget", "in session", "2"],
    ["circuit breaker", "breaker", "in session", "1"],
    ["session cap", "budget", "in session", "1"],
    ["concurrent sessions per client", "concurrent_sessions", "at connect", "1"],
    ["hourly cap", "hourly_cap", "at connect", "1"],
]


def test_budget_refusals_by_cap_and_reason(admin_client, refusals):
    page = admin_client.get(f"{BASE}budget-refusals/", RANGE)
    assert page.status_code == 200
    assert parse(page).rows == EXPECTED_REFUSALS
    assert parse(page).svg_shapes > 0
    chart = page.content.decode().split('id="report-chart"')[1].split("</figure>")[0]
    assert "client_budget (at connect)" in chart
    download = admin_client.get(f"{BASE}budget-refusals/", {**RANGE, "format": "csv"})
    lines = list(csv.reader(io.StringIO(download.content.decode())))
    assert lines[0] == ["cap", "reason", "where", "refusals"]
    assert lines[1:] == EXPECTED_REFUSALS


def test_budget_refusals_from_the_connection_guard(admin_client, db):
    """A refusal the guard records (rule ``budget:<reason>``) shows up at connect."""
    from quotas import events

    events.record_violation("budget:user_budget", "websocket", "/session")
    events.record_violation("budget:user_budget", "websocket", "/session")
    events.flush()
    rows = parse(admin_client.get(f"{BASE}budget-refusals/")).rows
    assert rows == [["user spend limit", "user_budget", "at connect", "2"]]


@pytest.mark.parametrize("name", ["top-users", "budget-refusals", "top-clients"])
def test_new_reports_are_staff_only(client, db, name):
    assert name in REPORTS
    anonymous = client.get(f"{BASE}{name}/")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/admin/login/")
    assert client.get(f"{BASE}{name}/", {"format": "csv"}).status_code == 302
    client.force_login(get_user_model().objects.create_user("visitor", password="pw"))
    assert client.get(f"{BASE}{name}/").status_code == 403
    assert client.get(f"{BASE}{name}/", {"format": "csv"}).status_code == 403


def test_index_lists_the_new_reports(admin_client):
    index = admin_client.get(BASE).content.decode()
    for name, title in (("top-users", "Top users"), ("budget-refusals", "Budget refusals")):
        assert f'href="{BASE}{name}/">{title}</a>' in index


def test_command_prints_top_users_as_json(spenders):
    as_json = json.loads(run("top-users", "--format", "json"))
    assert [r["report"] for r in as_json] == ["top-users"]
    ann, bob = as_json[0]["rows"]
    assert (ann["username"], ann["sessions"], ann["cost_usd"]) == ("ann", 2, "3.500000")
    assert (ann["limit_name"], ann["limit_spent_usd"], ann["limit_percent"]) == (
        "user-day",
        "3.750000",
        "75.0",
    )
    assert (bob["username"], bob["limit_name"], bob["limit_percent"]) == (
        "bob",
        "user-hour",
        "80.0",
    )
    both = json.loads(run("top-users", "--report", "budget-refusals", "--format", "json"))
    assert [r["report"] for r in both] == ["top-users", "budget-refusals"]


def test_command_budget_refusals_as_csv(refusals):
    common = ["--since", "2026-11-19", "--until", "2026-11-23"]
    as_csv = run("budget-refusals", *common, "--format", "csv")
    assert list(csv.reader(io.StringIO(as_csv)))[1:] == EXPECTED_REFUSALS


def test_command_unknown_positional_report(db):
    with pytest.raises(CommandError, match="unknown report 'top-dogs'"):
        run("top-dogs")
