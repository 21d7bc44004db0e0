"""The spend engine over every cap: reservations, settlements, spend limits, tiers, calendar
periods, and the Redis script held to its in-process twin by a property test."""

import asyncio
import time
import zoneinfo
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotas.caps import Identity, applicable_limits, period_bounds
from quotas.policies import BudgetSpec, SpendLimitSpec
from quotas.redis_client import SharedRedis
from quotas.spend import CLOSED, OPEN, SpendCounters, entry_member
from quotas.testing import admit, charge, reserve, settle
from tests.fixtures.spend import T0, Clock, engine  # noqa: F401

USD = 1_000_000
BUDGET = BudgetSpec(
    session_cap_usd=Decimal("1.00"),
    hourly_cap_usd=Decimal("5.00"),
    breaker_threshold_usd=Decimal("10.00"),
    breaker_cooldown_seconds=600,
)
CLIENT_HOUR = SpendLimitSpec("client-hour", "client", Decimal("2.00"), "rolling", 3600)
CLIENT_DAY = SpendLimitSpec("client-day", "client", Decimal("3.00"), "day")
USER_HOUR = SpendLimitSpec("user-hour", "user", Decimal("1.50"), "rolling", 3600)
GLOBAL_DAY = SpendLimitSpec("everyone-day", "global", Decimal("4.00"), "day")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def caps(
    counters,
    client="10.0.0.1",
    session="s1",
    limits=(CLIENT_HOUR, CLIENT_DAY),
    budget=BUDGET,
    **who,
):
    return counters.caps_for(
        budget, Identity(client=client, **who), limits=limits, session_id=session
    )


# -- reservations and settlements ------------------------------------------------------------


