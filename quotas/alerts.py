"""Operator alerts: breaker, hourly cap and spend limits reach a human by email and webhook.

Contract (the budget code calls this when the breaker trips or resets, at 80 %/100 % of the
hourly cap, and when a key passes a spend limit's ``alert_at_percent`` or a shadow limit's
cap; see ``quotas.notifications``)::

    send_alert(event, subject, message, *, dedupe_key, details=None, dedupe_seconds=None) -> bool

``event`` is one of ``EVENTS``; an unknown event is a programming error and raises
``ValueError``. Nothing else ever raises into the caller: delivery problems are logged.
The return value is False when the alert was deduplicated (or could not be queued), True
when it was accepted for delivery.

Deduplication: one alert per ``(event, dedupe_key)`` within ``QUOTAS_ALERT_DEDUPE_SECONDS``
(or ``dedupe_seconds``, when the caller knows how long its key stays meaningful), claimed
with ``cache.add()`` on Django's default cache, which is atomic. With django-redis
(``REDIS_URL`` set) the claim is shared by every instance, so exactly one of them sends;
with the local-memory cache dedupe is per process and each instance sends its own copy.
If the cache cannot be reached the alert is sent (a duplicate beats a missed alert).

Delivery: each channel (email to ``QUOTAS_ALERT_EMAILS`` or ``ADMINS``; a Slack-compatible
JSON webhook at ``QUOTAS_ALERT_WEBHOOK_URL``) is a job for a small pool of daemon threads fed
by a bounded queue (``QUOTAS_ALERT_QUEUE_SIZE``), so a request or a session never waits for
SMTP or HTTP. A failed attempt is retried ``QUOTAS_ALERT_RETRIES`` times with exponential
backoff from ``QUOTAS_ALERT_BACKOFF_SECONDS``; a webhook answering 4xx (except 429) is not
retried. ``flush(timeout)`` waits for queued deliveries (tests; shutdown also flushes for up
to five seconds). Payloads and logs never contain configured secrets or the webhook URL.
"""

import atexit
import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.mail import EmailMessage
from django.core.serializers.json import DjangoJSONEncoder

from quotas.conf import quota_settings

logger = logging.getLogger("quotas.alerts")

EVENTS = frozenset(
    {
        "breaker_open",
        "breaker_reset",
        "hourly_80",
        "hourly_100",
        "spend_limit_alert",
        "spend_limit_shadow_over",
    }
)
REDACTED = "[redacted]"
_SECRET_NAMES = re.compile(r"key|secret|token|passw|authorization|credential|cookie", re.I)
_SHORTEST_SECRET = 8  # shorter configured values are too common to search text for
SHUTDOWN_FLUSH_SECONDS = 5.0


class PermanentDeliveryError(Exception):
    """A channel refused the alert in a way a retry cannot fix."""


@dataclass(frozen=True)
class Alert:
    """One alert as queued for delivery, already scrubbed of secrets."""

    event: str
    subject: str
    message: str
    details: dict = field(default_factory=dict)
    occurred_at: str = ""


def subject_prefix():
    """ "[<QUOTAS_SERVICE_NAME>] ", in front of every alert's subject."""
    return f"[{quota_settings.SERVICE_NAME}] "


def _configured_secrets():
    values = [
        getattr(settings, "SECRET_KEY", ""),
        getattr(settings, "EMAIL_HOST_PASSWORD", ""),
        *(getattr(settings, name, "") for name in quota_settings.REDACT_SETTINGS),
        quota_settings.ALERT_WEBHOOK_URL,
        settings.DATABASES.get("default", {}).get("PASSWORD", ""),
    ]
    for url in (quota_settings.REDIS_URL, getattr(settings, "REDIS_URL", "")):
        try:
            values.append(urlsplit(url or "").password or "")
        except ValueError:
            pass
    return [v for v in values if isinstance(v, str) and len(v) >= _SHORTEST_SECRET]


