"""Budget benchmark: charge decisions (Redis and in process) and ledger bookings per second.

Prints a table with floors measured in the same run: a bare Redis PING round trip for the
charge decision, a bare single-row INSERT (own transaction) for the ledger booking. Run with
``make bench`` (SQLite) and again with ``DATABASE_URL=postgres://...`` for PostgreSQL.
"""

import asyncio
import statistics
import time
import uuid
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from quotas import spend as spend_module
from quotas.defaults import SHEET_EPOCH, load_price_sheet
from quotas.meter import SessionMeter
from quotas.models import ModelPrice, UsageRecord
from quotas.policies import BudgetSpec
from quotas.redis_client import SharedRedis
from quotas.spend import SpendCounters

pytestmark = pytest.mark.benchmark

DECISIONS = 5_000
LOCAL_DECISIONS = 50_000
BOOKINGS = 2_000
BUDGET = BudgetSpec(
    session_cap_usd=Decimal("1000000"),
    hourly_cap_usd=Decimal("1000000"),
    breaker_threshold_usd=Decimal("1000000"),
)
USAGE = {
    "input_tokens": 1200,
    "output_tokens": 340,
    "input_token_details": {
        "text_tokens": 200,
        "audio_tokens": 1000,
        "cached_tokens": 600,
        "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 500},
    },
    "output_token_details": {"text_tokens": 40, "audio_tokens": 300},
}
ROWS = []


