"""Operator alerts: dedupe, email and webhook delivery, retries, non-blocking callers."""

import json
import logging
import time
import uuid
from decimal import Decimal

import pytest
import redis
from django.core.mail.backends.locmem import EmailBackend

from quotas import alerts
from quotas.alerts import AlertDispatcher
from tests.fixtures.webhook_receiver import webhook_receiver_fixture  # noqa: F401

OPENAI_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"


class SleepRecorder:
    """Injected sleep: records the backoff delays and returns at once."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


class FlakyEmailBackend(EmailBackend):
    """The locmem backend, failing the first ``failures`` sends."""

    failures = 0
    attempts = 0

    def send_messages(self, messages):
        FlakyEmailBackend.attempts += 1
        if FlakyEmailBackend.failures > 0:
            FlakyEmailBackend.failures -= 1
            raise ConnectionRefusedError("SMTP server down")
        return super().send_messages(messages)


@pytest.fixture
def sleeps():
    return SleepRecorder()


@pytest.fixture
def dispatcher(sleeps):
    instance = AlertDispatcher(sleep=sleeps, clock=lambda: 1_800_000_000.0)
    yield instance
    instance.close(timeout=5)


@pytest.fixture
def alert_settings(settings, webhook_receiver):
    settings.QUOTAS_ALERT_EMAILS = ["oncall@example.com"]
    settings.QUOTAS_ALERT_WEBHOOK_URL = webhook_receiver.url
    settings.QUOTAS_ALERT_RETRIES = 3
    settings.QUOTAS_ALERT_BACKOFF_SECONDS = 1.0
    settings.QUOTAS_ALERT_TIMEOUT_SECONDS = 2.0
    settings.ADMINS = []
    return settings


def key():
    return f"test-{uuid.uuid4().hex}"


def breaker_alert(target, dedupe_key, **extra):
    return target.send_alert(
        "breaker_open",
        "Circuit breaker open",
        "Spend reached $100.00 in the last hour; every session was ended.",
        dedupe_key=dedupe_key,
        details={"hourly_cost_usd": Decimal("100.25"), "threshold_usd": Decimal("100.00")},
        **extra,
    )


def test_email_and_webhook_delivered(dispatcher, alert_settings, webhook_receiver, mailoutbox):
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)

    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.subject == "[DUCK-E] Circuit breaker open"
    assert mail.to == ["oncall@example.com"]
    assert "hourly_cost_usd: 100.25" in mail.body
    assert "event: breaker_open" in mail.body

    assert len(webhook_receiver.requests) == 1
    request = webhook_receiver.requests[0]
    assert request.headers["Content-Type"] == "application/json"
    payload = request.json()
    assert payload["event"] == "breaker_open"
    assert payload["text"].startswith("[DUCK-E] Circuit breaker open: Spend reached $100.00")
    assert payload["details"] == {"hourly_cost_usd": "100.25", "threshold_usd": "100.00"}
    assert payload["blocks"][0]["text"]["text"] == "Circuit breaker open"
    assert payload["occurred_at"] == "2027-01-15T08:00:00+00:00"


@pytest.mark.parametrize(
    "event",
    [
        "breaker_open",
        "breaker_reset",
        "hourly_80",
        "hourly_100",
        "spend_limit_alert",
        "spend_limit_shadow_over",
    ],
)
def test_every_contract_event_is_accepted(dispatcher, alert_settings, webhook_receiver, event):
    assert dispatcher.send_alert(event, "s", "m", dedupe_key=key()) is True
    assert dispatcher.flush(5)
    assert webhook_receiver.requests[0].json()["event"] == event


def test_unknown_event_is_refused(dispatcher, alert_settings, webhook_receiver):
    with pytest.raises(ValueError, match="breaker_opened"):
        dispatcher.send_alert("breaker_opened", "s", "m", dedupe_key=key())
    assert dispatcher.flush(5)
    assert webhook_receiver.requests == []


def test_second_alert_with_same_key_is_deduplicated(
    dispatcher,
    alert_settings,
    webhook_receiver,
    mailoutbox,
):
    dedupe_key = key()
    assert breaker_alert(dispatcher, dedupe_key) is True
    assert breaker_alert(dispatcher, dedupe_key) is False
    # Another instance sharing the cache claims the same key and stays quiet too.
    other_instance = AlertDispatcher(sleep=SleepRecorder())
    assert breaker_alert(other_instance, dedupe_key) is False
    # The same key for another event, or a new key, is a new alert.
    assert dispatcher.send_alert("breaker_reset", "reset", "m", dedupe_key=dedupe_key) is True
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert len(mailoutbox) == 3
    assert [r.json()["event"] for r in webhook_receiver.requests].count("breaker_open") == 2


@pytest.mark.redis
def test_dedupe_claim_is_shared_through_redis(
    settings,
    redis_url,
    dispatcher,
    alert_settings,
    webhook_receiver,
):
    settings.CACHES = {
        "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url}
    }
    settings.QUOTAS_KEY_PREFIX = f"quotas-test-{uuid.uuid4().hex[:12]}"
    settings.QUOTAS_ALERT_DEDUPE_SECONDS = 30
    client = redis.Redis.from_url(redis_url)
    try:
        dedupe_key = key()
        assert breaker_alert(dispatcher, dedupe_key) is True
        assert breaker_alert(AlertDispatcher(sleep=SleepRecorder()), dedupe_key) is False
        keys = list(client.scan_iter(f"*{settings.QUOTAS_KEY_PREFIX}:alert:breaker_open:*"))
        assert len(keys) == 1
        assert 0 < client.ttl(keys[0]) <= 30
        assert dispatcher.flush(5)
        assert len(webhook_receiver.requests) == 1
    finally:
        for stale in client.scan_iter(f"*{settings.QUOTAS_KEY_PREFIX}:*"):
            client.delete(stale)


@pytest.mark.redis
def test_caller_chosen_dedupe_seconds_set_the_claims_lifetime(
    settings, redis_url, dispatcher, alert_settings
):
    settings.CACHES = {
        "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url}
    }
    settings.QUOTAS_KEY_PREFIX = f"quotas-test-{uuid.uuid4().hex[:12]}"
    settings.QUOTAS_ALERT_DEDUPE_SECONDS = 30
    client = redis.Redis.from_url(redis_url)
    try:
        assert dispatcher.send_alert(
            "spend_limit_alert", "s", "m", dedupe_key=key(), dedupe_seconds=86_400.5
        )
        (claim,) = client.scan_iter(f"*{settings.QUOTAS_KEY_PREFIX}:alert:spend_limit_alert:*")
        assert 86_000 < client.ttl(claim) <= 86_401
        assert dispatcher.flush(5)
    finally:
        for stale in client.scan_iter(f"*{settings.QUOTAS_KEY_PREFIX}:*"):
            client.delete(stale)


def test_webhook_retried_with_backoff_then_delivered(
    dispatcher,
    alert_settings,
    webhook_receiver,
    sleeps,
    caplog,
):
    alert_settings.QUOTAS_ALERT_EMAILS = []
    webhook_receiver.fail_next(2, status=503)
    with caplog.at_level(logging.INFO, logger="quotas.alerts"):
        assert breaker_alert(dispatcher, key()) is True
        assert dispatcher.flush(5)
    assert len(webhook_receiver.requests) == 3
    assert sleeps.delays == [1.0, 2.0]
    assert "attempt 2 of 4" in caplog.text
    assert "sent via webhook 127.0.0.1" in caplog.text
    assert "giving up" not in caplog.text


def test_permanent_failure_is_bounded_and_logged(
    dispatcher,
    alert_settings,
    webhook_receiver,
    sleeps,
    caplog,
):
    alert_settings.QUOTAS_ALERT_EMAILS = []
    webhook_receiver.fail_next(1000, status=500)
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert len(webhook_receiver.requests) == 4  # one try + QUOTAS_ALERT_RETRIES
    assert sleeps.delays == [1.0, 2.0, 4.0]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "failed after 4 attempts; giving up" in errors[0].getMessage()
    assert "XSECRETPATH" not in caplog.text  # the webhook URL is a credential


def test_client_error_is_not_retried(dispatcher, alert_settings, webhook_receiver, sleeps, caplog):
    alert_settings.QUOTAS_ALERT_EMAILS = []
    webhook_receiver.fail_next(1, status=404)
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert len(webhook_receiver.requests) == 1
    assert sleeps.delays == []
    assert "refused: HTTP 404" in caplog.text


def test_email_failure_is_retried(dispatcher, alert_settings, sleeps, mailoutbox):
    alert_settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    alert_settings.EMAIL_BACKEND = f"{__name__}.FlakyEmailBackend"
    FlakyEmailBackend.failures, FlakyEmailBackend.attempts = 2, 0
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert FlakyEmailBackend.attempts == 3
    assert sleeps.delays == [1.0, 2.0]
    assert len(mailoutbox) == 1


def test_caller_returns_fast_while_webhook_hangs(
    dispatcher,
    alert_settings,
    webhook_receiver,
    mailoutbox,
    caplog,
):
    alert_settings.QUOTAS_ALERT_TIMEOUT_SECONDS = 0.3
    alert_settings.QUOTAS_ALERT_RETRIES = 1
    webhook_receiver.hang_seconds = 30
    started = time.perf_counter()
    assert breaker_alert(dispatcher, key()) is True
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"send_alert blocked for {elapsed:.3f}s"
    assert webhook_receiver.wait_for(1)
    # Email is its own job: a hanging webhook does not hold it back.
    deadline = time.monotonic() + 5
    while not mailoutbox and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(mailoutbox) == 1
    assert dispatcher.flush(5)
    assert len(webhook_receiver.requests) == 2
    assert "ReadTimeout" in caplog.text
    assert "giving up" in caplog.text


def test_no_secrets_in_payloads_or_logs(
    dispatcher,
    alert_settings,
    webhook_receiver,
    mailoutbox,
    caplog,
):
    alert_settings.OPENAI_API_KEY = OPENAI_KEY
    alert_settings.DUCKE_METRICS_TOKEN = "metrics-token-abcdef123456"
    webhook_receiver.fail_next(1)  # a failure so that the retry path logs too
    with caplog.at_level(logging.DEBUG, logger="quotas.alerts"):
        assert dispatcher.send_alert(
            "hourly_100",
            f"Hourly cap reached ({OPENAI_KEY})",
            f"upstream said: invalid key {OPENAI_KEY}",
            dedupe_key=key(),
            details={
                "api_key": "anything-at-all",
                "Authorization": "Bearer x",
                "nested": {"note": f"key={OPENAI_KEY}", "password": "hunter2hunter2"},
                "list": ["metrics-token-abcdef123456"],
                "hourly_cost_usd": Decimal("50.01"),
            },
        )
        assert dispatcher.flush(5)
    posted = [r.body.decode() for r in webhook_receiver.requests]
    assert len(posted) == 2
    emailed = mailoutbox[0].subject + mailoutbox[0].body
    for text in [*posted, emailed, caplog.text]:
        for secret in (OPENAI_KEY, "anything-at-all", "hunter2", "metrics-token-abc", "XSECRET"):
            assert secret not in text
    details = json.loads(posted[-1])["details"]
    assert details["api_key"] == "[redacted]"
    assert details["nested"] == {"note": "key=[redacted]", "password": "[redacted]"}
    assert details["hourly_cost_usd"] == "50.01"


def test_admins_are_the_fallback_recipients(dispatcher, alert_settings, mailoutbox):
    alert_settings.QUOTAS_ALERT_EMAILS = []
    alert_settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    alert_settings.ADMINS = [("Ops", "ops@example.com")]
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert [m.to for m in mailoutbox] == [["ops@example.com"]]


def test_comma_separated_recipients(dispatcher, alert_settings, mailoutbox):
    alert_settings.QUOTAS_ALERT_EMAILS = "a@example.com, b@example.com"
    alert_settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(5)
    assert mailoutbox[0].to == ["a@example.com", "b@example.com"]


def test_no_channel_configured_only_logs(dispatcher, settings, mailoutbox, caplog):
    settings.QUOTAS_ALERT_EMAILS = []
    settings.QUOTAS_ALERT_WEBHOOK_URL = ""
    settings.ADMINS = []
    assert breaker_alert(dispatcher, key()) is True
    assert dispatcher.flush(1)
    assert mailoutbox == []
    assert "ALERT breaker_open: Circuit breaker open" in caplog.text
    assert "no alert channel configured" in caplog.text


def test_unreachable_dedupe_cache_still_sends(alert_settings, webhook_receiver, sleeps, caplog):
    broken = AlertDispatcher(sleep=sleeps, cache_alias="no-such-cache")
    try:
        assert breaker_alert(broken, key()) is True
        assert broken.flush(5)
    finally:
        broken.close()
    assert len(webhook_receiver.requests) == 1
    assert "dedupe cache unavailable" in caplog.text


def test_full_queue_drops_new_alerts_without_blocking(
    dispatcher,
    alert_settings,
    webhook_receiver,
    caplog,
):
    alert_settings.QUOTAS_ALERT_QUEUE_SIZE = 2
    alert_settings.QUOTAS_ALERT_TIMEOUT_SECONDS = 0.3
    alert_settings.QUOTAS_ALERT_RETRIES = 0
    webhook_receiver.hang_seconds = 30
    assert breaker_alert(dispatcher, key()) is True  # email + webhook fill the queue
    assert dispatcher.send_alert("hourly_80", "s", "m", dedupe_key=key()) is False
    assert "alert queue full (2); dropping hourly_80" in caplog.text
    assert dispatcher.flush(5)
    assert dispatcher.send_alert("hourly_80", "s", "m", dedupe_key=key()) is True


def test_module_level_send_alert_and_flush(alert_settings, webhook_receiver, mailoutbox):
    assert alerts.send_alert("hourly_80", "80 % of the hourly cap", "m", dedupe_key=key())
    assert alerts.flush(5)
    assert webhook_receiver.requests[0].json()["event"] == "hourly_80"
    assert len(mailoutbox) == 1


async def test_async_callers_use_asend_alert(alert_settings, webhook_receiver):
    assert await alerts.asend_alert("breaker_reset", "reset", "m", dedupe_key=key()) is True
    assert alerts.flush(5)
    assert webhook_receiver.requests[0].json()["event"] == "breaker_reset"
