"""Budget benchmark: spend decisions (Redis and in process), reservations against 6 caps,
ledger bookings and settlements per second.

Prints a table with floors measured in the same run: a bare Redis PING round trip for the
spend decisions, a bare single-row INSERT (own transaction) for the ledger bookings and
settlements. Reservations and settlements are measured in alternating rounds with their
floors and peers, and reported as medians over the rounds, so machine noise hits all alike.
Run with ``make bench`` (SQLite) and again with ``DATABASE_URL=postgres://...`` for
PostgreSQL.
"""

import asyncio
import statistics
import time
import uuid
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from quotas import spend as spend_module
from quotas.caps import Identity
from quotas.defaults import SHEET_EPOCH
from quotas.models import ModelPrice, QuotaSession, UsageRecord
from quotas.policies import BudgetSpec, SpendLimitSpec
from quotas.realtime.meter import SessionMeter
from quotas.realtime.prices import load_price_sheet
from quotas.redis_client import SharedRedis
from quotas.spend import SpendCounters, entry_member
from quotas.testing import admit, charge, reserve, settle

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
# Spend limits large enough that nothing is refused: the benchmark times decisions.
LIMIT_CAP = Decimal("1000000")
LIMITS = (
    SpendLimitSpec("client-hour", "client", LIMIT_CAP, "rolling", 3600),
    SpendLimitSpec("client-day", "client", LIMIT_CAP, "rolling", 86400),
    SpendLimitSpec("user-day", "user", LIMIT_CAP, "day"),
)
SIX_CAPS = ["session", "client-hour", "client-day", "user-day", "hourly"]  # + the breaker hash
ROUND = 500  # decisions per round
ROUNDS = 10
SETTLE_ROUND = 250  # responses per round
SETTLE_ROUNDS = 8
HOLD_MICRO = 60_000  # a response's worst case
EXACT_MICRO = 1_234
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
        "peer": None,
    }
    ROWS.append(row)
    return row


def _round_ratio(rounds, versus):
    """Median over the rounds of (this round's p50 / the other measure's p50 in that round)."""
    return statistics.median(
        statistics.median(mine) / statistics.median(theirs)
        for mine, theirs in zip(rounds, versus, strict=True)
    )


