"""Cost of one rate-limit decision (three matching rules): this limiter against the usual ones.

Run with ``make bench`` (or ``pytest tests/benchmarks/test_bench_limiter.py -m benchmark -s``).
Prints medians and p99 per decision; it checks that every contender admitted its hits but
does not fail on timing, which depends on the machine.

Every contender sees the same traffic: requests from a rotating pool of client addresses,
each matching three rules (60, 100 and 30 hits per minute), so every hit is admitted and
every counter stays small, as with real clients. Contenders run in interleaved rounds so
that load from other processes falls on all of them alike.
"""

import os
import statistics
import time
import uuid

import pytest
import redis
from django.test import RequestFactory

from quotas.limiter import Limit, LocalWindows, RedisWindows
from quotas.redis_client import SharedRedis

pytestmark = pytest.mark.benchmark

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
RULES = (("status", 60), ("default", 100), ("burst", 30))
CLIENTS = 1000
ROUNDS = 10
PER_ROUND = 500
WARMUP = 300


def client_address(i):
    i %= CLIENTS
    return f"10.1.{i // 256}.{i % 256}"


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def measure(contenders):
    """Per-call nanoseconds for each contender, interleaved round by round."""
    samples = {name: [] for name in contenders}
    counters = dict.fromkeys(contenders, 0)
    for name, call in contenders.items():
        for _ in range(WARMUP):
            assert call(counters[name]) is not False, f"{name} refused a hit during warm-up"
            counters[name] += 1
    clock = time.perf_counter_ns
    for _ in range(ROUNDS):
        for name, call in contenders.items():
            out = samples[name]
            first = counters[name]
            for i in range(first, first + PER_ROUND):
                started = clock()
                result = call(i)
                out.append(clock() - started)
                assert result is not False, f"{name} refused hit {i}"
            counters[name] = first + PER_ROUND
    return {
        name: (statistics.median(values) / 1000, percentile(values, 0.99) / 1000)
        for name, values in samples.items()
    }


def print_table(title, figures, ratios):
    print(f"\n{title}")
    print(f"  {'contender':<44} {'median µs':>10} {'p99 µs':>10}")
    for name, (median, p99) in figures.items():
        print(f"  {name:<44} {median:>10.1f} {p99:>10.1f}")
    for label, value, target in ratios:
        print(f"  {label:<44} {value:>10.2f}   target {target}")


@pytest.fixture
def bench_redis():
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"quotas-bench-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{prefix}*", f"*{prefix}*"):
        keys = list(client.scan_iter(pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


MOVING = "limits MovingWindow on RedisStorage (3 hits)"
SLIDING = "limits SlidingWindowCounter on Redis (3 hits)"
DJRL = "django-ratelimit on django-redis (3 rules)"
RAW = "Redis PING on a dedicated connection"


class RawPing:
    """PING over the same kind of connection RedisWindows uses: the transport's own floor."""

    def __init__(self, link):
        pool = link.client.connection_pool
        self.connection = pool.connection_class(**pool.connection_kwargs)

    def __call__(self, i):
        self.connection.send_packed_command([b"*1\r\n$4\r\nPING\r\n"], check_health=False)
        return self.connection.read_response()

    def close(self):
        self.connection.disconnect()


def our_limits(i):
    ip = client_address(i)
    return [Limit(f"{name}:ip:{ip}", limit, 60) for name, limit in RULES]


def test_redis_decision_cost(bench_redis, settings, bench_report):
    """This limiter's one-EVALSHA decision against limits, django-ratelimit and a PING."""
    from django_ratelimit.core import is_ratelimited
    from limits import RateLimitItemPerMinute
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    prefix = bench_redis
    link = SharedRedis(REDIS_URL)
    windows = RedisWindows(link, prefix=prefix)
    ping_client = redis.Redis.from_url(REDIS_URL)

    storage = RedisStorage(REDIS_URL, key_prefix=f"{prefix}-limits")
    moving = MovingWindowRateLimiter(storage)
    sliding = SlidingWindowCounterRateLimiter(storage)
    items = [(name, RateLimitItemPerMinute(limit)) for name, limit in RULES]

    settings.CACHES = {
        **settings.CACHES,
        "ratelimit": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{prefix}-djrl",
        },
    }
    settings.RATELIMIT_USE_CACHE = "ratelimit"
    factory = RequestFactory()
    requests = [factory.get("/status", REMOTE_ADDR=client_address(i)) for i in range(CLIENTS)]
    rates = [(name, f"{limit}/m") for name, limit in RULES]

    def ours(i):
        return windows.hit(our_limits(i)).allowed

    def with_limits(strategy):
        def call(i):
            ip = client_address(i)
            # slowapi calls hit() once per matching limit.
            return all([strategy.hit(item, ip, name) for name, item in items])

        return call

    def django_ratelimit(i):
        request = requests[i % CLIENTS]
        limited = [
            is_ratelimited(request, group=name, key="ip", rate=rate, increment=True)
            for name, rate in rates
        ]
        return not any(limited)

    raw_ping = RawPing(link)
    figures = measure(
        {
            "Redis PING (floor, redis-py client.ping)": lambda i: ping_client.ping(),
            RAW: raw_ping,
            "quotas RedisWindows (1 EVALSHA)": ours,
            MOVING: with_limits(moving),
            SLIDING: with_limits(sliding),
            DJRL: django_ratelimit,
        }
    )
    ping = figures["Redis PING (floor, redis-py client.ping)"][0]
    this = figures["quotas RedisWindows (1 EVALSHA)"][0]
    ratios = [
        ("this / PING", this / ping, "<= 1.5"),
        ("this / PING on a dedicated connection", this / figures[RAW][0], "(info)"),
        ("limits MovingWindow / this", figures[MOVING][0] / this, ">= 2.5"),
        ("limits SlidingWindowCounter / this", figures[SLIDING][0] / this, ">= 2.5"),
        ("django-ratelimit / this", figures[DJRL][0] / this, ">= 5"),
    ]
    print_table(
        f"Rate-limit decision, three rules, Redis at {REDIS_URL} "
        f"({ROUNDS * PER_ROUND} decisions each, {CLIENTS} clients)",
        figures,
        ratios,
    )
    bench_report("limit decision, 3 rules, Redis (median)", this, unit="µs")
    for label, value, target in ratios:
        bench_report(f"limit decision: {label}", value, ratio=value, target=target)
    ping_client.close()
    raw_ping.close()


def test_in_process_decision_cost(bench_report):
    """LocalWindows against limits' MemoryStorage moving window, three rules."""
    from limits import RateLimitItemPerMinute
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter

    windows = LocalWindows()
    moving = MovingWindowRateLimiter(MemoryStorage())
    items = [(name, RateLimitItemPerMinute(limit)) for name, limit in RULES]

    def with_limits(i):
        ip = client_address(i)
        return all([moving.hit(item, ip, name) for name, item in items])

    figures = measure(
        {
            "quotas LocalWindows": lambda i: windows.hit(our_limits(i)).allowed,
            "limits MovingWindow on MemoryStorage": with_limits,
        }
    )
    this = figures["quotas LocalWindows"][0]
    print_table(
        "In-process decision, three rules",
        figures,
        [
            ("LocalWindows median µs", this, "<= 15"),
            (
                "limits memory / this",
                figures["limits MovingWindow on MemoryStorage"][0] / this,
                "(none)",
            ),
        ],
    )
    bench_report("limit decision, 3 rules, in process (median)", this, unit="µs", target="<= 15")
