"""Past one Redis: a decision on a Redis Cluster against one Redis, and a Sentinel failover.

Run with ``pytest tests/benchmarks/test_bench_redis_ha.py -m benchmark -s`` (``make bench``
runs it too). Needs the Debian ``redis-server`` and ``redis-cli``; skips without them.

1. One private redis-server and a private 3-master cluster, started the same way on spare
   ports (tests/fixtures/redis_ha.py), in one run: a rate-limit decision on three rules
   (``RedisWindows.hit``: the packed fast path on one Redis, redis-py's ``RedisCluster`` on
   the cluster) and a reservation over six caps (session, client-hour, client-day, user-day,
   hourly, breaker), in interleaved rounds. Target: cluster p50 <= 1.3 x single.
2. A Sentinel group (master, replica, three sentinels; down-after 1 s) and two links, as two
   processes have: decisions alternate between them while the master is SIGKILLed. Reported:
   seconds from the kill until both decide on the new master and see each other's hits
   (limits shared again), and the decisions answered meanwhile (per-process, none refused
   for the outage with ``QUOTAS_FAIL_MODE=local``).
"""

import statistics
import time
import uuid

import pytest
from redis.crc import key_slot

from quotas.caps import Identity
from quotas.limiter import Limit, RateLimiter, RedisWindows
from quotas.redis_client import SharedRedis
from quotas.spend import SpendCounters, entry_member
from quotas.testing import reserve
from tests.benchmarks.test_bench_budget import BUDGET, HOLD_MICRO, LIMITS
from tests.benchmarks.test_bench_limiter import our_limits, print_table
from tests.fixtures.redis_ha import start_redis_cluster, start_sentinel_group, start_single_redis

pytestmark = pytest.mark.benchmark

ROUNDS = 10
PER_ROUND = 400
WARMUP = 300
TARGET = "<= 1.3"
# The same decisions on the cluster with only clients whose keys live on one node: what the
# cluster path costs when the server answering is as busy (and as warm) as the single one.
ONE_NODE = "decision, 3 rules, cluster, clients of one node"


@pytest.fixture
def single_and_cluster(tmp_path):
    """(single redis URL, cluster URL): fresh servers of this run, stopped at its end."""
    single = start_single_redis(tmp_path / "single")
    cluster = None
    try:
        cluster = start_redis_cluster(tmp_path / "cluster")
        yield f"redis://127.0.0.1:{single.port}/0", cluster.url
    finally:
        single.stop()
        if cluster is not None:
            cluster.stop()


def interleaved(contenders):
    """Per-call µs of each contender (median, p99), in rounds that alternate them."""
    samples = {name: [] for name in contenders}
    clock = time.perf_counter_ns
    for name, call in contenders.items():
        for i in range(WARMUP):
            assert call(i), f"{name} refused during warm-up"
    for number in range(ROUNDS):
        for name, call in contenders.items():
            out = samples[name]
            first = WARMUP + number * PER_ROUND
            for i in range(first, first + PER_ROUND):
                started = clock()
                ok = call(i)
                out.append(clock() - started)
                assert ok, f"{name} refused call {i}"
    figures = {}
    for name, values in samples.items():
        ordered = sorted(values)
        figures[name] = (statistics.median(values) / 1000, ordered[int(len(ordered) * 0.99)] / 1000)
    return figures


def decision(url, prefix, clients=None):
    """A 3-rule decision per call; ``clients``: only these client numbers (else all)."""
    windows = RedisWindows(SharedRedis(url), prefix=prefix)

    def call(i):
        result = windows.hit(our_limits(clients[i % len(clients)] if clients else i))
        return result is not None and result.allowed

    return call


def clients_on_one_node(url, prefix):
    """Client numbers whose limiter keys all live on the node of client 0's keys."""
    link = SharedRedis(url)
    windows = RedisWindows(link, prefix=prefix)
    nodes = link.client.nodes_manager

    def node_of(i):
        key = windows.arguments(our_limits(i), 0.0)[0][0]
        return nodes.get_node_from_slot(key_slot(key.encode())).name

    first = node_of(0)
    return [i for i in range(3000) if node_of(i) == first][:1000]