def _rounds_row(name, rounds, *, floor=None, peer=None):
    """A table row from rounds of samples: p50 the median of the rounds' medians, p99 over
    every sample, ratios the median of the per-round ratios (to ``floor`` and ``peer``)."""
    samples = [sample for one in rounds for sample in one]
    row = {
        "name": name,
        "per_second": len(samples) / sum(samples),
        "p50_ms": statistics.median(statistics.median(one) for one in rounds) * 1000,
        "p99_ms": _percentile(samples, 0.99) * 1000,
        "ratio": _round_ratio(rounds, floor) if floor else None,
        "peer": _round_ratio(rounds, peer) if peer else None,
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
    print(f"{'measure':<72} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x floor':>8} {'x peer':>7}")
    for row in ROWS:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else "floor"
        peer = f"{row['peer']:.2f}" if row["peer"] else ""
        print(
            f"{row['name']:<72} {row['per_second']:>8.0f} {row['p50_ms']:>8.3f} "
            f"{row['p99_ms']:>8.3f} {ratio:>8} {peer:>7}"
        )
    print("x peer: reservations and settlements against the 3-counter charge (Redis) or the")
    print("plain booking (ledger), measured in the same rounds")


def test_bench_charge_decisions(redis_url, redis_prefix, bench_report):
    link = SharedRedis(redis_url)
    client = link.client
    client.ping()
    ping = _row("floor: bare Redis PING round trip", _timed(client.ping, DECISIONS))
    floor = ping["p50_ms"] / 1000

    counters = SpendCounters(link, prefix=redis_prefix, ledger=False)
    charge(counters, "warm", 1, BUDGET)
    sessions = [f"s{i}" for i in range(50)]
    index = iter(range(10**9))

    def redis_charge():
        charge(counters, sessions[next(index) % 50], 1_234, BUDGET)

    redis_row = _row(
        "charge decision, Redis Lua (sync)", _timed(redis_charge, DECISIONS), None, floor
    )
    admit_row = _row(
        "admission check, Redis Lua (sync)",
        _timed(lambda: admit(counters, BUDGET), 1_000),
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
        charge(local, sessions[next(index) % 50], 1_234, BUDGET)

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


def _create_floor_table():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_floor (amount integer, note varchar(40))")


def _drop_floor_table():
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_floor")


def _floor_round(count, *, atomic=True):
    """``count`` single-row INSERTs, each its own transaction, timed one by one (sync);
    ``atomic=False``: in autocommit (on PostgreSQL one round trip instead of BEGIN, INSERT,
    COMMIT)."""

    def insert():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_floor (amount, note) VALUES (%s, %s)", [7, "x"])

    def insert_and_commit():
        with transaction.atomic():
            insert()

    return _timed(insert_and_commit if atomic else insert, count)


def _insert_floor(count):
    """One single-row INSERT per transaction: the database's own commit floor."""
    _create_floor_table()
    try:
        return _floor_round(count)
    finally:
        _drop_floor_table()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("engine", ["in-process counters", "Redis counters"])
@pytest.mark.parametrize("conn", ["CONN_MAX_AGE=0", "CONN_MAX_AGE=600"])
def test_bench_ledger_bookings(engine, conn, request, no_redis, bench_report):
    """``database_sync_to_async`` closes connections older than CONN_MAX_AGE after each call:
    with 0 (the project default) every booking opens a new database connection."""
    spend_module.reset_spend_counters()
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


def _timed_each(calls):
    """Time each call of ``calls`` (no-argument callables); returns (samples, results)."""
    samples, results = [], []
    for call in calls:
        start = time.perf_counter()
        results.append(call())
        samples.append(time.perf_counter() - start)
    return samples, results


def test_bench_reservations(redis_url, redis_prefix, bench_report):
    """A reservation and its settlement over 6 caps (session, client-hour, client-day,
    user-day, hourly, breaker) against today's 3-counter charge (session, hourly, breaker)
    and a bare PING, in alternating rounds."""
    link = SharedRedis(redis_url)
    client = link.client
    counters = SpendCounters(link, prefix=redis_prefix, ledger=False)
    local = SpendCounters(None, prefix=redis_prefix, ledger=False)
    sessions = [f"s{i}" for i in range(50)]
    identities = [Identity(client=f"198.51.100.{i % 10}", user_id=7) for i in range(50)]

    def caps_of(engine, i):
        return engine.caps_for(BUDGET, identities[i], limits=LIMITS, session_id=sessions[i])

    caps = [caps_of(counters, i) for i in range(50)]
    local_caps = [caps_of(local, i) for i in range(50)]
    assert [cap.name for cap in caps[0]] == SIX_CAPS
    entry_ids = iter(range(10**9))
    problems = []  # refused reservations, entries not counted: a sanity check

    def ping_round():
        return _timed_each([client.ping] * ROUND)[0]

    def charge_round():
        samples, states = _timed_each(
            [
                lambda i=i: charge(counters, sessions[i % 50], EXACT_MICRO, BUDGET)
                for i in range(ROUND)
            ]
        )
        problems.extend(("charge", state) for state in states if not state.added)
        return samples

    def reserve_settle_rounds(engine, cap_sets):
        holds = [
            (cap_sets[i % 50], entry_member(HOLD_MICRO, f"reserved:{uuid.uuid4().hex}"))
            for i in range(ROUND)
        ]
        reserved, states = _timed_each(
            [lambda c=c, m=m: reserve(engine, c, HOLD_MICRO, m, BUDGET) for c, m in holds]
        )
        problems.extend(("reserve", s) for s in states if not (s.allowed and s.added))
        exact = [entry_member(EXACT_MICRO, next(entry_ids)) for _ in holds]
        settled, states = _timed_each(
            [
                lambda c=c, m=m, e=e: settle(engine, c, m, EXACT_MICRO, e, BUDGET)
                for (c, m), e in zip(holds, exact, strict=True)
            ]
        )
        problems.extend(("settle", s) for s in states if not (s.allowed and s.added))
        return reserved, settled

    # Warm up: the scripts are loaded, the connection is open.
    client.ping()
    charge(counters, "warm", EXACT_MICRO, BUDGET)
    reserve_settle_rounds(counters, caps)
    rounds = {name: [] for name in ("ping", "charge", "reserve", "settle", "lreserve", "lsettle")}
    builds = []
    for number in range(ROUNDS):
        order = ("ping", "charge", "caps") if number % 2 == 0 else ("caps", "charge", "ping")
        for what in order:
            if what == "ping":
                rounds["ping"].append(ping_round())
            elif what == "charge":
                rounds["charge"].append(charge_round())
            else:
                reserved, settled = reserve_settle_rounds(counters, caps)
                rounds["reserve"].append(reserved)
                rounds["settle"].append(settled)
        reserved, settled = reserve_settle_rounds(local, local_caps)
        rounds["lreserve"].append(reserved)
        rounds["lsettle"].append(settled)
        builds.append(_timed_each([lambda i=i: caps_of(counters, i % 50) for i in range(ROUND)])[0])

    ping = rounds["ping"]
    ping_row = _rounds_row("floor: bare Redis PING round trip (rounds)", ping)
    charge_row = _rounds_row(
        "3-counter charge (session, hourly, breaker), Redis Lua (sync)",
        rounds["charge"],
        floor=ping,
    )
    reserve_row = _rounds_row(
        "reservation, 6 caps, Redis Lua (sync)",
        rounds["reserve"],
        floor=ping,
        peer=rounds["charge"],
    )
    settle_row = _rounds_row(
        "settlement, 6 caps, Redis Lua (sync)", rounds["settle"], floor=ping, peer=rounds["charge"]
    )
    local_reserve = _rounds_row("reservation, 6 caps, in process", rounds["lreserve"], floor=ping)
    local_settle = _rounds_row("settlement, 6 caps, in process", rounds["lsettle"], floor=ping)
    build_row = _rounds_row("caps_for, 6 caps (in process, once per decision)", builds, floor=ping)
    print(
        f"\nreservations: p50 ping {ping_row['p50_ms']:.3f} ms, 3-counter charge "
        f"{charge_row['p50_ms']:.3f} ms, reserve {reserve_row['p50_ms']:.3f} ms, settle "
        f"{settle_row['p50_ms']:.3f} ms ({ROUNDS} rounds of {ROUND}, medians over rounds)"
    )
    bench_report(
        "reservation 6 caps, Redis (p50 x 3-counter charge)",
        reserve_row["per_second"],
        unit="/s",
        ratio=reserve_row["peer"],
        target="<= 1.3",
    )
    bench_report(
        "reservation 6 caps, Redis (p50 x PING)",
        reserve_row["per_second"],
        unit="/s",
        ratio=reserve_row["ratio"],
        target="<= 2.5",
    )
    bench_report(
        "3-counter charge, Redis (p50 x PING)",
        charge_row["per_second"],
        unit="/s",
        ratio=charge_row["ratio"],
    )
    bench_report(
        "settlement 6 caps, Redis (p50 x 3-counter charge)",
        settle_row["per_second"],
        unit="/s",
        ratio=settle_row["peer"],
    )
    bench_report(
        "reservation + settlement 6 caps, in process",
        2 / (1 / local_reserve["per_second"] + 1 / local_settle["per_second"]),
        unit="/s",
    )
    bench_report("caps_for 6 caps, in process", build_row["per_second"], unit="/s")
    # Sanity, not a timed assertion: nothing was refused, every entry was counted.
    assert problems == []
    state = counters.read(BUDGET)
    assert state.hour_micro == EXACT_MICRO * (1 + ROUNDS * ROUND + (ROUNDS + 1) * ROUND)
    assert local.read(BUDGET).hour_micro == EXACT_MICRO * ROUNDS * ROUND


def _done(usage=USAGE):
    return {"type": "response.done", "response": {"id": uuid.uuid4().hex, "usage": usage}}


class _Capture:
    """``CaptureQueriesContext`` on the database connection of the ORM's worker thread."""

    def __init__(self):
        self.context = None

    @database_sync_to_async
    def start(self):
        self.context = CaptureQueriesContext(connections[DEFAULT_DB_ALIAS])
        self.context.__enter__()

    @database_sync_to_async
    def stop(self):
        self.context.__exit__(None, None, None)
        return [query["sql"] for query in self.context.captured_queries]


class _Parts:
    """Times named async calls of a meter or its counters while the rounds run (where the
    time of a reservation, a settlement or a plain booking goes)."""

    def __init__(self):
        self.samples = {}
        self._wrapped = []

    def wrap(self, owner, attribute, part):
        call = getattr(owner, attribute)
        samples = self.samples.setdefault(part, [])

        async def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                samples.append(time.perf_counter() - start)

        setattr(owner, attribute, timed)
        self._wrapped.append((owner, attribute))

    def unwrap(self):
        for owner, attribute in self._wrapped:
            delattr(owner, attribute)
        self._wrapped = []

    def median_ms(self, part):
        return statistics.median(self.samples[part]) * 1000 if self.samples.get(part) else 0.0


async def _statements(meter, count):
    """The statements of ``count`` reservations and settlements, as Django logs them."""
    capture = _Capture()
    reserve_sql, settle_sql = [], []
    for _ in range(count):
        await capture.start()
        await meter.reserve_response()
        reserve_sql.append(await capture.stop())
        await capture.start()
        outcome = await meter.charge_response(_done())
        settle_sql.append(await capture.stop())
        assert outcome.booked
    return reserve_sql, settle_sql


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("engine", ["in-process counters", "Redis counters"])
def test_bench_settlements(engine, request, no_redis, bench_report):
    """Per response: ``reserve_response()`` (the hold and its provisional row) then
    ``charge_response()`` (the settlement: the row updated in place, the session's totals,
    the counters' swap), over 6 caps, against a bare INSERT + commit and a plain booking,
    in alternating rounds on a persistent connection."""
    spend_module.reset_spend_counters()
    load_price_sheet(ModelPrice, "default", SHEET_EPOCH)
    user = User.objects.create_user("bench")
    vendor = connection.vendor
    if engine == "Redis counters":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        counters = SpendCounters(SharedRedis(url), prefix=prefix, ledger=False)
    else:
        counters = SpendCounters(None, ledger=False)
    identity = Identity(client="198.51.100.7", user_id=user.pk)
    db_settings = connections.settings[DEFAULT_DB_ALIAS]
    saved_age = db_settings.get("CONN_MAX_AGE", 0)
    db_settings["CONN_MAX_AGE"] = 600
    label = f"{vendor}, {engine}"

    def meter():
        return SessionMeter(
            identity.client,
            "gpt-realtime",
            BUDGET,
            counters=counters,
            identity=identity,
            limits=LIMITS,
        )

    async def settlement_round(settling):
        reserved, settled, cycles = [], [], []
        for _ in range(SETTLE_ROUND):
            start = time.perf_counter()
            admission = await settling.reserve_response()
            middle = time.perf_counter()
            outcome = await settling.charge_response(_done())
            end = time.perf_counter()
            assert admission.allowed, admission.reason
            assert outcome.booked and outcome.exceeded is None
            reserved.append(middle - start)
            settled.append(end - middle)
            cycles.append(end - start)
        return reserved, settled, cycles

    async def plain_round(booking):
        samples = []
        for _ in range(SETTLE_ROUND):
            start = time.perf_counter()
            outcome = await booking.charge_response(_done())
            samples.append(time.perf_counter() - start)
            assert outcome.booked
        return samples

    async def hop_round():
        hop = database_sync_to_async(lambda: None)
        samples = []
        for _ in range(SETTLE_ROUND):
            start = time.perf_counter()
            await hop()
            samples.append(time.perf_counter() - start)
        return samples

    async def async_insert_round():
        # What any one-statement booking from async code costs at least.
        insert = database_sync_to_async(_floor_round)
        samples = []
        for _ in range(SETTLE_ROUND):
            start = time.perf_counter()
            await insert(1, atomic=False)
            samples.append(time.perf_counter() - start)
        return samples

    parts = _Parts()

    async def run():
        settling, booking = meter(), meter()
        await settling.open()
        await booking.open()
        await database_sync_to_async(_create_floor_table)()
        names = ("floor", "autocommit", "hop", "async", "reserve", "settle", "cycle", "plain")
        rounds = {name: [] for name in names}
        try:
            await settlement_round(settling)  # warm up
            await plain_round(booking)
            parts.wrap(settling, "_book_provisional", "reservation: database")
            parts.wrap(settling, "_settle_provisional", "settlement: database")
            parts.wrap(booking, "_book", "plain booking: database")
            parts.wrap(counters, "areserve", "reservation: counters")
            parts.wrap(counters, "asettle", "settlement: counters")
            parts.wrap(counters, "acharge", "plain booking: counters")
            for number in range(SETTLE_ROUNDS):
                order = ("floor", "autocommit", "hop", "async", "settle", "plain")
                for what in order if number % 2 == 0 else reversed(order):
                    if what == "floor":
                        samples = await database_sync_to_async(_floor_round)(SETTLE_ROUND)
                        rounds["floor"].append(samples)
                    elif what == "autocommit":
                        samples = await database_sync_to_async(_floor_round)(
                            SETTLE_ROUND, atomic=False
                        )
                        rounds["autocommit"].append(samples)
                    elif what == "hop":
                        rounds["hop"].append(await hop_round())
                    elif what == "async":
                        rounds["async"].append(await async_insert_round())
                    elif what == "settle":
                        for name, samples in zip(
                            ("reserve", "settle", "cycle"),
                            await settlement_round(settling),
                            strict=True,
                        ):
                            rounds[name].append(samples)
                    else:
                        rounds["plain"].append(await plain_round(booking))
            parts.unwrap()
            statements = await _statements(settling, 20)
            await settling.close("client_closed")
            await booking.close("client_closed")
            return rounds, statements, settling.session_id
        finally:
            parts.unwrap()
            await database_sync_to_async(_drop_floor_table)()
            await sync_to_async(connections.close_all)()

    try:
        rounds, (reserve_sql, settle_sql), session_id = asyncio.run(run())
    finally:
        db_settings["CONN_MAX_AGE"] = saved_age
    floor = rounds["floor"]
    _rounds_row(f"floor: bare 1-row INSERT + commit ({vendor}, rounds)", floor)
    _rounds_row(f"bare 1-row INSERT in autocommit ({vendor})", rounds["autocommit"], floor=floor)
    _rounds_row(f"empty database_sync_to_async call ({vendor})", rounds["hop"], floor=floor)
    _rounds_row(
        f"INSERT in autocommit via database_sync_to_async ({vendor})", rounds["async"], floor=floor
    )
    plain_row = _rounds_row(f"plain booking, 6 caps ({label})", rounds["plain"], floor=floor)
    settle_row = _rounds_row(
        f"settlement: charge_response after a hold ({label})",
        rounds["settle"],
        floor=floor,
        peer=rounds["plain"],
    )
    reserve_row = _rounds_row(
        f"reservation: reserve_response ({label})",
        rounds["reserve"],
        floor=floor,
        peer=rounds["plain"],
    )
    cycle_row = _rounds_row(
        f"reserve + settle, one response ({label})", rounds["cycle"], floor=floor
    )
    print(f"\nwhere the time goes ({label}; p50 ms, each part its own median; the database")
    print("parts include the thread hop):")
    for what, row in (
        ("settlement", settle_row),
        ("reservation", reserve_row),
        ("plain booking", plain_row),
    ):
        print(
            f"  {what:<14} {row['p50_ms']:.3f}: database {parts.median_ms(f'{what}: database'):.3f}"
            f", counters {parts.median_ms(f'{what}: counters'):.3f}"
        )
    for what, captured in (("settlement", settle_sql), ("reservation", reserve_sql)):
        count = statistics.median(len(sql) for sql in captured)
        print(f"  {what}: {count:g} statements as Django logs them (health checks are not)")
        for sql in captured[-1]:
            print(f"    {sql[:110]}")
    # The target is PostgreSQL's; an in-memory SQLite commit is no floor to hold to.
    target = "<= 2.5" if vendor == "postgresql" else ""
    for what, row, goal in (
        ("settlement", settle_row, target),
        ("reservation", reserve_row, ""),
        ("reserve + settle", cycle_row, ""),
        ("plain booking", plain_row, ""),
    ):
        bench_report(
            f"{what} x floor ({label})",
            row["per_second"],
            unit="/s",
            ratio=row["ratio"],
            target=goal,
        )
    # Sanity, not a timed assertion: every response was settled exactly, none left estimated.
    responses = (SETTLE_ROUNDS + 1) * SETTLE_ROUND + 20
    assert UsageRecord.objects.filter(session_id=session_id, estimated=False).count() == responses
    assert not UsageRecord.objects.filter(estimated=True).exists()
    assert QuotaSession.objects.filter(ended_at__isnull=True).count() == 0
