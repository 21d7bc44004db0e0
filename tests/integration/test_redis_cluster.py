"""The quota counters on a real 3-master Redis Cluster (``QUOTAS_REDIS_URL=redis+cluster://``).

The limiter, spend and slot suites' Redis cases run again here with ``redis_url`` pointing at
the cluster (the fixtures below override tests/conftest.py's for this module): every script
touches keys of one hash slot (``quotas.hash_tags``), so no call fails with CROSSSLOT (a
failed call would mark the link down, which fails the test here), and a decision for a
request with three rules is one EVALSHA on one node.
"""

import asyncio
import uuid

import pytest
import redis

from quotas.concurrency import SessionSlots
from quotas.limiter import Limit, RateLimiter
from quotas.redis_client import SharedRedis
from quotas.redis_urls import parse_redis_url, sync_client
from quotas.spend import SpendCounters, entry_member
from tests.fixtures.redis_ha import start_redis_cluster
from tests.test_limiter_windows import (  # noqa: F401 (collected here against the cluster)
    test_async_and_sync_share_counters,
    test_redis_async_path_matches_the_model,
    test_redis_windows_match_the_model,
    test_two_limiters_on_one_redis_share_one_limit,
)
from tests.test_spend import (  # noqa: F401
    make_counters,
    test_admission_refuses_over_hourly_cap_with_retry_after,
    test_admission_refuses_while_breaker_open,
    test_async_read_sees_the_breaker,
    test_breaker_state_machine,
    test_concurrent_async_charges_from_two_instances,
    test_concurrent_charges_from_two_instances_are_race_free,
    test_manual_reset_closes_the_breaker,
    test_rolling_hour_forgets_charges_exactly_after_3600_seconds,
    test_same_entry_is_counted_once,
    test_two_instances_share_session_hour_and_breaker,
)
from tests.test_spend_engine import (  # noqa: F401
    BUDGET,
    CLIENT_HOUR,
    GLOBAL_DAY,
    engine,
    test_a_calendar_limit_resets_exactly_at_local_midnight,
    test_a_refused_reservation_holds_nothing,
    test_a_reservation_counts_against_every_cap_until_settled,
    test_a_shadow_limit_counts_but_never_refuses,
    test_admission_refuses_a_spent_client_with_retry_after,
    test_release_gives_the_hold_back,
    test_reservations_do_not_trip_the_breaker_settlements_do,
    test_settling_twice_counts_once,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three masters on spare ports for this module; stopped at its end, whatever happened."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_url(redis_cluster):
    """The suites' Redis, here the cluster."""
    return redis_cluster.url


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test; its keys are deleted afterwards (on every node)."""
    prefix = f"quotas-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = sync_client(parse_redis_url(redis_url))
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def no_failed_call(monkeypatch):
    """Any failed Redis call (CROSSSLOT included) fails the test, whatever the fallback."""
    failures = []
    original = SharedRedis.mark_down

    def mark_down(self, exc):
        failures.append(repr(exc))
        original(self, exc)

    monkeypatch.setattr(SharedRedis, "mark_down", mark_down)
    yield
    assert not failures, failures


def three_rules(client):
    return [
        Limit(f"status:ip:{client}", 60, 60),
        Limit(f"page:ip:{client}", 30, 60),
        Limit(f"default:ip:{client}", 100, 60),
    ]


# A loopback node can stall past the default 0.5 s connect timeout when the machine is busy;
# the link's engine would then fall back for a second and the test read that instead.
CLUSTER_LINK_TIMEOUT_SECONDS = 5.0


def cluster_link(cluster):
    """The quotas link to ``cluster``, patient enough for a busy machine."""
    return SharedRedis(cluster.url, timeout=CLUSTER_LINK_TIMEOUT_SECONDS)


# What moving_window.lua runs inside the script, and what the test's own connections send.
SCRIPT_INNER = {"zadd", "zcard", "pexpire", "zremrangebyscore", "zrange"}
OWN = {"hello", "info", "config|resetstat", "config"}


def client_commands(cluster):
    """Commands the clients sent to the nodes (INFO commandstats; inside a script not)."""
    calls = cluster.commandstats()
    return sum(count for name, count in calls.items() if name not in SCRIPT_INNER | OWN)


def test_a_three_rule_decision_is_one_script_on_one_node(redis_cluster, redis_prefix):
    link = cluster_link(redis_cluster)
    limiter = RateLimiter(link=link, fail_mode="closed")
    limiter.redis.prefix = redis_prefix
    limiter.redis._key_prefix = f"{redis_prefix}:rl:"
    clients = [f"10.9.{i}.1" for i in range(20)]
    for client in clients:  # the slot map and the script are loaded once, before counting
        assert limiter.hit(three_rules(client)).engine == "redis"
    redis_cluster.reset_stats()
    for client in clients:
        decision = limiter.hit(three_rules(client))
        assert decision.engine == "redis" and decision.allowed
        assert [s.hits for s in decision.states] == [2, 2, 2]
    assert redis_cluster.commandstats().get("evalsha", 0) == len(clients)
    assert client_commands(redis_cluster) == len(clients)

    async def decide_async():
        for client in clients:
            assert (await limiter.ahit(three_rules(client))).engine == "redis"

    asyncio.run(decide_async())  # a fresh loop loads its client's slot map first
    redis_cluster.reset_stats()
    asyncio.run(decide_async())
    assert redis_cluster.commandstats().get("evalsha", 0) == len(clients)


def test_clients_spread_over_the_masters(redis_cluster, redis_prefix):
    link = cluster_link(redis_cluster)
    limiter = RateLimiter(link=link, fail_mode="closed")
    limiter.redis._key_prefix = f"{redis_prefix}:rl:"
    for i in range(60):
        limiter.hit(three_rules(f"10.8.{i}.7"))
    per_node = []
    for node in redis_cluster.nodes:
        client = node.client()
        try:
            per_node.append(len(list(client.scan_iter(match=f"{redis_prefix}:rl:*"))))
        finally:
            client.close()
    assert sum(per_node) == 180 and all(count > 0 for count in per_node), per_node


def test_a_reservation_is_one_script_and_spend_keys_share_one_slot(redis_cluster, redis_prefix):
    from quotas.caps import Identity

    link = cluster_link(redis_cluster)
    counters = SpendCounters(link, prefix=redis_prefix, ledger=False)
    caps = counters.caps_for(
        BUDGET, Identity("10.7.0.1", 7), limits=(CLIENT_HOUR, GLOBAL_DAY), session_id="s1"
    )
    keys = [key for cap in caps for key in (cap.key, cap.total_key)]
    slots = {redis.cluster.key_slot(key.encode()) for key in [*keys, f"{counters.prefix}:x"]}
    assert len(slots) == 1, keys

    async def reserve(count):
        for i in range(count):
            state = await counters.areserve(caps, 100, entry_member(100, f"r{i}"), BUDGET)
            assert state.engine == "redis" and state.allowed

    asyncio.run(reserve(1))
    redis_cluster.reset_stats()
    asyncio.run(reserve(10))
    assert redis_cluster.commandstats().get("evalsha", 0) == 10
    assert counters.read(BUDGET, "s1").session_micro == 1000  # r0 twice counts once


def test_mixed_owner_hit_refused_by_one_owner_is_taken_back_from_the_other(
    redis_cluster, redis_prefix
):
    """ip and global rules live in two slots: a refusal by one leaves no hit on the other."""
    limiter = RateLimiter(link=cluster_link(redis_cluster), fail_mode="closed")
    limiter.redis._key_prefix = f"{redis_prefix}:rl:"
    client = [Limit("page:ip:10.6.0.1", 3, 60)]
    both = [*client, Limit("burst:global", 2, 60)]
    assert [limiter.hit(both).allowed for _ in range(3)] == [True, True, False]
    refused = limiter.hit(both)
    assert [s.hits for s in refused.states] == [2, 2] and not refused.allowed
    # The refused hits did not count for the client: one more fits, then its own limit.
    assert [limiter.hit(client).allowed for _ in range(2)] == [True, False]


async def test_session_slots_are_shared_on_the_cluster(redis_cluster, settings, redis_prefix):
    settings.QUOTAS_KEY_PREFIX = redis_prefix
    a = SessionSlots(cluster_link(redis_cluster))
    b = SessionSlots(cluster_link(redis_cluster))
    clients = [f"10.5.0.{i}" for i in range(8)]
    for client in clients:
        assert await a.acquire(client, "t1", 2)
        assert await b.acquire(client, "t2", 2)
        assert not await a.acquire(client, "t3", 2)
        await b.release(client, "t2")
        assert await a.acquire(client, "t3", 2)
        assert await a.acquire(client, "t1", 2)  # a refresh of a held slot


def test_scripts_flushed_on_every_node_are_loaded_again(redis_cluster, redis_prefix):
    """As after a node restart: NOSCRIPT on the packed path loads the script on every primary."""
    limiter = RateLimiter(link=cluster_link(redis_cluster), fail_mode="closed")
    limiter.redis._key_prefix = f"{redis_prefix}:rl:"
    assert limiter.hit(three_rules("10.4.0.1")).engine == "redis"
    for node in redis_cluster.nodes:
        client = node.client()
        try:
            client.script_flush()
        finally:
            client.close()
    for i in range(10):
        decision = limiter.hit(three_rules(f"10.4.0.{i + 2}"))
        assert decision.engine == "redis" and decision.allowed