def test_a_reservation_counts_against_every_cap_until_settled(engine, settings):
    settings.QUOTAS_BUDGET_TIMEZONE = "UTC"
    budget = BudgetSpec(session_cap_usd=Decimal("5"), hourly_cap_usd=Decimal("50"))
    counters = engine(Clock())
    mine = caps(counters, budget=budget)
    held = reserve(counters, mine, 8 * USD // 10, entry_member(800_000, "r1"), budget)
    assert held.allowed
    # session, client-hour, client-day, the rolling hour
    assert [total for _, total in held.totals] == [800_000] * 4
    # Another session of the same client meets the client's hold.
    other = caps(counters, session="s2", budget=budget)
    refused = reserve(counters, other, 13 * USD // 10, entry_member(1_300_000, "r2"), budget)
    assert not refused.allowed and refused.reason == "client_budget"
    assert refused.refused.name == "client-hour"
    assert refused.retry_seconds == pytest.approx(3600)  # when the hold leaves the window
    # Settled at less than the hold: the difference is free again.
    settled = settle(
        counters, mine, entry_member(800_000, "r1"), 300_000, entry_member(300_000, 41), budget
    )
    assert [total for _, total in settled.totals] == [300_000] * 4
    assert reserve(counters, other, 13 * USD // 10, entry_member(1_300_000, "r2"), budget).allowed


def test_a_refused_reservation_holds_nothing(engine):
    counters = engine(Clock())
    mine = caps(counters, limits=())
    assert not reserve(counters, mine, 2 * USD, entry_member(2 * USD, "big"), BUDGET).allowed
    assert counters.decide("read", mine, BUDGET).hour_micro == 0
    refused = reserve(counters, mine, 2 * USD, entry_member(2 * USD, "big"), BUDGET)
    assert refused.reason == "budget" and refused.retry_seconds == 0  # waiting never helps


def test_settling_twice_counts_once(engine):
    counters = engine(Clock())
    mine = caps(counters, limits=())
    reserve(counters, mine, 500_000, entry_member(500_000, "r"), BUDGET)
    for _ in range(2):
        state = settle(
            counters, mine, entry_member(500_000, "r"), 200_000, entry_member(200_000, 7), BUDGET
        )
    assert state.session_micro == state.hour_micro == 200_000


def test_release_gives_the_hold_back(engine):
    from asgiref.sync import async_to_sync

    counters = engine(Clock())
    mine = caps(counters, limits=())
    reserve(counters, mine, 900_000, entry_member(900_000, "r"), BUDGET)
    state = async_to_sync(counters.arelease)(mine, entry_member(900_000, "r"), BUDGET)
    assert state.session_micro == state.hour_micro == 0


def test_reservations_do_not_trip_the_breaker_settlements_do(engine):
    budget = BudgetSpec(
        session_cap_usd=Decimal("100"),
        hourly_cap_usd=Decimal("100"),
        breaker_threshold_usd=Decimal("1.00"),
        breaker_cooldown_seconds=600,
    )
    counters = engine(Clock())
    mine = counters.caps_for(budget, Identity("10.0.0.9"), session_id="s")
    held = reserve(counters, mine, 2 * USD, entry_member(2 * USD, "r"), budget)
    assert held.allowed and held.breaker == CLOSED
    settled = settle(counters, mine, entry_member(2 * USD, "r"), USD, entry_member(USD, 1), budget)
    assert settled.tripped and settled.breaker == OPEN
    refused = reserve(counters, mine, 1, entry_member(1, "r2"), budget)
    assert refused.reason == "breaker" and refused.retry_seconds == pytest.approx(600)


def test_admission_refuses_a_spent_client_with_retry_after(engine, settings):
    settings.QUOTAS_BUDGET_TIMEZONE = "UTC"
    clock = Clock()
    counters = engine(clock)
    mine = caps(counters, session="s1")
    charge(counters, "s1", USD, BUDGET, member=entry_member(USD, 1), caps=mine)
    clock.now += 600
    charge(counters, "s1", USD, BUDGET, member=entry_member(USD, 2), caps=mine)
    door = caps(counters, session=None)
    admission = admit(counters, BUDGET, door)
    assert not admission.allowed and admission.reason == "client_budget"
    assert admission.retry_after == 3000  # the first dollar leaves the hour
    assert "spending limit" in admission.message
    assert admit(counters, BUDGET, caps(counters, client="10.0.0.2", session=None)).allowed
    clock.now += 3001
    assert admit(counters, BUDGET, door).allowed


def test_a_shadow_limit_counts_but_never_refuses(engine):
    shadow = SpendLimitSpec("watch", "client", Decimal("0.10"), "rolling", 60, shadow=True)
    counters = engine(Clock())
    mine = caps(counters, limits=(shadow,))
    state = reserve(counters, mine, 500_000, entry_member(500_000, "r"), BUDGET)
    assert state.allowed and [cap.name for cap in state.over] == ["watch"]


# -- identity, tiers, calendar periods -----------------------------------------------------------


def test_user_limits_count_per_user_and_per_client_when_anonymous():
    counters = SpendCounters(None, ledger=False)
    signed_in = caps(counters, limits=(USER_HOUR,), user_id=7)
    anonymous = caps(counters, limits=(USER_HOUR,))
    assert signed_in.caps[1].key.endswith(":user-hour:user:7")
    assert anonymous.caps[1].key.endswith(":user-hour:client:10.0.0.1")
    assert signed_in.caps[1].reason == anonymous.caps[1].reason == "user_budget"


def test_a_tier_replaces_the_untiered_limit_for_its_members_and_the_most_generous_wins():
    gold = SpendLimitSpec("gold-hour", "client", Decimal("20"), "rolling", 3600, group_id=1)
    silver = SpendLimitSpec("silver-hour", "client", Decimal("8"), "rolling", 3600, group_id=2)
    other_window = SpendLimitSpec("gold-day", "client", Decimal("50"), "rolling", 86400, group_id=1)
    limits = (CLIENT_HOUR, CLIENT_DAY, gold, silver, other_window)
    names = lambda who: sorted(limit.name for limit in applicable_limits(limits, who))  # noqa: E731
    assert names(Identity("a")) == ["client-day", "client-hour"]
    assert names(Identity("a", user_id=1)) == ["client-day", "client-hour"]
    assert names(Identity("a", user_id=1, group_ids=frozenset({2}))) == [
        "client-day",
        "silver-hour",
    ]
    assert names(Identity("a", user_id=1, group_ids=frozenset({1, 2}))) == [
        "client-day",
        "gold-day",
        "gold-hour",
    ]


def test_calendar_periods_start_at_local_midnight_monday_and_the_first():
    # 2027-03-28 is the night Paris moves to summer time (a 23-hour day).
    now = datetime(2027, 3, 28, 12, 0, tzinfo=PARIS).timestamp()
    start, end = period_bounds("day", now, PARIS)
    assert datetime.fromtimestamp(start, PARIS) == datetime(2027, 3, 28, tzinfo=PARIS)
    assert end - start == 23 * 3600
    start, end = period_bounds("week", now, PARIS)
    assert datetime.fromtimestamp(start, PARIS) == datetime(2027, 3, 22, tzinfo=PARIS)  # Monday
    assert datetime.fromtimestamp(end, PARIS) == datetime(2027, 3, 29, tzinfo=PARIS)
    start, end = period_bounds("month", now, PARIS)
    assert datetime.fromtimestamp(start, PARIS) == datetime(2027, 3, 1, tzinfo=PARIS)
    assert datetime.fromtimestamp(end, PARIS) == datetime(2027, 4, 1, tzinfo=PARIS)


def test_a_calendar_limit_resets_exactly_at_local_midnight(engine, settings):
    settings.QUOTAS_BUDGET_TIMEZONE = "Europe/Paris"
    midnight = datetime(2027, 1, 16, tzinfo=PARIS).timestamp()
    clock = Clock(midnight - 10)
    counters = engine(clock)
    day_only = (CLIENT_DAY,)
    spent = caps(counters, limits=day_only, session=None)
    charge(counters, None, 3 * USD, BUDGET, member=entry_member(3 * USD, 1), caps=spent)
    admission = admit(counters, BUDGET, caps(counters, limits=day_only, session=None))
    assert admission.reason == "client_budget" and admission.retry_after == 10
    clock.now = midnight - 0.001
    assert not admit(counters, BUDGET, caps(counters, limits=day_only, session=None)).allowed
    clock.now = midnight
    assert admit(counters, BUDGET, caps(counters, limits=day_only, session=None)).allowed


# -- the Redis script and its twin agree -------------------------------------------------------

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "release", "charge", "admit", "read", "wait"]),
        st.integers(min_value=0, max_value=3),  # which session / client
        st.integers(min_value=1, max_value=1_500_000),  # amount (micro-USD)
        st.integers(min_value=0, max_value=2000),  # seconds the clock moves (wait)
    ),
    min_size=1,
    max_size=40,
)


