"""HTTP refusals at the ASGI edge: before Django, same contract, one log line per window."""

import logging
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.asgi import get_asgi_application
from prometheus_client import REGISTRY

from quotas.edge import (
    EdgeRules,
    RateLimitEdge,
    RefusalLog,
    RefusalMemory,
    edge_key,
    refusal_log,
)
from quotas.limiter import Decision, Limit, LimitState, get_limiter
from quotas.models import RateLimitRule
from quotas.policies import policy_cache

pytestmark = pytest.mark.django_db(transaction=True)


class CountingApp:
    """The inner ASGI app, counting the requests that reach it."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        return await self.inner(scope, receive, send)


@pytest.fixture
def edge(settings, no_redis, default_policies):
    settings.ALLOWED_HOSTS = ["testserver"]
    refusal_log.clear()
    inner = CountingApp(get_asgi_application())
    return RateLimitEdge(inner), inner


def client_for(app, address="192.0.2.20"):
    transport = httpx.ASGITransport(app=app, client=(address, 5555))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@sync_to_async
def set_rule(name, **fields):
    RateLimitRule.objects.update_or_create(name=name, defaults=fields)
    policy_cache.invalidate()


async def test_a_refused_request_never_reaches_django_and_keeps_the_contract(edge):
    app, inner = edge
    async with client_for(app) as client:
        allowed = [await client.get("/status") for _ in range(60)]
        refused = await client.get("/status")
    assert {r.status_code for r in allowed} == {200}
    assert inner.calls == 60  # the 61st stopped at the edge
    assert allowed[-1].headers["ratelimit-limit"] == "60"
    assert allowed[-1].headers["ratelimit-remaining"] == "0"
    assert refused.status_code == 429
    body = refused.json()
    assert set(body) == {"error", "detail", "limit", "window_seconds", "retry_after"}
    assert (body["error"], body["limit"], body["window_seconds"]) == ("rate_limited", 60, 60)
    assert refused.headers["retry-after"] == str(body["retry_after"])
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["content-type"] == "application/json"


async def test_user_rules_are_still_decided_after_authentication(edge):
    app, inner = edge
    await set_rule(
        "page-per-user", scope="http", target="/", key="user", limit=2, window_seconds=60
    )
    async with client_for(app, "192.0.2.21") as client:
        codes = [(await client.get("/")).status_code for _ in range(3)]
        last = await client.get("/")
    # Anonymous: the user rule counts the client; Django (the middleware) refuses the 3rd.
    assert codes == [200, 200, 429]
    assert inner.calls == 4
    # The allowed responses carried the tightest of the edge's and the middleware's rules.
    assert last.status_code == 429


async def test_allowed_responses_carry_the_tightest_rule_of_both_layers(edge):
    app, _ = edge
    await set_rule(
        "page-per-user", scope="http", target="/", key="user", limit=5, window_seconds=60
    )
    async with client_for(app, "192.0.2.22") as client:
        first = await client.get("/")
    # The page rule (30/min, edge) vs the user rule (5/min, middleware): 4 left of 5.
    assert first.headers["ratelimit-limit"] == "5"
    assert first.headers["ratelimit-remaining"] == "4"


async def test_a_refusal_is_logged_once_per_rule_and_client_per_window(edge, caplog):
    app, _ = edge
    await set_rule("status", scope="http", target="/status", key="ip", limit=1, window_seconds=60)
    with caplog.at_level(logging.INFO):
        async with client_for(app, "192.0.2.23") as client:
            codes = [(await client.get("/status")).status_code for _ in range(20)]
        async with client_for(app, "192.0.2.24") as other:
            await other.get("/status")
            await other.get("/status")
    assert codes.count(429) == 19
    lines = [r for r in caplog.records if r.name == "quotas.edge"]
    assert len(lines) == 2  # one per client
    assert not [r for r in caplog.records if r.name == "django.request"]


@edge_key
def by_api_key(scope):
    """An edge key function: the X-Api-Key header of the ASGI scope (tests)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.decode()
    return ""


async def test_an_edge_key_function_is_decided_at_the_edge(edge):
    app, inner = edge
    await set_rule(
        "status",
        scope="http",
        target="/status",
        key="tests.test_edge.by_api_key",
        limit=1,
        window_seconds=60,
    )
    async with client_for(app, "192.0.2.25") as first:
        assert (await first.get("/status", headers={"x-api-key": "k1"})).status_code == 200
    before = inner.calls
    async with client_for(app, "192.0.2.26") as second:  # another address, same key
        assert (await second.get("/status", headers={"x-api-key": "k1"})).status_code == 429
    assert inner.calls == before