def _scrub_text(text, secrets):
    text = str(text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _scrub(value, secrets):
    if isinstance(value, dict):
        return {
            str(k): REDACTED if _SECRET_NAMES.search(str(k)) else _scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        return _scrub_text(value, secrets)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _scrub_text(value, secrets)  # Decimal, datetime, UUID: as text, like the JSON


def _recipients():
    configured = quota_settings.ALERT_EMAILS
    if isinstance(configured, str):
        configured = [a.strip() for a in configured.split(",")]
    addresses = [a for a in configured or () if a]
    if not addresses:
        for admin in getattr(settings, "ADMINS", ()):
            addresses.append(admin if isinstance(admin, str) else admin[1])
    return addresses


def _host(url):
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def webhook_payload(alert):
    """The Slack-compatible JSON body posted for an alert."""
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": alert.subject[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": alert.message[:3000]}},
    ]
    if alert.details:
        fields = [
            {"type": "mrkdwn", "text": f"*{name}*\n{value}"[:2000]}
            for name, value in list(alert.details.items())[:10]
        ]
        blocks.append({"type": "section", "fields": fields})
    return {
        "text": f"{subject_prefix()}{alert.subject}: {alert.message}",
        "blocks": blocks,
        "event": alert.event,
        "details": alert.details,
        "occurred_at": alert.occurred_at,
    }


def email_body(alert):
    """The plain-text email body of an alert."""
    lines = [alert.message, "", f"event: {alert.event}", f"occurred at: {alert.occurred_at}"]
    lines += [f"{name}: {value}" for name, value in alert.details.items()]
    return "\n".join(lines) + "\n"


def send_email(alert, recipients):
    """Send one alert email through Django's mail framework."""
    EmailMessage(
        subject=f"{subject_prefix()}{alert.subject}",
        body=email_body(alert),
        from_email=settings.SERVER_EMAIL,
        to=recipients,
    ).send(fail_silently=False)


def post_webhook(alert, url, timeout):
    """POST one alert to the webhook; raise on failure, permanently for a 4xx other than 429."""
    body = json.dumps(webhook_payload(alert), cls=DjangoJSONEncoder)
    response = httpx.post(
        url, content=body, headers={"Content-Type": "application/json"}, timeout=timeout
    )
    if 200 <= response.status_code < 300:
        return
    problem = f"HTTP {response.status_code} from {_host(url)}"
    if 400 <= response.status_code < 500 and response.status_code != 429:
        raise PermanentDeliveryError(problem)
    raise RuntimeError(problem)


