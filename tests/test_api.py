"""The public API: quotas.ratelimit on sync and async views, quotas.check, callable keys, URL
names as rule targets, QUOTAS_REFUSAL_VIEW."""

import json

import pytest
from django.core.exceptions import ValidationError
from django.http import HttpResponse, JsonResponse
from django.test import RequestFactory

import quotas
from quotas.limiter import get_limiter
from quotas.models import RateLimitRule
from quotas.policies import policy_cache

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def frozen_limiter(no_redis):
    """One instant for every hit: retry_after is exactly the window."""
    limiter = get_limiter()
    now = limiter.timer()
    for engine in (limiter, limiter.local, limiter.redis):
        if engine is not None:
            engine.timer = lambda: now
    return limiter


def view_rule(name="api-calls", limit=2, key="ip", **fields):
    rule = RateLimitRule(name=name, scope="view", key=key, limit=limit, window_seconds=60, **fields)
    rule.full_clean()
    rule.save()
    policy_cache.invalidate()
    return rule


def by_team(request_or_scope):
    """A key function: the X-Team header of a request (tests)."""
    return request_or_scope.META.get("HTTP_X_TEAM", "")


@quotas.ratelimit("api-calls")
def sync_view(request):
    return HttpResponse("ok")


@quotas.ratelimit("api-calls")
async def async_view(request):
    return HttpResponse("ok")


def get(address="192.0.2.1", **headers):
    request = RequestFactory().get("/api/thing", REMOTE_ADDR=address, **headers)
    from django.contrib.auth.models import AnonymousUser

    request.user = AnonymousUser()
    return request


def test_the_decorator_refuses_the_call_over_the_rule_with_the_429_contract():
    view_rule()
    assert [sync_view(get()).status_code for _ in range(2)] == [200, 200]
    refused = sync_view(get())
    assert refused.status_code == 429
    body = json.loads(refused.content)
    assert (body["error"], body["limit"], body["window_seconds"], body["retry_after"]) == (
        "rate_limited",
        2,
        60,
        60,
    )
    assert refused["Retry-After"] == "60" and refused["RateLimit-Remaining"] == "0"
    assert sync_view(get("192.0.2.2")).status_code == 200  # another client


@pytest.mark.django_db(transaction=True)
async def test_the_decorator_wraps_async_views_too():
    from asgiref.sync import sync_to_async

    await sync_to_async(view_rule)()
    codes = [(await async_view(get())).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_check_counts_a_hit_and_says_what_is_left():
    view_rule(limit=3)
    first = quotas.check(get(), "api-calls")
    assert first.allowed and first.remaining == 2 and first.retry_after == 0
    quotas.check(get(), "api-calls")
    quotas.check(get(), "api-calls")
    over = quotas.check(get(), "api-calls")
    assert not over and over.retry_after == 60 and over.limit == 3


def test_check_takes_an_asgi_scope():
    view_rule(limit=1)
    scope = {"type": "websocket", "client": ("198.51.100.9", 5000), "headers": []}
    assert quotas.check(scope, "api-calls").allowed
    assert not quotas.check(scope, "api-calls").allowed


def test_an_unknown_rule_allows_and_warns_once(caplog):
    assert quotas.check(get(), "no-such-rule").allowed
    assert quotas.check(get(), "no-such-rule").allowed
    warnings = [r for r in caplog.records if "no-such-rule" in r.getMessage()]
    assert len(warnings) == 1


def test_a_callable_key_counts_what_it_returns():
    view_rule(limit=1, key="tests.test_api.by_team")
    assert quotas.check(get("192.0.2.1", HTTP_X_TEAM="red"), "api-calls").allowed
    # Another address of the same team shares the counter; another team does not.
    assert not quotas.check(get("192.0.2.2", HTTP_X_TEAM="red"), "api-calls").allowed
    assert quotas.check(get("192.0.2.3", HTTP_X_TEAM="blue"), "api-calls").allowed


def test_rule_validation_names_bad_keys_and_url_names():
    bad_key = RateLimitRule(
        name="x", scope="view", key="nowhere.at_all", limit=1, window_seconds=60
    )
    with pytest.raises(ValidationError) as error:
        bad_key.full_clean()
    assert "dotted path of an importable function" in str(error.value)
    bad_name = RateLimitRule(
        name="y", scope="http", target="no-such-url", limit=1, window_seconds=60
    )
    with pytest.raises(ValidationError) as error:
        bad_name.full_clean()
    assert "No URL is named 'no-such-url'" in str(error.value)


def test_an_http_rule_may_target_a_url_name(client, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    RateLimitRule.objects.filter(name="status").delete()
    rule = RateLimitRule(
        name="status-by-name", scope="http", target="status", limit=1, window_seconds=60
    )
    rule.full_clean()
    rule.save()
    policy_cache.invalidate()
    assert client.get("/status", REMOTE_ADDR="192.0.2.50").status_code == 200
    refused = client.get("/status", REMOTE_ADDR="192.0.2.50")
    assert refused.status_code == 429
    assert refused.json()["limit"] == 1


def custom_refusal(request, check):
    """A project's own refusal page (tests)."""
    return JsonResponse({"slow_down": check.rule, "wait": check.retry_after}, status=429)


def test_the_refusal_view_is_configurable(settings):
    settings.QUOTAS_REFUSAL_VIEW = "tests.test_api.custom_refusal"
    view_rule(limit=1)
    sync_view(get())
    refused = sync_view(get())
    assert refused.status_code == 429
    assert json.loads(refused.content) == {"slow_down": "api-calls", "wait": 60}


def test_view_rules_are_not_applied_by_path(client, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    view_rule(name="everything", limit=1)
    codes = {client.get("/status", REMOTE_ADDR="192.0.2.60").status_code for _ in range(3)}
    assert codes == {200}