def _signature(state):
    return (
        state.allowed,
        state.reason,
        round(state.retry_seconds, 3),
        state.breaker,
        state.tripped,
        state.added,
        tuple(total for _, total in state.totals),
        tuple(cap.name for cap in state.over),
    )


@pytest.mark.redis
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_redis_script_and_twin_decide_alike(operations, redis_url, settings):
    import uuid

    settings.QUOTAS_BUDGET_TIMEZONE = "Europe/Paris"
    clock = Clock()
    prefix = f"quotas-prop-{uuid.uuid4().hex[:8]}"
    shared = SpendCounters(SharedRedis(redis_url), timer=clock, prefix=prefix, ledger=False)
    twin = SpendCounters(None, timer=clock, prefix=prefix, ledger=False)
    shadow = SpendLimitSpec("watch", "global", Decimal("1.00"), "rolling", 900, shadow=True)
    limits = (CLIENT_HOUR, CLIENT_DAY, GLOBAL_DAY, shadow)
    holds = {}
    serial = 0
    try:
        for op, who, amount, wait in operations:
            if op == "wait":
                clock.now += wait
                continue
            serial += 1
            client = f"10.0.0.{who % 2}"
            session = f"s{who}"
            results = []
            for counters in (shared, twin):
                mine = counters.caps_for(
                    BUDGET, Identity(client), limits=limits, session_id=session
                )
                if op == "reserve":
                    state = reserve(
                        counters, mine, amount, entry_member(amount, f"r{serial}"), BUDGET
                    )
                elif op == "settle" and holds.get(session):
                    held = holds[session]
                    state = settle(
                        counters, mine, held, amount // 2, entry_member(amount // 2, serial), BUDGET
                    )
                elif op == "release" and holds.get(session):
                    state = counters.decide("release", mine, BUDGET, remove=holds[session])
                elif op == "charge":
                    state = charge(
                        counters,
                        session,
                        amount,
                        BUDGET,
                        member=entry_member(amount, serial),
                        caps=mine,
                    )
                elif op == "admit":
                    door = counters.caps_for(BUDGET, Identity(client), limits=limits)
                    state = counters.decide("admit", door, BUDGET)
                else:
                    state = counters.decide("read", mine, BUDGET)
                results.append(_signature(state))
            assert results[0] == results[1], (op, who, amount)
            if op == "reserve" and state.allowed:
                holds[session] = entry_member(amount, f"r{serial}")
            elif op in ("settle", "release"):
                holds.pop(session, None)
    finally:
        import redis as redis_py

        client = redis_py.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


