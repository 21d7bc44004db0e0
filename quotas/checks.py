"""System checks for the quotas settings (ids quotas.E### for errors, quotas.W### warnings)."""

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from .clientip import MAX_PREFIX, parse_prefix, parse_trusted_proxies
from .conf import FAIL_MODES, default, quota_settings
from .redis_urls import RedisUrlError, parse_redis_url

MIDDLEWARE_PATH = "quotas.middleware.RateLimitMiddleware"


@register(Tags.security)
def check_settings(app_configs, **kwargs):
    """Bad fail mode, proxy list, prefix or Redis URL stop start-up; risky set-ups warn."""
    messages = []
    if quota_settings.FAIL_MODE not in FAIL_MODES:
        messages.append(
            Error(
                f"QUOTAS_FAIL_MODE is {quota_settings.FAIL_MODE!r}.",
                hint=f"Use one of: {', '.join(FAIL_MODES)}.",
                id="quotas.E001",
            )
        )
    try:
        parse_trusted_proxies(quota_settings.TRUSTED_PROXIES)
    except ValueError as exc:
        messages.append(
            Error(
                f"QUOTAS_TRUSTED_PROXIES is malformed: {exc}.",
                hint="Give comma-separated addresses or CIDR networks, e.g. 10.0.0.0/8,::1.",
                id="quotas.E002",
            )
        )
    for version in (6, 4):
        name = f"IPV{version}_PREFIX"
        try:
            parse_prefix(getattr(quota_settings, name), version)
        except ValueError as exc:
            messages.append(
                Error(
                    f"QUOTAS_{name} is malformed: {exc}.",
                    hint=f"Set QUOTAS_{name} to the leading bits of an IPv{version} address "
                    f"that make one client, 1 to {MAX_PREFIX[version]} (default {default(name)}).",
                    id="quotas.E005",
                )
            )
    url = quota_settings.REDIS_URL
    if url:
        try:
            parse_redis_url(url)
        except RedisUrlError as exc:
            messages.append(
                Error(
                    f"QUOTAS_REDIS_URL (REDIS_URL) is malformed: {exc}.",
                    hint="Use redis://[:password@]host:6379/0 (rediss:// for TLS), "
                    "redis+sentinel://host1:26379,host2:26379/<master>/<db> or "
                    "redis+cluster://host1:6379,host2:6379.",
                    id="quotas.E003",
                )
            )
    for name in (
        "POLICY_REFRESH_SECONDS",
        "REDIS_RETRY_SECONDS",
        "REDIS_TIMEOUT_SECONDS",
        "SESSION_HEARTBEAT_SECONDS",
    ):
        value = getattr(quota_settings, name)
        if not isinstance(value, (int, float)) or value <= 0:
            messages.append(
                Error(f"QUOTAS_{name} must be a positive number of seconds.", id="quotas.E004")
            )
    try:
        quota_settings.budget_timezone  # noqa: B018 (resolving the zone is the check)
    except ValueError as exc:
        messages.append(
            Error(
                f"QUOTAS_BUDGET_TIMEZONE: {exc}.",
                hint="Use an IANA zone name such as Europe/Paris, or leave it empty for TIME_ZONE.",
                id="quotas.E006",
            )
        )
    if quota_settings.ENABLED and MIDDLEWARE_PATH not in settings.MIDDLEWARE:
        messages.append(
            Warning(
                "Quotas are enabled but the rate-limit middleware is not installed.",
                hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE.",
                id="quotas.W001",
            )
        )
    engine = settings.DATABASES.get("default", {}).get("ENGINE", "")
    if not url and "sqlite" not in engine:
        messages.append(
            Warning(
                "Quota counters are per process (no REDIS_URL) while the database is shared.",
                hint="With several instances, set REDIS_URL so limits and budgets hold across "
                "all of them; one instance alone may ignore this warning.",
                id="quotas.W002",
            )
        )
    return messages