def _percentile(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(name, samples, total_seconds=None, floor=None):
    total = total_seconds if total_seconds is not None else sum(samples)
    p50 = statistics.median(samples)
    row = {
        "name": name,
        "per_second": len(samples) / total,
        "p50_ms": p50 * 1000,
        "p99_ms": _percentile(samples, 0.99) * 1000,
        "ratio": (p50 / floor) if floor else None,
    }
    ROWS.append(row)
    return row


def _timed(call, count):
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


@pytest.fixture(autouse=True, scope="module")
def print_table():
    yield
    print()
    print(f"{'measure':<72} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x floor':>8}")
    for row in ROWS:
        ratio = f"{row['ratio']:.1f}" if row["ratio"] else "floor"
        print(
            f"{row['name']:<72} {row['per_second']:>8.0f} {row['p50_ms']:>8.3f} "
            f"{row['p99_ms']:>8.3f} {ratio:>8}"
        )


def test_bench_charge_decisions(redis_url, redis_prefix, bench_report):
    link = SharedRedis(redis_url)
    client = link.client
    client.ping()
    ping = _row("floor: bare Redis PING round trip", _timed(client.ping, DECISIONS))
    floor = ping["p50_ms"] / 1000

    counters = SpendCounters(link, prefix=redis_prefix, ledger=False)
    counters.charge("warm", 1, BUDGET)
    sessions = [f"s{i}" for i in range(50)]
    index = iter(range(10**9))

    def redis_charge():
        counters.charge(sessions[next(index) % 50], 1_234, BUDGET)

    redis_row = _row(
        "charge decision, Redis Lua (sync)", _timed(redis_charge, DECISIONS), None, floor
    )
    admit_row = _row(
        "admission check, Redis Lua (sync)",
        _timed(lambda: counters.admit(BUDGET), 1_000),
        None,
        floor,
    )

    async def concurrent():
        samples = []

        async def one(i):
            start = time.perf_counter()
            await counters.acharge(sessions[i % 50], 1_234, BUDGET)
            samples.append(time.perf_counter() - start)

        start = time.perf_counter()
        for batch in range(DECISIONS // 50):
            await asyncio.gather(*(one(batch * 50 + i) for i in range(50)))
        return samples, time.perf_counter() - start

    samples, elapsed = asyncio.run(concurrent())
    _row("charge decision, Redis Lua (async, 50 in flight)", samples, elapsed, floor)

    local = SpendCounters(None, ledger=False)

    def local_charge():
        local.charge(sessions[next(index) % 50], 1_234, BUDGET)

    local_row = _row(
        "charge decision, in process", _timed(local_charge, LOCAL_DECISIONS), None, floor
    )
    bench_report(
        "charge decision, Redis Lua (p50 x PING)",
        redis_row["per_second"],
        unit="/s",
        ratio=redis_row["ratio"],
    )
    bench_report("charge decision, in process", local_row["per_second"], unit="/s")
    # Sanity, not a timed assertion: the decisions did happen.
    assert counters.read(BUDGET).hour_micro >= 1_234 * DECISIONS
    assert local.read(BUDGET).hour_micro == 1_234 * LOCAL_DECISIONS
    assert redis_row["per_second"] > 0 and admit_row["per_second"] > 0
    assert local_row["per_second"] > 0


def _insert_floor(count):
    """One single-row INSERT per transaction: the database's own commit floor."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_floor (amount integer, note varchar(40))")

    def insert():
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO bench_floor (amount, note) VALUES (%s, %s)", [7, "x"])

    try:
        return _timed(insert, count)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE bench_floor")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("engine", ["in-process counters", "Redis counters"])
@pytest.mark.parametrize("conn", ["CONN_MAX_AGE=0", "CONN_MAX_AGE=600"])
def test_bench_ledger_bookings(engine, conn, request, no_redis, bench_report):
    """``database_sync_to_async`` closes connections older than CONN_MAX_AGE after each call:
    with 0 (the project default) every booking opens a new database connection."""
    spend_module._counters.clear()
    load_price_sheet(ModelPrice, "default", SHEET_EPOCH)
    vendor = connection.vendor
    if engine == "Redis counters":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        counters = SpendCounters(SharedRedis(url), prefix=prefix, ledger=False)
    else:
        counters = SpendCounters(None, ledger=False)
    max_age = int(conn.split("=")[1])
    bookings = BOOKINGS if max_age or vendor == "sqlite" else BOOKINGS // 4
    db_settings = connections.settings[DEFAULT_DB_ALIAS]
    saved_age = db_settings.get("CONN_MAX_AGE", 0)
    db_settings["CONN_MAX_AGE"] = max_age
    insert = _row(f"floor: bare 1-row INSERT + commit ({vendor})", _insert_floor(bookings))
    floor = insert["p50_ms"] / 1000
    label = f"{vendor}, {engine}, {conn}"

    async def book_all():
        meter = SessionMeter("bench", "gpt-realtime", BUDGET, counters=counters)
        await meter.open()
        samples = []
        start = time.perf_counter()
        for _ in range(bookings):
            event = {"type": "response.done", "response": {"id": uuid.uuid4().hex, "usage": USAGE}}
            began = time.perf_counter()
            outcome = await meter.charge_response(event)
            samples.append(time.perf_counter() - began)
            assert outcome.booked
        elapsed = time.perf_counter() - start
        await meter.close("client_closed")
        return samples, elapsed

    async def book_many_sessions():
        # 20 sessions at once, as one process serving 20 conversations would.
        meters = [
            SessionMeter(f"c{i}", "gpt-realtime", BUDGET, counters=counters) for i in range(20)
        ]
        for meter in meters:
            await meter.open()
        samples = []

        async def run(meter):
            for _ in range(bookings // 20):
                event = {"response": {"id": uuid.uuid4().hex, "usage": USAGE}}
                began = time.perf_counter()
                await meter.charge_response(event)
                samples.append(time.perf_counter() - began)

        start = time.perf_counter()
        await asyncio.gather(*(run(meter) for meter in meters))
        elapsed = time.perf_counter() - start
        for meter in meters:
            await meter.close("client_closed")
        return samples, elapsed

    async def run_both():
        try:
            return await book_all(), await book_many_sessions()
        finally:
            await sync_to_async(connections.close_all)()

    try:
        (one, one_elapsed), (many, many_elapsed) = asyncio.run(run_both())
    finally:
        db_settings["CONN_MAX_AGE"] = saved_age
    one_row = _row(f"charge_response ({label})", one, one_elapsed, floor)
    many_row = _row(f"charge_response, 20 sessions ({label})", many, many_elapsed, floor)
    bench_report(
        f"ledger booking ({label}, p50 x commit floor)",
        one_row["per_second"],
        unit="/s",
        ratio=one_row["ratio"],
    )
    bench_report(f"ledger booking, 20 sessions ({label})", many_row["per_second"], unit="/s")
    assert UsageRecord.objects.count() == 2 * bookings
    if vendor == "sqlite":
        print(
            f"\nnote: SQLite test database is {connection.settings_dict['NAME']!r}"
            " (in memory unless a file: not a durability figure)"
        )