async def open_ledger_meter(redis_url, prefix, client):
    """``(counters, policy snapshot, meter)``: Redis spend counters that rebuild from the
    ledger, and an open session meter of ``client`` on them under today's policies."""
    from quotas.policies import policy_cache
    from quotas.realtime.meter import SessionMeter

    counters = SpendCounters(SharedRedis(redis_url), prefix=prefix, ledger=True)
    snapshot = await policy_cache.aget()
    meter = SessionMeter(
        client, "gpt-realtime", snapshot.budget, counters=counters, limits=snapshot.spend_limits
    )
    await meter.open()
    return counters, snapshot, meter


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_rebuild_restores_every_counter_and_the_running_reservation(
    redis_url, redis_prefix, settings, default_policies
):
    """Redis loses everything while a response is reserved: the ledger brings back the
    session, client, hour counters and the hold itself, and settling then counts once."""
    import redis as redis_py

    settings.QUOTAS_BUDGET_TIMEZONE = "UTC"
    counters, snapshot, meter = await open_ledger_meter(redis_url, redis_prefix, "10.0.0.5")
    await meter.charge_transcription("item_1", {"type": "duration", "seconds": 3}, "gpt-realtime")
    meter.note_input_text("Why does my loop never end?")
    assert (await meter.reserve_response()).allowed
    before = await counters.adecide("read", meter.caps(), snapshot.budget)
    held = meter.reservation.micro
    assert before.session_micro > held > 0
    client = redis_py.Redis.from_url(redis_url)
    client.delete(*client.keys(f"{redis_prefix}:spend:*"))
    assert (await counters.adecide("read", meter.caps(), snapshot.budget)).session_micro == 0
    await counters.arebuild_from_ledger()
    after = await counters.adecide("read", meter.caps(), snapshot.budget)
    assert [total for _, total in after.totals] == [total for _, total in before.totals]
    usage = {"input_tokens": 50, "output_tokens": 20}
    await meter.charge_response({"type": "response.done", "response": {"id": "r1", "usage": usage}})
    settled = await counters.adecide("read", meter.caps(), snapshot.budget)
    assert settled.session_micro < after.session_micro  # the hold was replaced, not added to
    from quotas.models import UsageRecord

    ledger = sum([r.cost_usd async for r in UsageRecord.objects.all()])
    assert all(total == int(ledger * USD) for _, total in settled.totals)
    await meter.close("client_closed")


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_hold_settled_while_the_ledger_is_replayed_is_not_put_back(
    redis_url, redis_prefix, settings, default_policies, monkeypatch
):
    """The rebuild reads the ledger while a response is held; that response settles before
    the replay reaches Redis (its swap finds no hold to take out). The replay must not leave
    the hold counted on top of the exact cost."""
    import redis as redis_py

    from quotas import spend as spend_module
    from quotas.models import UsageRecord

    settings.QUOTAS_BUDGET_TIMEZONE = "UTC"
    counters, snapshot, meter = await open_ledger_meter(redis_url, redis_prefix, "10.0.0.6")
    link = counters.link
    meter.note_input_text("Why does my loop never end?")
    assert (await meter.reserve_response()).allowed
    client = redis_py.Redis.from_url(redis_url)
    client.delete(*client.keys(f"{redis_prefix}:spend:*"))  # Redis restarted empty

    read_ledger = spend_module.ledger_entries
    loop = asyncio.get_running_loop()
    ledger_read = asyncio.Event()

    def ledger_then_settlement(*args, **kwargs):
        entries = read_ledger(*args, **kwargs)
        loop.call_soon_threadsafe(ledger_read.set)  # the settlement runs now, before the replay
        return entries

    monkeypatch.setattr(spend_module, "ledger_entries", ledger_then_settlement)
    usage = {"input_tokens": 50, "output_tokens": 20}
    rebuilt = asyncio.Event()

    async def settle_during_rebuild():
        await ledger_read.wait()
        await meter.charge_response(
            {"type": "response.done", "response": {"id": "r1", "usage": usage}}
        )
        rebuilt.set()

    # The replay waits for the settlement: the rebuild's thread holds until it is booked.
    original_run = link.run

    def run_after_settlement(script, keys, args):
        if script is spend_module.REPLAY:
            deadline = time.monotonic() + 10
            while not rebuilt.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)
        return original_run(script, keys, args)

    monkeypatch.setattr(link, "run", run_after_settlement)
    settling = asyncio.create_task(settle_during_rebuild())
    await asyncio.to_thread(counters.rebuild_from_ledger)
    await settling
    monkeypatch.setattr(link, "run", original_run)
    settled = await counters.adecide("read", meter.caps(), snapshot.budget)
    ledger = sum([r.cost_usd async for r in UsageRecord.objects.all()])
    assert await UsageRecord.objects.filter(estimated=True).acount() == 0
    assert all(total == int(ledger * USD) for _, total in settled.totals), settled.totals
    await meter.close("client_closed")
