"""Shared spend counters: rolling hour, breaker state machine, admission, races, outages."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.db.models import Sum

from quotas import spend as spend_module
from quotas.policies import BudgetSpec
from quotas.redis_client import SharedRedis
from quotas.spend import CLOSED, HALF_OPEN, OPEN, SpendCounters
from quotas.testing import admit, aread, charge
from tests.fixtures.redis_server import spare_port

T0 = 1_800_000_000.0
BUDGET = BudgetSpec(
    session_cap_usd=Decimal("1.00"),
    session_max_seconds=1800,
    hourly_cap_usd=Decimal("5.00"),
    breaker_threshold_usd=Decimal("10.00"),
    breaker_cooldown_seconds=600,
)
USD = 1_000_000  # micro-USD per dollar


@pytest.fixture(autouse=True)
def fresh_spend_counters():
    """No process-wide spend counters (and their in-process twin) leak between tests."""
    spend_module.reset_spend_counters()
    yield
    spend_module.reset_spend_counters()


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=["local", "redis"])
def make_counters(request):
    """Factory of counters on one engine; Redis ones each get their own SharedRedis."""
    if request.param == "local":
        shared_local = []

        def factory(clock):
            counters = SpendCounters(None, timer=clock, ledger=False)
            if shared_local:  # one process: instances share the twin
                counters.local = shared_local[0].local
            shared_local.append(counters)
            return counters

        return factory
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")

    def factory(clock):
        return SpendCounters(SharedRedis(url), timer=clock, prefix=prefix, ledger=False)

    return factory


def test_rolling_hour_forgets_charges_exactly_after_3600_seconds(make_counters):
    clock = Clock()
    counters = make_counters(clock)
    charge(counters, "s1", 2 * USD, BUDGET)
    clock.now = T0 + 1800
    charge(counters, "s1", 1 * USD, BUDGET)
    clock.now = T0 + 3599.999
    assert counters.read(BUDGET).hour_micro == 3 * USD
    clock.now = T0 + 3600  # the first charge is exactly one hour old: out of (now-3600, now]
    assert counters.read(BUDGET).hour_micro == 1 * USD
    clock.now = T0 + 1800 + 3600
    assert counters.read(BUDGET).hour_micro == 0
    # The session total is not a window: it keeps everything.
    assert charge(counters, "s1", 1, BUDGET).session_micro == 3 * USD + 1


def test_same_entry_is_counted_once(make_counters):
    counters = make_counters(Clock())
    first = charge(counters, "s1", 500, BUDGET, member="500:row-1")
    again = charge(counters, "s1", 500, BUDGET, member="500:row-1")
    assert first.added and not again.added
    assert again.session_micro == 500 and again.hour_micro == 500


def test_breaker_state_machine(make_counters):
    clock = Clock()
    counters = make_counters(clock)
    state = charge(counters, "s1", 9 * USD, BUDGET)
    assert state.breaker == CLOSED and not state.tripped
    state = charge(counters, "s2", 1 * USD, BUDGET)  # reaches the $10 threshold
    assert state.breaker == OPEN and state.tripped
    assert state.breaker_until == T0 + 600
    state = charge(counters, "s2", 1 * USD, BUDGET)
    assert state.breaker == OPEN and not state.tripped  # tripped is reported once
    clock.now = T0 + 599
    assert counters.read(BUDGET).breaker == OPEN
    clock.now = T0 + 600  # cool-down over, hour still $11: half open, new sessions allowed
    assert counters.read(BUDGET).breaker == HALF_OPEN
    state = charge(counters, "s3", 1, BUDGET)  # still over the threshold: opens again
    assert state.breaker == OPEN and state.tripped and state.breaker_until == T0 + 1200
    clock.now = T0 + 1200
    assert counters.read(BUDGET).breaker == HALF_OPEN
    clock.now = T0 + 3600  # the rolling hour fell under the threshold: closed
    assert counters.read(BUDGET).breaker == CLOSED


def test_manual_reset_closes_the_breaker(make_counters):
    clock = Clock()
    counters = make_counters(clock)
    assert charge(counters, "s1", 10 * USD, BUDGET).breaker == OPEN
    counters.reset_breaker()
    assert counters.read(BUDGET).breaker == CLOSED
    # Still over the threshold: the next charge opens it again.
    assert charge(counters, "s1", 1, BUDGET).tripped


def test_admission_refuses_over_hourly_cap_with_retry_after(make_counters):
    clock = Clock()
    counters = make_counters(clock)
    assert admit(counters, BUDGET).allowed
    charge(counters, "s1", 3 * USD, BUDGET)
    clock.now = T0 + 1000
    charge(counters, "s2", 2 * USD, BUDGET)  # hour = $5 = the hourly cap
    clock.now = T0 + 1200
    admission = admit(counters, BUDGET)
    assert not admission.allowed and admission.reason == "hourly_cap"
    # Back under the cap when the first $3 leaves the window, at T0 + 3600.
    assert admission.retry_after == 2400
    assert admission.event()["type"] == "quota.exceeded"
    clock.now = T0 + 3600
    assert admit(counters, BUDGET).allowed


def test_admission_refuses_while_breaker_open(make_counters):
    clock = Clock()
    counters = make_counters(clock)
    budget = BudgetSpec(
        hourly_cap_usd=Decimal("20"),
        breaker_threshold_usd=Decimal("10"),
        breaker_cooldown_seconds=600,
    )
    charge(counters, "s1", 10 * USD, budget)
    clock.now = T0 + 100
    admission = admit(counters, budget)
    assert (admission.allowed, admission.reason, admission.retry_after) == (False, "breaker", 500)
    clock.now = T0 + 600
    assert admit(counters, budget).allowed  # half open: the next session may start


def test_two_instances_share_session_hour_and_breaker(redis_url, redis_prefix):
    clock = Clock()
    a = SpendCounters(SharedRedis(redis_url), timer=clock, prefix=redis_prefix, ledger=False)
    b = SpendCounters(SharedRedis(redis_url), timer=clock, prefix=redis_prefix, ledger=False)
    charge(a, "s1", 4 * USD, BUDGET)
    state = charge(b, "s1", 1 * USD, BUDGET)
    assert state.session_micro == 5 * USD and state.hour_micro == 5 * USD
    tripped = charge(a, "s2", 5 * USD, BUDGET)
    assert tripped.tripped and tripped.breaker == OPEN
    seen = charge(b, "s3", 1, BUDGET)
    assert seen.breaker == OPEN and not seen.tripped
    assert b.breaker_state(BUDGET) == OPEN
    clock.now = T0 + 600
    assert b.read(BUDGET).breaker == HALF_OPEN
    assert admit(a, BUDGET).reason == "hourly_cap"  # half open, but the hour is over its cap


def test_concurrent_charges_from_two_instances_are_race_free(redis_url, redis_prefix):
    clock = Clock()
    instances = [
        SpendCounters(
            SharedRedis(redis_url, timeout=10), timer=clock, prefix=redis_prefix, ledger=False
        )
        for _ in range(2)
    ]
    budget = BudgetSpec(
        session_cap_usd=Decimal("1.00"),
        hourly_cap_usd=Decimal("100"),
        breaker_threshold_usd=Decimal("3.00"),
    )
    amount, count = 70_000, 64  # 64 x $0.07 = $4.48 on one session

    def one_charge(i):
        return charge(instances[i % 2], "shared", amount, budget)

    with ThreadPoolExecutor(max_workers=8) as pool:
        states = list(pool.map(one_charge, range(count)))
    # Atomic: every charge saw a distinct running total, none lost.
    assert sorted(s.session_micro for s in states) == [amount * k for k in range(1, count + 1)]
    assert sorted(s.hour_micro for s in states) == [amount * k for k in range(1, count + 1)]
    # Exactly the charges that left the total under the cap report "not over": a relay
    # stopping at the first "over" overshoots by at most one charge.
    under = [s for s in states if not s.session_over(budget)]
    assert len(under) == (1_000_000 - 1) // amount  # totals 0.07 .. 0.98
    # The breaker trips exactly once, on the charge that reached $3.00 (43 x 0.07 = 3.01).
    trips = [s for s in states if s.tripped]
    assert len(trips) == 1 and trips[0].hour_micro == 43 * amount


async def test_concurrent_async_charges_from_two_instances(redis_url, redis_prefix):
    clock = Clock()
    # 200 charges in flight open up to 200 connections at once: on a busy machine a connect
    # can take longer than the production 0.5 s timeout, and a fallback to the per-process
    # twin is not what this test is about.
    a = SpendCounters(
        SharedRedis(redis_url, timeout=10), timer=clock, prefix=redis_prefix, ledger=False
    )
    b = SpendCounters(
        SharedRedis(redis_url, timeout=10), timer=clock, prefix=redis_prefix, ledger=False
    )
    amount, count = 60_000, 200  # $12 in all; the $10 threshold is reached by charge 167
    states = await asyncio.gather(
        *((a if i % 2 else b).acharge("s", amount, BUDGET) for i in range(count))
    )
    assert sorted(s.session_micro for s in states) == [amount * k for k in range(1, count + 1)]
    trips = [s for s in states if s.tripped]
    assert len(trips) == 1 and trips[0].hour_micro == 167 * amount
    final = await aread(a, BUDGET, "s")
    assert final.session_micro == final.hour_micro == amount * count


def test_health_reports_the_breaker(use_redis, db):
    from quotas import health
    from quotas.policies import policy_cache
    from quotas.spend import spend_counters

    assert health.breaker_state() == CLOSED
    budget = policy_cache.get().budget
    charge(spend_counters(), "s1", int(budget.breaker_threshold_usd * USD), budget)
    assert health.breaker_state() == OPEN
    spend_counters().reset_breaker()
    assert health.breaker_state() == CLOSED


# -- Redis outage: book to the ledger, count in process, rebuild Redis from the ledger ---------


@pytest.mark.django_db(transaction=True)
async def test_redis_outage_books_to_ledger_then_rebuilds_counters(redis_server, settings):
    from quotas.defaults import SHEET_EPOCH
    from quotas.models import ModelPrice, QuotaSession, UsageRecord
    from quotas.realtime.meter import SessionMeter
    from quotas.realtime.prices import load_price_sheet

    await database_sync_to_async(load_price_sheet)(ModelPrice, "default", SHEET_EPOCH)
    settings.QUOTAS_FAIL_MODE = "local"
    clock = Clock()
    link = SharedRedis(redis_server.url, timeout=0.2, retry_seconds=0.0, timer=time.monotonic)
    counters = SpendCounters(link, timer=clock, prefix="outage")
    meters = [
        SessionMeter(f"10.0.0.{i}", "gpt-realtime", BUDGET, timer=clock, counters=counters)
        for i in range(2)
    ]
    for meter in meters:
        await meter.open()

    def response(i):
        usage = {"input_tokens": 100 + i, "output_tokens": 50}
        return {"type": "response.done", "response": {"id": f"resp_{i}", "usage": usage}}

    await meters[0].charge_response(response(0))
    await meters[1].charge_response(response(1))
    assert (await aread(counters, BUDGET, None)).engine == "redis"

    redis_server.stop()
    clock.now += 10
    during = await meters[0].charge_response(response(2))
    assert during.booked
    during = await meters[1].charge_response(response(3))
    assert during.booked
    assert await UsageRecord.objects.acount() == 4  # nothing lost while Redis was down
    local = await aread(counters, BUDGET, None)
    assert local.engine == "local"
    # The twin was seeded from the ledger: it knows the charges made before the outage.
    ledger = await UsageRecord.objects.aaggregate(total=Sum("cost_usd"))
    assert local.hour_usd == ledger["total"]

    redis_server.start()  # comes back empty: no persistence
    clock.now += 10
    for _ in range(3):  # the first call may meet a stale pooled connection
        if (await aread(counters, BUDGET, None)).engine == "redis":
            break
    await meters[0].charge_response(response(4))
    await counters.wait_rebuilt()

    client = redis.Redis.from_url(redis_server.url)
    ledger = await UsageRecord.objects.aaggregate(total=Sum("cost_usd"))
    assert Decimal(int(client.get("outage:spend:hour:total"))) / USD == ledger["total"]
    assert client.zcard("outage:spend:hour") == await UsageRecord.objects.acount() == 5
    for meter in meters:
        session = await QuotaSession.objects.aget(pk=meter.session_id)
        in_redis = Decimal(int(client.get(f"outage:spend:session:{meter.session_id}:total"))) / USD
        records = await UsageRecord.objects.filter(session=session).aaggregate(
            total=Sum("cost_usd")
        )
        assert in_redis == session.cost_usd == records["total"]
    for meter in meters:
        await meter.close("client_closed")


@pytest.mark.django_db(transaction=True)
async def test_unreachable_redis_still_books_and_counts(settings):
    from quotas.defaults import SHEET_EPOCH
    from quotas.models import ModelPrice, UsageRecord
    from quotas.realtime.meter import SessionMeter
    from quotas.realtime.prices import load_price_sheet

    await database_sync_to_async(load_price_sheet)(ModelPrice, "default", SHEET_EPOCH)
    clock = Clock()
    link = SharedRedis(f"redis://127.0.0.1:{spare_port()}/0", timeout=0.2, retry_seconds=30)
    counters = SpendCounters(link, timer=clock, prefix="nowhere")
    meter = SessionMeter("10.0.0.9", "gpt-realtime", BUDGET, timer=clock, counters=counters)
    await meter.open()
    usage = {"input_tokens": 1000, "output_tokens": 1000}
    outcome = await meter.charge_response({"response": {"id": "r1", "usage": usage}})
    assert outcome.booked and outcome.cost == Decimal("0.300000")
    assert (await UsageRecord.objects.aget()).cost_usd == Decimal("0.300000")
    state = await aread(counters, BUDGET, meter.session_id)
    assert state.engine == "local" and state.hour_usd == Decimal("0.300000")
    await meter.close("client_closed")  # (also releases the worker thread's DB connection)


def test_reset_breaker_admin_action(admin_client, use_redis, db):
    from quotas.models import BudgetPolicy
    from quotas.policies import policy_cache
    from quotas.spend import spend_counters

    budget = policy_cache.get().budget
    charge(spend_counters(), "s1", int(budget.breaker_threshold_usd * USD), budget)
    assert spend_counters().breaker_state() == OPEN
    policy = BudgetPolicy.objects.get(active=True)
    response = admin_client.post(
        "/admin/quotas/budgetpolicy/",
        {"action": "reset_circuit_breaker", "_selected_action": [policy.pk]},
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("Circuit breaker reset" in m for m in messages)
    assert spend_counters().breaker_state() == CLOSED


def test_async_read_sees_the_breaker(redis_url, redis_prefix):
    clock = Clock()
    counters = SpendCounters(SharedRedis(redis_url), timer=clock, prefix=redis_prefix, ledger=False)
    async_to_sync(counters.acharge)("s", 10 * USD, BUDGET)
    assert async_to_sync(aread)(counters, BUDGET, None).breaker == OPEN


@pytest.mark.parametrize(("mode", "allowed"), [("local", True), ("open", True), ("closed", False)])
def test_admission_per_fail_mode_while_redis_is_down(mode, allowed):
    link = SharedRedis(f"redis://127.0.0.1:{spare_port()}/0", timeout=0.2, retry_seconds=30)
    counters = SpendCounters(link, timer=Clock(), fail_mode=mode, ledger=False)
    admission = admit(counters, BUDGET)
    assert admission.allowed is allowed
    assert admission.state.engine == "local"
    if not allowed:
        assert admission.reason == "breaker" and admission.retry_after == 30
    # Charges are counted in process whatever the mode: money is never ignored.
    assert charge(counters, "s", 5, BUDGET).session_micro == 5
