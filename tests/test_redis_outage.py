"""Redis stopped mid-test: HTTP keeps working per QUOTAS_FAIL_MODE, and recovers by itself."""

import time
import uuid

import httpx
import pytest
from django.core.asgi import get_asgi_application
from prometheus_client import REGISTRY

from quotas.limiter import RateLimiter
from quotas.middleware import limits_for
from quotas.models import RateLimitRule
from quotas.policies import policy_cache
from quotas.redis_client import SharedRedis
from tests.fixtures.redis_server import redis_server  # noqa: F401

pytestmark = [pytest.mark.django_db, pytest.mark.redis]

RETRY_SECONDS = 0.2
STATUS_LIMIT = 4


@pytest.fixture
def quota_redis(settings, redis_server):
    """The app's quotas on a private redis-server that the test may stop and start."""
    from quotas.testing import reset_redis_links

    settings.QUOTAS_REDIS_URL = redis_server.url
    settings.QUOTAS_KEY_PREFIX = f"outage-{uuid.uuid4().hex[:8]}"
    settings.QUOTAS_REDIS_RETRY_SECONDS = RETRY_SECONDS
    reset_redis_links()
    return redis_server


@pytest.fixture
def low_status_limit(db):
    rule = RateLimitRule.objects.get(name="status")
    rule.limit = STATUS_LIMIT
    rule.save()


def other_process_hits(url, count, ip="127.0.0.1", path="/status"):
    """Hits counted by another 'instance': its own limiter and its own Redis connection."""
    other = RateLimiter(link=SharedRedis(url))
    limits = limits_for(policy_cache.get().rules_for("http", path), ip)
    decisions = [other.hit(limits) for _ in range(count)]
    assert {d.engine for d in decisions} == {"redis"}


def wait_for_retry():
    time.sleep(RETRY_SECONDS * 1.5)


def test_local_fail_mode_keeps_serving_and_resynchronises(client, quota_redis, low_status_limit):
    # Redis up: the limit is shared with another instance.
    other_process_hits(quota_redis.url, 2)
    response = client.get("/status")
    assert response.status_code == 200
    assert response.json()["redis"] == "ok"
    assert response["RateLimit-Remaining"] == "1"
    assert client.get("/status").status_code == 200
    assert client.get("/status").status_code == 429

    quota_redis.stop()
    # Redis down: per-process counters, fresh; /status says so; never a 5xx.
    outage = [client.get("/status") for _ in range(STATUS_LIMIT + 2)]
    assert [r.status_code for r in outage] == [200] * STATUS_LIMIT + [429, 429]
    assert outage[0].json()["redis"] == "unavailable"
    assert outage[0].json()["status"] == "degraded"
    assert outage[0]["RateLimit-Remaining"] == str(STATUS_LIMIT - 1)
    assert client.get("/").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert REGISTRY.get_sample_value("quotas_redis_available") == 0

    quota_redis.start()  # empty: no persistence
    wait_for_retry()
    other_process_hits(quota_redis.url, 1)
    response = client.get("/status")
    assert response.status_code == 200
    assert response.json()["redis"] == "ok"
    # Shared again, without restarting the app: the other instance's hit counts here.
    assert response["RateLimit-Remaining"] == str(STATUS_LIMIT - 2)
    assert REGISTRY.get_sample_value("quotas_redis_available") == 1


def test_open_fail_mode_admits_everything_while_down(
    client, quota_redis, low_status_limit, settings
):
    settings.QUOTAS_FAIL_MODE = "open"
    quota_redis.stop()
    responses = [client.get("/status") for _ in range(STATUS_LIMIT * 2)]
    assert {r.status_code for r in responses} == {200}
    assert responses[-1].json()["redis"] == "unavailable"
    quota_redis.start()
    wait_for_retry()
    codes = [client.get("/status").status_code for _ in range(STATUS_LIMIT + 1)]
    assert codes == [200] * STATUS_LIMIT + [429]


def test_closed_fail_mode_refuses_while_down(client, quota_redis, low_status_limit, settings):
    settings.QUOTAS_FAIL_MODE = "closed"
    assert client.get("/status").status_code == 200
    quota_redis.stop()
    for path in ("/status", "/", "/metrics"):
        response = client.get(path)
        assert response.status_code == 429, path
        assert response.json()["error"] == "rate_limited"
        assert int(response["Retry-After"]) >= 1
    quota_redis.start()
    wait_for_retry()
    response = client.get("/status")
    assert response.status_code == 200
    assert response.json()["redis"] == "ok"


async def test_async_path_survives_the_outage(quota_redis, settings, close_worker_connections):
    """Through the ASGI app (async middleware, asyncio Redis client), default limits."""
    from asgiref.sync import sync_to_async

    settings.ALLOWED_HOSTS = ["testserver"]
    limit = 60
    transport = httpx.ASGITransport(app=get_asgi_application(), client=("192.0.2.50", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/status")).json()["redis"] == "ok"
        quota_redis.stop()
        outage = [await http.get("/status") for _ in range(limit + 1)]
        assert [r.status_code for r in outage] == [200] * limit + [429]
        assert outage[0].json()["redis"] == "unavailable"
        quota_redis.start()
        wait_for_retry()
        await sync_to_async(other_process_hits)(quota_redis.url, 1, ip="192.0.2.50")
        response = await http.get("/status")
        assert response.status_code == 200
        assert response.json()["redis"] == "ok"
        assert response.headers["RateLimit-Remaining"] == str(limit - 2)