async def test_unknown_websocket_paths_spend_the_catch_all_rule(
    settings, no_redis, default_policies
):
    from channels.testing import WebsocketCommunicator

    from ducke.routing import websocket_application
    from quotas import events
    from quotas.models import RateLimitViolation

    await set_rule("default", scope="http", target="*", key="ip", limit=2, window_seconds=60)
    app = websocket_application()
    for _ in range(3):
        probe = WebsocketCommunicator(app, "/nope")
        probe.scope["client"] = ("192.0.2.27", 4000)
        connected, _ = await probe.connect()
        assert not connected
    await sync_to_async(events.flush)()
    rows = await sync_to_async(list)(RateLimitViolation.objects.filter(rule="default"))
    assert sum(row.count for row in rows) == 1  # the third probe was over the catch-all


class Clock:
    """An injected monotonic clock."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def refused(limit, reset_seconds, engine="local"):
    """A Decision refusing ``limit`` until ``reset_seconds`` from now."""
    return Decision(False, (LimitState(limit, limit.limit, reset_seconds, False),), engine)


STATUS_LIMIT = Limit(key="status:ip:192.0.2.40", limit=1, window_seconds=3600, label="status")


def test_a_remembered_refusal_stands_until_the_policy_refresh_interval(settings):
    settings.QUOTAS_POLICY_REFRESH_SECONDS = 0.5
    clock, limiter = Clock(), object()
    memory = RefusalMemory(timer=clock)
    memory.remember(limiter, refused(STATUS_LIMIT, 3600.0))
    clock.now += 0.4
    again = memory.recall(limiter, [STATUS_LIMIT])
    assert again is not None and not again.allowed
    (state,) = again.refusing
    assert state.limit == STATUS_LIMIT and state.remaining == 0
    assert state.reset_seconds == pytest.approx(3599.6)  # from the remembered deadline
    clock.now += 0.1  # QUOTAS_POLICY_REFRESH_SECONDS after the refusal: ask the limiter again
    assert memory.recall(limiter, [STATUS_LIMIT]) is None


def test_a_remembered_refusal_ends_when_its_limit_frees():
    clock, limiter = Clock(), object()
    memory = RefusalMemory(timer=clock)
    memory.remember(limiter, refused(STATUS_LIMIT, 0.2))
    clock.now += 0.1
    assert memory.recall(limiter, [STATUS_LIMIT]).refusing[0].reset_seconds == pytest.approx(0.1)
    clock.now += 0.1
    assert memory.recall(limiter, [STATUS_LIMIT]) is None


def test_what_is_not_remembered():
    clock, limiter = Clock(), object()
    memory = RefusalMemory(timer=clock)
    memory.remember(limiter, refused(STATUS_LIMIT, 3600.0, engine="closed"))  # Redis down
    assert memory.recall(limiter, [STATUS_LIMIT]) is None
    memory.remember(limiter, refused(STATUS_LIMIT, 3600.0))
    # Other values of the rule (an edit seen by this process) are another limit.
    raised = Limit(key=STATUS_LIMIT.key, limit=5, window_seconds=3600, label="status")
    assert memory.recall(limiter, [raised]) is None
    # A request with a shadow limit asks the limiter, which counts it.
    shadow = Limit(key="trial:ip:192.0.2.40", limit=1, window_seconds=60, enforce=False)
    assert memory.recall(limiter, [STATUS_LIMIT, shadow]) is None
    # Another limiter (rebuilt after a setting changed) has counters of its own.
    assert memory.recall(object(), [STATUS_LIMIT]) is None
    assert memory.recall(limiter, [STATUS_LIMIT]) is None  # and the old answers are gone


def test_the_refusal_memory_is_bounded():
    clock, limiter = Clock(), object()
    memory = RefusalMemory(timer=clock, size=64)
    for n in range(1000):
        limit = Limit(key=f"status:ip:198.51.{n // 256}.{n % 256}", limit=1, window_seconds=60)
        memory.remember(limiter, refused(limit, 60.0))
        assert len(memory._refused) <= 64
    assert memory.recall(limiter, [limit]) is not None  # the newest is kept


def test_the_refusal_log_is_bounded_and_logs_once_per_window():
    clock = Clock()
    log = RefusalLog(timer=clock)
    assert log.should_log("status", "192.0.2.41", 60)
    assert not log.should_log("status", "192.0.2.41", 60)
    clock.now += 60
    assert log.should_log("status", "192.0.2.41", 60)


def test_the_rules_of_a_path_are_cached_per_snapshot_and_bounded(default_policies):
    from quotas.policies import load_snapshot

    rules = EdgeRules(size=8)
    snapshot = load_snapshot()
    status = rules.of(snapshot, "/status")
    assert [r.name for r in status] == ["status", "default"]
    assert rules.of(snapshot, "/status") is status
    for n in range(100):
        rules.of(snapshot, f"/made-up/{n}")
        assert len(rules._rules) <= 8
    fresh = load_snapshot()
    assert rules.of(fresh, "/status") is not status and rules.of(fresh, "/status") == status


def test_the_client_identity_follows_a_change_of_trusted_proxies(settings):
    from quotas.guards import scope_client_ip

    scope = {"client": ("10.0.0.5", 1), "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
    settings.QUOTAS_TRUSTED_PROXIES = ""
    assert scope_client_ip(scope) == "10.0.0.5"
    settings.QUOTAS_TRUSTED_PROXIES = "10.0.0.0/8"
    assert scope_client_ip(scope) == "203.0.113.9"
    settings.QUOTAS_IPV4_PREFIX = 24
    assert scope_client_ip(scope) == "203.0.113.0/24"


def exceeded(endpoint):
    return REGISTRY.get_sample_value("rate_limit_exceeded_total", {"endpoint": endpoint}) or 0.0


async def test_repeated_refusals_are_answered_from_memory_and_still_counted(
    edge, monkeypatch, settings
):
    from quotas import events
    from quotas.models import RateLimitViolation

    _, inner = edge
    clock = Clock()
    app = RateLimitEdge(inner, memory=RefusalMemory(timer=clock))
    settings.QUOTAS_POLICY_REFRESH_SECONDS = 0.5
    await set_rule("status", scope="http", target="/status", key="ip", limit=1, window_seconds=60)
    limiter = get_limiter()
    asked = []
    real_ahit = limiter.ahit

    async def counting_ahit(limits, now=None):
        asked.append([limit.key for limit in limits])
        return await real_ahit(limits, now)

    monkeypatch.setattr(limiter, "ahit", counting_ahit)
    await sync_to_async(events.discard)()
    before = exceeded("/status")
    async with client_for(app, "192.0.2.42") as client:
        assert (await client.get("/status")).status_code == 200
        first = await client.get("/status")  # refused by the limiter: remembered
        assert len(asked) == 2
        clock.now += 0.25
        again = [await client.get("/status") for _ in range(5)]
        assert len(asked) == 2  # answered from memory
        clock.now += 0.25  # the policy refresh interval is over: ask again
        last = await client.get("/status")
        assert len(asked) == 3
    for response in (first, *again, last):
        assert response.status_code == 429
        body = response.json()
        assert (body["error"], body["limit"], body["window_seconds"]) == ("rate_limited", 1, 60)
        assert 58 <= body["retry_after"] <= 60
        assert response.headers["retry-after"] == str(body["retry_after"])
        assert response.headers["ratelimit-limit"] == "1"
        assert response.headers["ratelimit-remaining"] == "0"
        assert response.headers["ratelimit-reset"] == str(body["retry_after"])
    assert inner.calls == 1
    assert exceeded("/status") - before == 7  # the remembered refusals too
    await sync_to_async(events.flush)()
    rows = await sync_to_async(list)(RateLimitViolation.objects.filter(rule="status"))
    assert sum(row.count for row in rows) == 7


async def test_a_raised_limit_ends_a_remembered_refusal_as_soon_as_it_is_seen(edge):
    _, inner = edge
    app = RateLimitEdge(inner, memory=RefusalMemory(timer=Clock()))  # the clock never moves
    await set_rule("status", scope="http", target="/status", key="ip", limit=1, window_seconds=60)
    async with client_for(app, "192.0.2.43") as client:
        assert [(await client.get("/status")).status_code for _ in range(3)] == [200, 429, 429]
        await set_rule(
            "status", scope="http", target="/status", key="ip", limit=5, window_seconds=60
        )
        assert (await client.get("/status")).status_code == 200


def test_refusals_under_daphne_never_reach_django_and_log_nothing_each(
    daphne_server_factory, tmp_path
):
    probe = tmp_path / "requests.log"
    server = daphne_server_factory(
        DJANGO_SETTINGS_MODULE="tests.edge_probe_settings", EDGE_PROBE_FILE=str(probe)
    )
    before = len(probe.read_text().splitlines())  # the readiness polls of /status
    codes = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(560):
            codes.append(client.get("/status").status_code)
        refused = client.get("/status")
    reached = len(probe.read_text().splitlines()) - before
    assert codes.count(200) == reached  # every allowed request reached Django ...
    assert codes.count(429) >= 500  # ... and not one of the refused ones
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert refused.headers["retry-after"] and refused.headers["ratelimit-limit"] == "60"
    log = Path(server.log_path).read_text()
    assert "Too Many Requests" not in log  # no django.request WARNING per refusal
    assert log.count("quotas.edge") <= 1
