"""The moving-window engines against a reference model, on both backends, with a fake clock."""

import asyncio
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotas.limiter import Limit, LocalWindows, RateLimiter, RedisWindows
from quotas.redis_client import SharedRedis
from tests.fixtures.redis_server import redis_server, redis_server_with_password  # noqa: F401

# A realistic epoch plus steps of 1/8 s: every time, window floor and millisecond value is
# exact in binary floating point, so both engines and the model see the same boundaries.
EPOCH = 1_764_000_000.0
STEP = 0.125


class Clock:
    """A settable clock for ``timer=`` arguments."""

    def __init__(self, now=EPOCH):
        self.now = now

    def __call__(self):
        return self.now


class ReferenceWindows:
    """The specification, written plainly: admitted hit times per key, scanned in full."""

    def __init__(self):
        self.admitted = {}

    def in_window(self, key, window, now):
        return [t for t in self.admitted.get(key, []) if now - window < t <= now]

    def hit(self, limits, now):
        counts = [len(self.in_window(lim.key, lim.window_seconds, now)) for lim in limits]
        allowed = all(c < lim.limit for lim, c in zip(limits, counts, strict=True) if lim.enforce)
        if allowed:
            for lim in limits:
                self.admitted.setdefault(lim.key, []).append(now)
            counts = [c + 1 for c in counts]
        return allowed, counts

    def reset(self, limit, now):
        """Seconds until ``limit`` has room for one more hit, as the engines report it."""
        times = self.in_window(limit.key, limit.window_seconds, now)
        if not times:
            return 0.0
        return times[max(0, len(times) - limit.limit)] + limit.window_seconds - now


limit_specs = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=5),  # limit
        st.sampled_from([0.5, 1.0, 2.0, 3.0]),  # window seconds
        st.booleans(),  # enforce (False: shadow)
    ),
    min_size=1,
    max_size=3,
).filter(lambda specs: any(enforce for _, _, enforce in specs))
# Gaps between hits in steps of 1/8 s; 0 means two hits at the same instant.
gaps = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=40)


def make_limits(specs):
    run = uuid.uuid4().hex[:8]
    return [
        Limit(key=f"prop-{run}-{i}", limit=limit, window_seconds=window, enforce=enforce)
        for i, (limit, window, enforce) in enumerate(specs)
    ]


def check_against_model(engine_hit, specs, steps, exact_resets):
    """Drive ``engine_hit(limits, now)`` and the model with the same hits; compare each."""
    limits = make_limits(specs)
    model = ReferenceWindows()
    now = EPOCH
    admitted_times = []
    for step in steps:
        now += step * STEP
        expected_allowed, expected_counts = model.hit(limits, now)
        decision = engine_hit(limits, now)
        assert decision.allowed == expected_allowed, (now - EPOCH, specs)
        assert [s.hits for s in decision.states] == expected_counts
        assert all(s.admitted == expected_allowed for s in decision.states)
        for state in decision.states:
            exact = model.reset(state.limit, now)
            if exact_resets or state.over or state is decision.tightest:
                assert state.reset_seconds == pytest.approx(exact, abs=2e-6)
            else:  # Redis reports only an upper bound for limits that do not decide.
                assert exact - 2e-6 <= state.reset_seconds <= state.limit.window_seconds
        if not decision.allowed:
            assert decision.refusing, "a refusal names the limit that refused"
            assert decision.retry_after > 0
        if expected_allowed:
            admitted_times.append(now)
    # The guarantee itself: no window of any enforced limit ever admits more than its limit.
    # The fullest windows are those ending at an admitted hit.
    for limit in limits:
        if not limit.enforce:
            continue
        for end in admitted_times:
            inside = [t for t in admitted_times if end - limit.window_seconds < t <= end]
            assert len(inside) <= limit.limit


@settings(max_examples=300, deadline=None)
@given(specs=limit_specs, steps=gaps)
def test_local_windows_match_the_model(specs, steps):
    clock = Clock()
    windows = LocalWindows(timer=clock)

    def engine_hit(limits, now):
        clock.now = now
        return windows.hit(limits)

    check_against_model(engine_hit, specs, steps, exact_resets=True)


@pytest.mark.redis
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=limit_specs, steps=gaps)
def test_redis_windows_match_the_model(use_redis, specs, steps):
    clock = Clock()
    limiter = RateLimiter(link=SharedRedis(use_redis), fail_mode="closed", timer=clock)

    def engine_hit(limits, now):
        clock.now = now
        decision = limiter.hit(limits)
        assert decision.engine == "redis"
        return decision

    check_against_model(engine_hit, specs, steps, exact_resets=False)


