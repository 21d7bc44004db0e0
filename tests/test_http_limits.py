"""The HTTP contract of rate limiting: 429 body and headers, rule matching, shadow, metrics."""

import logging

import httpx
import pytest
from django.core.asgi import get_asgi_application
from prometheus_client import REGISTRY

from quotas.models import RateLimitRule

pytestmark = pytest.mark.django_db

CONTRACT_FIELDS = {"error", "detail", "limit", "window_seconds", "retry_after"}


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request):
    """Run the test on in-process counters and on a real Redis."""
    if request.param == "redis":
        request.getfixturevalue("use_redis")
    else:
        request.getfixturevalue("no_redis")
    return request.param


def set_rule(name, **fields):
    """Edit a rule through the ORM (as the admin does: save() and its signal)."""
    rule = RateLimitRule.objects.get(name=name)
    for field, value in fields.items():
        setattr(rule, field, value)
    rule.save()


def exceeded(endpoint):
    return REGISTRY.get_sample_value("rate_limit_exceeded_total", {"endpoint": endpoint}) or 0.0


def rate_headers(response):
    return (
        response.get("RateLimit-Limit"),
        response.get("RateLimit-Remaining"),
        response.get("RateLimit-Reset"),
    )


def test_refusal_follows_the_contract(client, backend):
    set_rule("status", limit=3)
    before = exceeded("/status")
    for remaining in ("2", "1", "0"):
        response = client.get("/status")
        assert response.status_code == 200
        assert response["RateLimit-Limit"] == "3"
        assert response["RateLimit-Remaining"] == remaining
    response = client.get("/status")
    assert response.status_code == 429
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == CONTRACT_FIELDS
    assert body["error"] == "rate_limited"
    assert body["limit"] == 3 and body["window_seconds"] == 60
    assert isinstance(body["retry_after"], int) and 1 <= body["retry_after"] <= 60
    assert "3 per 60 seconds" in body["detail"]
    assert response["Retry-After"] == str(body["retry_after"])  # whole seconds
    assert rate_headers(response) == ("3", "0", str(body["retry_after"]))
    assert exceeded("/status") == before + 1


def test_allowed_responses_describe_the_rule_with_fewest_left(client, backend):
    response = client.get("/status")
    assert rate_headers(response)[:2] == ("60", "59")
    assert 59 <= int(response["RateLimit-Reset"]) <= 60
    response = client.get("/")
    assert response.status_code == 200
    assert rate_headers(response)[:2] == ("30", "29")
    # /metrics has no rule of its own: only `default`, which /status and / counted too.
    response = client.get("/metrics")
    assert response.status_code == 200
    assert rate_headers(response)[:2] == ("100", "97")
    # Once `default` has fewer left than `status`, the headers describe `default`.
    set_rule("default", limit=5)
    response = client.get("/status")
    assert rate_headers(response)[:2] == ("5", "1")


def test_default_rule_refuses_every_path(client, backend):
    set_rule("default", limit=2)
    assert client.get("/metrics").status_code == 200
    assert client.get("/status").status_code == 200
    for path in ("/status", "/", "/metrics", "/admin/login/"):
        response = client.get(path)
        assert response.status_code == 429, path
        assert response.json()["limit"] == 2


def test_rules_are_counted_per_path(client, backend):
    set_rule("page", limit=2)
    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/status").status_code == 200  # its own rule, not `page`
    assert client.get("/metrics").status_code == 200


def test_shadow_rule_logs_and_counts_but_never_refuses(client, backend, caplog):
    set_rule("status", limit=2, shadow=True)
    before = exceeded("/status")
    with caplog.at_level(logging.INFO, logger="quotas.middleware"):
        codes = [client.get("/status").status_code for _ in range(5)]
    assert codes == [200] * 5
    shadow_logs = [r for r in caplog.records if "shadow rule status" in r.getMessage()]
    assert len(shadow_logs) == 3
    assert exceeded("/status") == before + 3
    # Headers describe the enforced rules only (here `default`).
    assert rate_headers(client.get("/status"))[:2] == ("100", "94")


def test_disabled_rules_and_quotas_off(client, backend, settings):
    set_rule("status", enabled=False)
    response = client.get("/status")
    assert rate_headers(response)[:2] == ("100", "99")  # only `default` is left
    settings.QUOTAS_ENABLED = False
    response = client.get("/status")
    assert response.status_code == 200
    assert "RateLimit-Limit" not in response


