"""Reports benchmark: every report over a month of 1M ledger rows on PostgreSQL.

Loads 1,000,000 ``UsageRecord`` rows (20,000 sessions, four models, spread over November
2026) plus a month of per-minute violation and tool-call counts, in the database itself with
``INSERT ... SELECT generate_series`` (seconds, no Python per row), then ANALYZE. Times each
report's ``run_report()`` (queries and formatting; median of 3) and the chart of the largest
one, and prints each against a floor measured in the same run: ``SELECT count(*)`` over the
same month of usage rows. Skips without a PostgreSQL ``DATABASE_URL``. Run with
``DATABASE_URL=postgres://root@127.0.0.1:5432/reportsdb make bench PYTEST_ARGS=-k reports``.
"""

import statistics
import time
from datetime import UTC, datetime

import pytest
from django.db import connection

from quotas.charts import render_chart
from quotas.models import QuotaSession, RateLimitViolation, ToolCallCount, UsageRecord
from quotas.reports import REPORTS, Period, run_report

pytestmark = pytest.mark.benchmark

USAGE_ROWS = 1_000_000
SESSIONS = 20_000
MONTH = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
REPEATS = 3


def _load(cursor):
    usage = UsageRecord._meta.db_table
    sessions = QuotaSession._meta.db_table
    violations = RateLimitViolation._meta.db_table
    tools = ToolCallCount._meta.db_table
    cursor.execute(
        f"""
        INSERT INTO {sessions} (id, client, model, started_at, ended_at, end_reason, cost_usd,
            text_input, cached_text_input, audio_input, cached_audio_input, text_output,
            audio_output)
        SELECT md5(i::text)::uuid, '10.0.' || (i %% 250) || '.' || (i %% 199),
            'gpt-realtime', %s::timestamptz + (i * interval '30 days' / %s),
            %s::timestamptz + (i * interval '30 days' / %s) + interval '10 minutes',
            (array['client_closed','budget','duration','breaker','idle'])[1 + i %% 5],
            (i %% 500) / 100.0, 0, 0, 0, 0, 0, 0
        FROM generate_series(0, %s - 1) AS i
        """,
        [MONTH.since, SESSIONS, MONTH.since, SESSIONS, SESSIONS],
    )
    cursor.execute(
        f"""
        INSERT INTO {usage} (session_id, kind, model, response_id, text_input,
            cached_text_input, audio_input, cached_audio_input, text_output, audio_output,
            cost_usd, unknown_model, created_at)
        SELECT md5((i %% %s)::text)::uuid, 'response',
            (array['gpt-realtime','gpt-5','gpt-5-mini','gpt-realtime-mini'])[1 + i %% 4],
            'resp_' || i, 100 + i %% 50, i %% 30, 1000 + i %% 700, i %% 200, 20 + i %% 10,
            300 + i %% 400, (i %% 9000) / 1000000.0 + 0.01, false,
            %s::timestamptz + (i * interval '30 days' / %s)
        FROM generate_series(0, %s - 1) AS i
        """,
        [SESSIONS, MONTH.since, USAGE_ROWS, USAGE_ROWS],
    )
    minutes = 30 * 24 * 60
    cursor.execute(
        f"""
        INSERT INTO {violations} (minute, rule, scope, endpoint, shadow, count)
        SELECT %s::timestamptz + m * interval '1 minute', r, 'http', '/' || r, false, 1 + m %% 40
        FROM generate_series(0, %s - 1) AS m, unnest(array['status', 'page']) AS r
        """,
        [MONTH.since, minutes],
    )
    cursor.execute(
        f"""
        INSERT INTO {tools} (minute, tool, status, count)
        SELECT %s::timestamptz + m * interval '1 minute', t, s, 1 + m %% 5
        FROM generate_series(0, %s - 1) AS m, unnest(array['weather', 'web_search']) AS t,
            unnest(array['ok', 'refused']) AS s
        """,
        [MONTH.since, minutes],
    )
    cursor.execute(f"ANALYZE {sessions}, {usage}, {violations}, {tools}")


def _median_seconds(action):
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


@pytest.mark.django_db(transaction=True)
def test_reports_over_a_month_of_a_million_rows(bench_report):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL=postgres://...")
    started = time.perf_counter()
    with connection.cursor() as cursor:
        _load(cursor)
    load_seconds = time.perf_counter() - started
    assert UsageRecord.objects.count() == USAGE_ROWS

    def floor_query():
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT count(*) FROM {UsageRecord._meta.db_table} "
                "WHERE created_at >= %s AND created_at < %s",
                [MONTH.since, MONTH.until],
            )
            assert cursor.fetchone()[0] == USAGE_ROWS

    run_report("spend-by-day", MONTH)  # warm caches (price book, policies) once
    floor = _median_seconds(floor_query)
    rows = [("SELECT count(*) floor", floor)]
    for name in REPORTS:
        rows.append((name, _median_seconds(lambda name=name: run_report(name, MONTH))))
    hourly = run_report("spend-by-hour", MONTH)
    assert len(hourly.rows) == 30 * 24
    assert sum(r["records"] for r in hourly.rows) == USAGE_ROWS
    rows.append(
        ("chart of spend-by-hour (720 points)", _median_seconds(lambda: render_chart(hourly)))
    )

    print(f"\nloaded {USAGE_ROWS:,} usage rows + events in {load_seconds:.1f} s")
    print(f"{'report over one month':<40} {'median ms':>10} {'x floor':>8}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds * 1000:>10.1f} {seconds / floor:>8.1f}")
    slowest = max(seconds for name, seconds in rows[1 : 1 + len(REPORTS)])
    print(f"slowest report: {slowest * 1000:.0f} ms (bar: under 1000 ms)")
    bench_report(
        "slowest report, 1M usage rows, one month (PostgreSQL)",
        slowest * 1000,
        unit="ms",
        ratio=slowest / floor,
        target="",
    )
    bench_report("slowest report under 1 s", slowest * 1000, unit="ms", target="< 1000")
