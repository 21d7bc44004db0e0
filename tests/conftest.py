"""Shared fixtures: fresh policy/limiter state per test, and a real Redis when wanted."""

import os
import uuid

import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import connections
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from quotas.policies import policy_cache
from quotas.testing import reset_quota_state, reset_redis_links

# The reuse project (tests/reuse: quotas without ducke) runs in a process of its own, with its
# own settings (tests/test_reuse_project.py); the DUCK-E run does not collect it.
collect_ignore = (
    [] if os.environ.get("DJANGO_SETTINGS_MODULE") == "tests.reuse.settings" else ["reuse"]
)

# Property tests judge what the code returns, never how fast: no per-example deadline and no
# too-slow health check, which a busy machine (CI runs the suite beside its services) trips.
hypothesis_settings.register_profile(
    "ducke", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("ducke")

REDIS_URL_FOR_TESTS = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def redis_required():
    return os.environ.get("QUOTAS_REQUIRE_REDIS") == "1"


@pytest.fixture(autouse=True)
def fresh_quota_state():
    """Each test starts with no cached policies and no in-process counters."""
    reset_process_state()
    yield
    reset_process_state()


def reset_process_state():
    """Forget cached policies, counters, spend totals and Redis links of this process."""
    reset_quota_state()


@pytest.fixture
def redis_url():
    """URL of a real Redis; skips (or fails under QUOTAS_REQUIRE_REDIS=1) when none answers."""
    try:
        redis.Redis.from_url(REDIS_URL_FOR_TESTS, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError as exc:
        message = f"no Redis at {REDIS_URL_FOR_TESTS}: {exc}"
        if redis_required():
            pytest.fail(f"QUOTAS_REQUIRE_REDIS=1 but {message}")
        pytest.skip(message)
    return REDIS_URL_FOR_TESTS


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"quotas-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def use_redis(settings, redis_url, redis_prefix):
    """Point the quotas app at the real Redis with a private key prefix."""
    settings.QUOTAS_REDIS_URL = redis_url
    settings.QUOTAS_KEY_PREFIX = redis_prefix
    reset_redis_links()
    return redis_url


@pytest.fixture
def no_redis(settings):
    """Run with in-process counters only, whatever the environment says."""
    settings.QUOTAS_REDIS_URL = ""
    reset_redis_links()


@pytest.fixture
async def close_worker_connections():
    """Close database connections opened in asgiref's worker thread by async code.

    Otherwise PostgreSQL refuses to drop the test database at the end of the run.
    """
    yield
    await sync_to_async(connections.close_all, thread_sensitive=True)()


@pytest.fixture
def default_policies(django_db_blocker):
    """The fresh-install rules, budget and prices, also in transactional tests (which flush)."""
    from quotas.defaults import load_defaults
    from quotas.models import (
        BudgetPolicy,
        ModelPrice,
        PolicyVersion,
        RateLimitRule,
        SpendLimit,
        ToolPrice,
    )

    with django_db_blocker.unblock():
        load_defaults(RateLimitRule, BudgetPolicy, ModelPrice, PolicyVersion, SpendLimit, ToolPrice)
    policy_cache.invalidate()