def test_forged_forwarded_for_from_untrusted_peer_changes_nothing(client, backend, settings):
    settings.QUOTAS_TRUSTED_PROXIES = "10.0.0.0/8"
    remaining = [
        client.get("/status", REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")[
            "RateLimit-Remaining"
        ]
        for i in range(3)
    ]
    assert remaining == ["59", "58", "57"]


def test_trusted_proxy_forwards_each_clients_address(client, backend, settings):
    settings.QUOTAS_TRUSTED_PROXIES = "10.0.0.0/8, fd00::/8"
    via_proxy = {"REMOTE_ADDR": "10.1.2.3"}
    first = client.get("/status", HTTP_X_FORWARDED_FOR="203.0.113.1", **via_proxy)
    second = client.get("/status", HTTP_X_FORWARDED_FOR="203.0.113.2", **via_proxy)
    again = client.get("/status", HTTP_X_FORWARDED_FOR="1.1.1.1, 203.0.113.1", **via_proxy)
    v6 = client.get("/status", REMOTE_ADDR="fd00::1", HTTP_X_FORWARDED_FOR="2001:db8::5")
    assert [r["RateLimit-Remaining"] for r in (first, second, again, v6)] == [
        "59",
        "59",
        "58",
        "59",
    ]
    garbage = client.get("/status", HTTP_X_FORWARDED_FOR="unknown, , [::1]:80, 1.2.3", **via_proxy)
    assert garbage.status_code == 200


def test_addresses_of_one_ipv6_64_share_a_bucket(client, backend, settings):
    set_rule("status", limit=2)
    first = client.get("/status", REMOTE_ADDR="2001:db8:1:2::1")
    second = client.get("/status", REMOTE_ADDR="2001:db8:1:2:a:b:c:d")
    third = client.get("/status", REMOTE_ADDR="2001:db8:1:2::ffff")
    assert [r.status_code for r in (first, second, third)] == [200, 200, 429]
    assert [first["RateLimit-Remaining"], second["RateLimit-Remaining"]] == ["1", "0"]
    # The next /64 is another client; with a prefix of 128, so is every address.
    assert client.get("/status", REMOTE_ADDR="2001:db8:1:3::1").status_code == 200
    settings.QUOTAS_IPV6_PREFIX = 128
    assert client.get("/status", REMOTE_ADDR="2001:db8:1:2::2").status_code == 200


async def run_async(app_client_address, paths):
    """Send ``paths`` through the ASGI app as ``app_client_address``; return the responses."""
    transport = httpx.ASGITransport(app=get_asgi_application(), client=(app_client_address, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return [await http.get(path) for path in paths]


def summary(status, headers, body):
    fields = ("ratelimit-limit", "ratelimit-remaining", "retry-after")
    return status, tuple(headers.get(f) for f in fields), body


async def test_async_path_gives_the_same_answers_as_sync(
    backend, settings, close_worker_connections
):
    """The same 62 requests through the ASGI app and through the sync client compare equal."""
    from asgiref.sync import sync_to_async
    from django.test import Client

    from quotas.limiter import get_limiter

    settings.ALLOWED_HOSTS = ["testserver"]
    # One instant for every request of both runs: a second boundary between them must not
    # change a retry_after (an injected clock, not a quiet machine).
    limiter = get_limiter()
    frozen = limiter.timer()
    for engine in (limiter, limiter.local, limiter.redis):
        if engine is not None:
            engine.timer = lambda: frozen
    paths = ["/status"] * 61 + ["/"]
    before = exceeded("/status")
    async_responses = await run_async("192.0.2.10", paths)

    def sync_run():
        sync_client = Client(REMOTE_ADDR="192.0.2.11")
        return [sync_client.get(path) for path in paths]

    sync_responses = await sync_to_async(sync_run)()

    def body(status, data):
        if status != 429:
            return None
        return {k: v for k, v in data.items() if k != "detail"}

    async_summary = [
        summary(
            r.status_code, r.headers, body(r.status_code, r.json() if r.status_code == 429 else {})
        )
        for r in async_responses
    ]
    sync_summary = [
        summary(r.status_code, r, body(r.status_code, r.json() if r.status_code == 429 else {}))
        for r in sync_responses
    ]
    assert async_summary == sync_summary
    assert [s[0] for s in async_summary] == [200] * 60 + [429, 200]
    assert async_summary[60][1][:2] == ("60", "0")
    assert exceeded("/status") == before + 2