@pytest.mark.redis
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=limit_specs, steps=gaps)
def test_redis_async_path_matches_the_model(use_redis, specs, steps):
    clock = Clock()
    limiter = RateLimiter(link=SharedRedis(use_redis), fail_mode="closed", timer=clock)

    async def run():
        decisions = []
        limits = make_limits(specs)
        now = EPOCH
        for step in steps:
            now += step * STEP
            clock.now = now
            decisions.append(await limiter.ahit(limits))
        return limits, decisions

    limits, decisions = asyncio.run(run())
    model = ReferenceWindows()
    now = EPOCH
    for step, decision in zip(steps, decisions, strict=True):
        now += step * STEP
        allowed, counts = model.hit(limits, now)
        assert decision.engine == "redis"
        assert decision.allowed == allowed
        assert [s.hits for s in decision.states] == counts


def test_refusal_reports_when_a_slot_frees():
    clock = Clock()
    windows = LocalWindows(timer=clock)
    limit = Limit("k", limit=2, window_seconds=10)
    assert windows.hit([limit]).allowed
    clock.now += 3
    assert windows.hit([limit]).allowed
    clock.now += 1
    refused = windows.hit([limit])
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(6.0)  # the first hit leaves at +10 s
    clock.now += 6.0
    assert windows.hit([limit]).allowed  # exactly when it left: (t - window, t]


def test_shadow_limit_counts_but_never_refuses():
    windows = LocalWindows(timer=Clock())
    shadow = Limit("shadow", limit=1, window_seconds=60, enforce=False)
    enforced = Limit("enforced", limit=10, window_seconds=60)
    decisions = [windows.hit([enforced, shadow]) for _ in range(3)]
    assert all(d.allowed for d in decisions)
    assert [d.states[1].hits for d in decisions] == [1, 2, 3]
    assert [bool(d.shadow_over) for d in decisions] == [False, True, True]
    assert decisions[-1].tightest.limit is enforced  # headers describe enforced limits only


def test_no_limits_is_always_allowed():
    decision = RateLimiter(link=None).hit([])
    assert decision.allowed and decision.states == () and decision.tightest is None


@pytest.mark.redis
def test_two_limiters_on_one_redis_share_one_limit(use_redis):
    """Two 'processes' (own limiter, own connection) never admit more than the limit."""
    first = RateLimiter(link=SharedRedis(use_redis))
    second = RateLimiter(link=SharedRedis(use_redis))
    assert first.link is not second.link
    limit = [Limit(f"shared-{uuid.uuid4().hex}", limit=7, window_seconds=60)]
    outcomes = [(first if i % 2 else second).hit(limit) for i in range(20)]
    assert {d.engine for d in outcomes} == {"redis"}
    assert [d.allowed for d in outcomes] == [True] * 7 + [False] * 13
    assert outcomes[6].states[0].remaining == 0
    assert outcomes[-1].retry_after > 50


@pytest.mark.redis
async def test_async_and_sync_share_counters(use_redis):
    link = SharedRedis(use_redis)
    limiter = RateLimiter(link=link)
    limit = [Limit(f"mixed-{uuid.uuid4().hex}", limit=4, window_seconds=60)]
    results = []
    for i in range(6):
        decision = await limiter.ahit(limit) if i % 2 else limiter.hit(limit)
        results.append((decision.engine, decision.allowed, decision.states[0].hits))
    assert results == [
        ("redis", True, 1),
        ("redis", True, 2),
        ("redis", True, 3),
        ("redis", True, 4),
        ("redis", False, 4),
        ("redis", False, 4),
    ]


@pytest.mark.redis
def test_redis_windows_reload_a_flushed_script(redis_server):
    """After SCRIPT FLUSH (as after a Redis restart) the script is loaded again."""
    windows = RedisWindows(SharedRedis(redis_server.url), prefix="flush")
    limit = [Limit("k", limit=3, window_seconds=60)]
    assert windows.hit(limit).allowed
    redis.Redis.from_url(redis_server.url).script_flush()
    assert windows.hit(limit).states[0].hits == 2


def test_idle_counters_are_swept():
    clock = Clock()
    windows = LocalWindows(timer=clock)
    for i in range(LocalWindows.SWEEP_EVERY - 1):
        windows.hit([Limit(f"client-{i}", limit=5, window_seconds=60)])
    clock.now += 61
    windows.hit([Limit("last", limit=5, window_seconds=60)])  # the sweeping call
    assert set(windows._hits) == {"last"}


@pytest.mark.redis
async def test_password_in_the_url_is_used(redis_server_with_password):
    url = redis_server_with_password.url
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url.replace("s3cret-pass", "wrong")).ping()
    limiter = RateLimiter(link=SharedRedis(url), fail_mode="closed")
    limit = [Limit("auth", limit=2, window_seconds=60)]
    assert limiter.hit(limit).engine == "redis"
    decision = await limiter.ahit(limit)
    assert (decision.engine, decision.states[0].hits) == ("redis", 2)