class AlertDispatcher:
    """Deduplicates alerts and delivers them on background threads with bounded retries."""

    def __init__(self, *, sleep=None, clock=time.time, workers=2, cache_alias="default"):
        self._stopping = threading.Event()
        # The default sleep wakes early on close(), so shutdown does not wait out a backoff.
        self.sleep = sleep or self._stopping.wait
        self.clock = clock
        self.cache_alias = cache_alias
        self._workers = workers
        self._threads = []
        self._jobs = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()

    def send_alert(self, event, subject, message, *, dedupe_key, details=None, dedupe_seconds=None):
        """Queue an alert for every configured channel; False if deduplicated or not queued."""
        if event not in EVENTS:
            raise ValueError(f"unknown alert event {event!r}; expected one of {sorted(EVENTS)}")
        try:
            if not self._claim(event, dedupe_key, dedupe_seconds):
                logger.info("alert %s (%s) deduplicated", event, subject)
                return False
            return self._queue(self._alert(event, subject, message, details))
        except Exception:
            logger.exception("alert %s could not be queued", event)
            return False

    def flush(self, timeout=None):
        """Wait until every queued delivery has finished; True unless the timeout ran out."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout=SHUTDOWN_FLUSH_SECONDS):
        """Flush, then stop the worker threads (cutting short any backoff still waiting)."""
        self.flush(timeout)
        self._stopping.set()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def _claim(self, event, dedupe_key, dedupe_seconds=None):
        digest = hashlib.sha256(str(dedupe_key).encode()).hexdigest()[:32]
        key = f"{quota_settings.KEY_PREFIX}:alert:{event}:{digest}"
        if dedupe_seconds is None:
            timeout = quota_settings.ALERT_DEDUPE_SECONDS
        else:
            timeout = max(1, math.ceil(dedupe_seconds))
        try:
            added = caches[self.cache_alias].add(key, 1, timeout=timeout)
        except Exception:
            logger.warning("alert dedupe cache unavailable; sending %s anyway", event)
            return True
        # django-redis with IGNORE_EXCEPTIONS answers None when Redis is down: send anyway.
        return added is not False

    def _alert(self, event, subject, message, details):
        secrets = _configured_secrets()
        return Alert(
            event=event,
            subject=_scrub_text(subject, secrets),
            message=_scrub_text(message, secrets),
            details=_scrub(dict(details or {}), secrets),
            occurred_at=datetime.fromtimestamp(self.clock(), UTC).isoformat(),
        )

    def _channels(self, alert):
        # Settings are read here, in the caller's thread, so override_settings applies.
        channels = []
        recipients = _recipients()
        if recipients:
            channels.append(("email", lambda: send_email(alert, recipients)))
        url = quota_settings.ALERT_WEBHOOK_URL
        if url:
            timeout = float(quota_settings.ALERT_TIMEOUT_SECONDS)
            channels.append((f"webhook {_host(url)}", lambda: post_webhook(alert, url, timeout)))
        return channels

    def _queue(self, alert):
        channels = self._channels(alert)
        logger.warning("ALERT %s: %s", alert.event, alert.subject)
        if not channels:
            logger.warning("no alert channel configured (QUOTAS_ALERT_EMAILS, ADMINS, webhook)")
            return True
        attempts = 1 + max(0, int(quota_settings.ALERT_RETRIES))
        backoff = float(quota_settings.ALERT_BACKOFF_SECONDS)
        capacity = int(quota_settings.ALERT_QUEUE_SIZE)
        with self._idle:
            if self._pending + len(channels) > capacity:
                logger.error("alert queue full (%d); dropping %s", capacity, alert.event)
                return False
            self._pending += len(channels)
        self._start_workers()
        for name, deliver in channels:
            self._jobs.put((alert.event, name, deliver, attempts, backoff))
        return True

    def _start_workers(self):
        with self._idle:
            if self._threads:
                return
            self._stopping.clear()
            for number in range(self._workers):
                thread = threading.Thread(
                    target=self._work, name=f"quotas-alerts-{number}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._deliver(*job)
            except Exception:  # never let one alert kill the worker
                logger.exception("alert delivery crashed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _deliver(self, event, channel, deliver, attempts, backoff):
        secrets = _configured_secrets()
        for attempt in range(1, attempts + 1):
            try:
                deliver()
            except PermanentDeliveryError as exc:
                logger.error("alert %s via %s refused: %s", event, channel, exc)
                return False
            except Exception as exc:
                problem = _scrub_text(f"{exc.__class__.__name__}: {exc}", secrets)
                logger.warning(
                    "alert %s via %s failed (attempt %d of %d): %s",
                    event,
                    channel,
                    attempt,
                    attempts,
                    problem,
                )
                if attempt < attempts:
                    self.sleep(backoff * 2 ** (attempt - 1))
                continue
            logger.info("alert %s sent via %s", event, channel)
            return True
        logger.error(
            "alert %s via %s failed after %d attempts; giving up", event, channel, attempts
        )
        return False


dispatcher = AlertDispatcher()


def send_alert(
    event: str,
    subject: str,
    message: str,
    *,
    dedupe_key: str,
    details: dict | None = None,
    dedupe_seconds: float | None = None,
) -> bool:
    """Send an operator alert once per dedupe window without blocking; see the module doc."""
    return dispatcher.send_alert(
        event,
        subject,
        message,
        dedupe_key=dedupe_key,
        details=details,
        dedupe_seconds=dedupe_seconds,
    )


async def asend_alert(
    event: str,
    subject: str,
    message: str,
    *,
    dedupe_key: str,
    details: dict | None = None,
    dedupe_seconds: float | None = None,
) -> bool:
    """``send_alert`` for async callers: the dedupe cache call runs off the event loop."""
    return await sync_to_async(send_alert, thread_sensitive=False)(
        event,
        subject,
        message,
        dedupe_key=dedupe_key,
        details=details,
        dedupe_seconds=dedupe_seconds,
    )


def flush(timeout: float | None = None) -> bool:
    """Wait for queued alert deliveries (tests and shutdown); True when all finished."""
    return dispatcher.flush(timeout)


# Daemon workers die with the interpreter; give queued alerts a moment to go out first.
atexit.register(dispatcher.flush, SHUTDOWN_FLUSH_SECONDS)
