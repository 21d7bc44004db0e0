"""Settings of the quotas app, read from ``django.conf.settings`` on every access.

Reading lazily keeps ``override_settings`` working in tests; nothing here is captured at
import time and nothing is written back to ``settings``.

QUOTAS_ENABLED            bool, default True: enforce limits at all.
QUOTAS_FAIL_MODE          "local" (default): Redis down -> per-process limits;
                          "open": Redis down -> allow everything;
                          "closed": Redis down -> refuse everything limited.
QUOTAS_TRUSTED_PROXIES    comma-separated CIDRs whose X-Forwarded-For is believed.
QUOTAS_IPV6_PREFIX        leading bits of an IPv6 address that make one client, default 64
                          (1-128): every address of a /64 shares its limits and spend;
                          128 -> each address is a client of its own.
QUOTAS_IPV4_PREFIX        the same for IPv4, default 32 (1-32): each address on its own.
QUOTAS_REDIS_URL          redis://, rediss:// or unix:// URL, a Sentinel master
                          (redis+sentinel://h1:26379,h2:26379/<master>/<db>) or a Redis
                          Cluster (redis+cluster://h1:p,h2:p); see quotas.redis_urls.
                          Empty -> in-process counters.
QUOTAS_KEY_PREFIX         prefix of every Redis key, default "quotas".
QUOTAS_POLICY_REFRESH_SECONDS  how often a process checks for policy edits, default 0.5.
QUOTAS_REDIS_RETRY_SECONDS     how long an unavailable Redis is left alone, default 1.0.
QUOTAS_REDIS_TIMEOUT_SECONDS   socket timeout for quota Redis calls, default 0.5.
QUOTAS_ALERT_EMAILS            alert recipients (list or comma-separated); empty -> ADMINS.
QUOTAS_ALERT_WEBHOOK_URL       Slack-compatible JSON webhook for alerts; empty -> none.
QUOTAS_ALERT_DEDUPE_SECONDS    one alert per event and dedupe key in this window, default 3600.
QUOTAS_ALERT_RETRIES           extra delivery attempts per channel after a failure, default 3.
QUOTAS_ALERT_BACKOFF_SECONDS   first retry delay, doubled on each retry, default 2.0.
QUOTAS_ALERT_TIMEOUT_SECONDS   webhook request timeout, default 5.0.
QUOTAS_ALERT_QUEUE_SIZE        alerts waiting for delivery before new ones are dropped, default 100.
QUOTAS_EVENT_RETENTION_DAYS    refusal, tool-call and breaker events older than this are
                               deleted by ``manage.py quotas_prune``, default 90.
QUOTAS_BUDGET_TIMEZONE         the zone whose midnight starts a calendar day/week/month of a
                               spend limit; empty (default) -> TIME_ZONE.
QUOTAS_DEFAULT_POLICIES        dotted path of the fresh-install policies (quotas.defaults); empty
                               (default): one budget policy, no rule, limit or price.
QUOTAS_REDACT_SETTINGS         names of settings whose values never appear in an alert (API keys,
                               tokens); SECRET_KEY, the mail and database passwords, the webhook
                               URL and Redis passwords always are redacted.
QUOTAS_REFUSAL_VIEW            dotted path of ``view(request, check) -> HttpResponse`` answering a
                               refused HTTP request; empty (default): the JSON 429.
QUOTAS_SERVICE_NAME            the product name in messages to users and in alerts, default
                               "the service".
QUOTAS_SPEND_SWEEP_SECONDS     how often a process closes sessions left open by a crashed
                               process, default 300; 0 -> never in the background.
QUOTAS_SESSION_HEARTBEAT_SECONDS  how often a running session proves its process is alive,
                               default 30; a session silent for 3 of these is stale.
QUOTAS_LEDGER_THREADS          worker threads for the ledger's database calls (holds, settlements,
                               bookings), default 1: one thread, as Channels'
                               ``database_sync_to_async``; more (PostgreSQL): that many, each
                               with its own connection, so sessions' commits overlap instead of
                               queueing. SQLite always uses one (quotas.ledger_hop).
QUOTAS_EVENT_FLUSH_SECONDS     how often buffered event counts are written, default 5.0;
                               0 -> no background writer (tests call events.flush()).
"""

from django.conf import settings
from django.core.signals import setting_changed

FAIL_MODES = ("local", "open", "closed")

_DEFAULTS = {
    "ENABLED": True,
    "FAIL_MODE": "local",
    "TRUSTED_PROXIES": "",
    "IPV6_PREFIX": 64,
    "IPV4_PREFIX": 32,
    "REDIS_URL": "",
    "KEY_PREFIX": "quotas",
    "POLICY_REFRESH_SECONDS": 0.5,
    "REDIS_RETRY_SECONDS": 1.0,
    "REDIS_TIMEOUT_SECONDS": 0.5,
    "ALERT_EMAILS": (),
    "ALERT_WEBHOOK_URL": "",
    "ALERT_DEDUPE_SECONDS": 3600,
    "ALERT_RETRIES": 3,
    "ALERT_BACKOFF_SECONDS": 2.0,
    "ALERT_TIMEOUT_SECONDS": 5.0,
    "ALERT_QUEUE_SIZE": 100,
    "EVENT_RETENTION_DAYS": 90,
    "EVENT_FLUSH_SECONDS": 5.0,
    "BUDGET_TIMEZONE": "",
    "SERVICE_NAME": "the service",
    "DEFAULT_POLICIES": "",
    "REDACT_SETTINGS": (),
    "REFUSAL_VIEW": "",
    "SPEND_SWEEP_SECONDS": 300.0,
    "SESSION_HEARTBEAT_SECONDS": 30.0,
    "LEDGER_THREADS": 1,
}


class QuotasSettings:
    """Attribute access to ``QUOTAS_*`` settings with defaults.

    Values are read once and kept until a setting changes (Django's ``setting_changed``, sent
    by ``override_settings`` and pytest-django's ``settings``), as Django's own settings
    object keeps what it has read: the request path reads several of them per request.
    """

    def __init__(self):
        self._values = {}

    def __getattr__(self, name):
        values = self.__dict__.get("_values")
        if values is None or name not in _DEFAULTS:
            raise AttributeError(name)
        try:
            return values[name]
        except KeyError:
            value = values[name] = getattr(settings, f"QUOTAS_{name}", _DEFAULTS[name])
            return value

    def forget(self):
        """Read every setting again on its next access."""
        self._values = {}

    @property
    def budget_timezone(self):
        """The ``zoneinfo.ZoneInfo`` of calendar spend periods (ValueError when unknown)."""
        import zoneinfo

        name = self.BUDGET_TIMEZONE or settings.TIME_ZONE or "UTC"
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}") from None


quota_settings = QuotasSettings()


def _setting_changed(setting, **kwargs):
    if setting.startswith("QUOTAS_"):
        quota_settings.forget()


setting_changed.connect(_setting_changed)


def default(name):
    """The built-in default of ``QUOTAS_<name>``: what a bad value falls back to mid-request."""
    return _DEFAULTS[name]