def ping(url, node=None):
    """A bare PING round trip: to the single server, or to one cluster node (``node``: the
    node of client 0's limiter keys), through redis-py. What the server side costs alone."""
    link = SharedRedis(url)
    if node is None:
        client = link.client
    else:
        windows = RedisWindows(link, prefix=node)
        key = windows.arguments(our_limits(0), 0.0)[0][0]
        client = link.client.nodes_manager.get_node_from_slot(
            key_slot(key.encode())
        ).redis_connection

    def call(i):
        return client.ping()

    return call


def reservation(url, prefix):
    counters = SpendCounters(SharedRedis(url), prefix=prefix, ledger=False)
    caps = [
        counters.caps_for(
            BUDGET,
            Identity(client=f"198.51.100.{i % 10}", user_id=7),
            limits=LIMITS,
            session_id=f"s{i}",
        )
        for i in range(50)
    ]

    def call(i):
        member = entry_member(HOLD_MICRO, f"reserved:{uuid.uuid4().hex}")
        state = reserve(counters, caps[i % 50], HOLD_MICRO, member, BUDGET)
        return state.engine == "redis" and state.allowed and state.added

    return call


def test_cluster_against_single_redis(single_and_cluster, bench_report):
    single, cluster = single_and_cluster
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    figures = interleaved(
        {
            "decision, 3 rules, single Redis": decision(single, prefix),
            "decision, 3 rules, 3-master cluster": decision(cluster, prefix),
            ONE_NODE: decision(cluster, prefix, clients_on_one_node(cluster, prefix)),
            "reservation, 6 caps, single Redis": reservation(single, prefix),
            "reservation, 6 caps, 3-master cluster": reservation(cluster, prefix),
            "PING, single Redis": ping(single),
            "PING, a cluster node": ping(cluster, prefix),
        }
    )
    decisions = (
        figures["decision, 3 rules, 3-master cluster"][0]
        / figures["decision, 3 rules, single Redis"][0]
    )
    reservations = (
        figures["reservation, 6 caps, 3-master cluster"][0]
        / figures["reservation, 6 caps, single Redis"][0]
    )
    one_node = figures[ONE_NODE][0] / figures["decision, 3 rules, single Redis"][0]
    pings = figures["PING, a cluster node"][0] / figures["PING, single Redis"][0]
    ratios = [
        ("decision p50: cluster / single", decisions, TARGET),
        ("decision p50: cluster, clients of one node / single", one_node, "(info)"),
        ("reservation p50: cluster / single", reservations, TARGET),
        ("PING p50: a cluster node / single (the servers alone)", pings, "(info)"),
    ]
    print_table(
        f"Redis Cluster against one Redis ({ROUNDS * PER_ROUND} calls each, interleaved)",
        figures,
        ratios,
    )
    for name, (median, _) in figures.items():
        bench_report(f"{name} (median)", median, unit="µs")
    for label, value, target in ratios:
        bench_report(label, value, ratio=value, target=target)


def shared(first, second, number):
    """Both links decide on Redis and the second sees the first's hit (one shared limit)."""
    limit = [Limit(f"probe:ip:{number}-{uuid.uuid4().hex[:6]}", 100, 60)]
    a = first.hit(limit)
    b = second.hit(limit)
    return a.engine == b.engine == "redis" and b.states[0].hits == 2


def test_sentinel_failover(tmp_path, bench_report):
    group = start_sentinel_group(tmp_path / "sentinel")
    try:
        links = [SharedRedis(group.url(0)) for _ in range(2)]
        first, second = (RateLimiter(link=link) for link in links)
        assert shared(first, second, 0)
        served = refused = 0
        number = 1
        group.master.kill()
        killed = time.monotonic()
        while True:
            for limiter in (first, second):
                result = limiter.hit(our_limits(number))
                served += 1
                refused += not result.allowed
            number += 1
            if shared(first, second, number):
                seconds = time.monotonic() - killed
                break
            assert time.monotonic() - killed < 30, "limits not shared again within 30 s"
            time.sleep(0.01)
        promoted = group.master_port() == group.replica.port
    finally:
        group.stop()
    print(
        f"\nSentinel failover: limits shared again {seconds:.2f} s after SIGKILL of the "
        f"master (down-after 1 s); {served} decisions answered meanwhile, {refused} refused; "
        f"replica promoted: {promoted}"
    )
    assert promoted and refused == 0
    bench_report("failover: seconds until limits are shared again", seconds, unit="s")
    bench_report("failover: decisions answered meanwhile", served)
