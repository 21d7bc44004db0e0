"""Django settings for DUCK-E, read from the environment with embedded defaults.

Every variable is optional: without any, DUCK-E runs on SQLite, the local-memory cache,
the in-memory channel layer and the local Realtime simulator. A malformed value does not
raise here; it is recorded in ``ENVIRONMENT_ERRORS`` and reported by the ``ducke.E001``
system check, so start-up stops with a message naming the variable.
"""

import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ

from ducke.conf import default as _ducke_default
from ducke.redis_config import (
    cache_settings,
    channel_layer_settings,
    quota_redis_url,
    shared_redis_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
ENVIRONMENT_ERRORS: list[tuple[str, str]] = []


def _read(name, parse, default):
    """Parse one variable; on a bad value remember the error and fall back to the default."""
    try:
        return parse(name, default=default)
    except Exception as exc:  # environ raises several types for bad input
        ENVIRONMENT_ERRORS.append((name, str(exc) or exc.__class__.__name__))
        return default


def _bool(name, default):
    raw = env.str(name, default="").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _number(cast):
    def parse(name, default):
        raw = env.str(name, default="").strip()
        if not raw:
            return default
        try:
            value = cast(raw)
        except ValueError:
            raise ValueError(f"expected a {cast.__name__} number, got {raw!r}") from None
        if value < 0:
            raise ValueError(f"must not be negative, got {raw!r}")
        return value

    return parse


_float = _number(float)
_int = _number(int)


def _positive_int(name, default):
    """A whole number of at least 1 (a limit of 0 would lock everyone out)."""
    value = _int(name, default)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return value


def _list(name, default):
    """A comma-separated list; blanks around items and empty items are dropped."""
    raw = env.str(name, default="")
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return items or default


def _origins(name, default):
    """Comma-separated full origins: ``https://duck.example``, ``https://*.example.com:8443``."""
    origins = _list(name, default)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"each origin needs http:// or https:// and a host, got {origin!r}")
        if parts.path or parts.query or parts.fragment or parts.username:
            raise ValueError(f"an origin is scheme://host[:port] only, got {origin!r}")
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    return origins


def _proxy_ssl_header(name, default):
    """``HTTP_X_FORWARDED_PROTO,https`` -> ``("HTTP_X_FORWARDED_PROTO", "https")``."""
    raw = env.str(name, default="").strip()
    if not raw:
        return default
    header, _, value = (part.strip() for part in raw.partition(","))
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header) or not value or "," in value:
        raise ValueError(
            f"expected a request.META header name and its HTTPS value, such as "
            f"HTTP_X_FORWARDED_PROTO,https; got {raw!r}"
        )
    return (header, value)


SECRET_KEY = _read("DJANGO_SECRET_KEY", env.str, "insecure-dev-key-change-me-" + "x" * 24)
DEBUG = _read("DJANGO_DEBUG", _bool, False)
ALLOWED_HOSTS = _read("DJANGO_ALLOWED_HOSTS", _list, ["127.0.0.1", "localhost", "[::1]"])

# TLS deployments. Behind a TLS-terminating proxy that overwrites X-Forwarded-Proto (never one
# that passes a client's own header through), DJANGO_SECURE_PROXY_SSL_HEADER lets Django see
# https; CSRF and the WebSocket origin check then accept https:// origins of ALLOWED_HOSTS.
SECURE_PROXY_SSL_HEADER = _read("DJANGO_SECURE_PROXY_SSL_HEADER", _proxy_ssl_header, None)
# Further origins trusted for admin POSTs and /session handshakes (scheme, host and port).
CSRF_TRUSTED_ORIGINS = _read("DJANGO_CSRF_TRUSTED_ORIGINS", _origins, [])
SECURE_SSL_REDIRECT = _read("DJANGO_SECURE_SSL_REDIRECT", _bool, False)
# Health checks and Prometheus talk plain HTTP to each instance inside the deployment: a
# redirect to https would fail them, and neither endpoint serves a session or a form.
SECURE_REDIRECT_EXEMPT = [r"^status$", r"^metrics$"]
SECURE_HSTS_SECONDS = _read("DJANGO_SECURE_HSTS_SECONDS", _int, 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _read("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", _bool, False)
SECURE_HSTS_PRELOAD = _read("DJANGO_SECURE_HSTS_PRELOAD", _bool, False)
# HTTPS is on when Django redirects to it or learns it from the proxy: cookies then stay on it.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = (
    SECURE_SSL_REDIRECT or SECURE_PROXY_SSL_HEADER is not None
)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_prometheus",
    "axes",
    "quotas",
    # After axes: ducke/admin.py replaces axes' admin for login attempts.
    "ducke",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Outside WhiteNoise, so static files carry the policy too.
    "ducke.security.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # After authentication, so rules keyed by `user` can see who is signed in.
    "quotas.middleware.RateLimitMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as axes requires: it turns a login the lockout refused into the 429 lockout page,
    # which every middleware above (security headers, metrics) then sees as the response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "ducke.urls"
ASGI_APPLICATION = "ducke.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite unless DATABASE_URL is set.
_SQLITE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": BASE_DIR / "db.sqlite3",
    "OPTIONS": {"timeout": 20},
}
DATABASES = {
    "default": _read(
        "DATABASE_URL",
        lambda name, default: env.db_url(name) if env.str(name, default="").strip() else default,
        _SQLITE,
    )
}
if DATABASES["default"].get("ENGINE") == "django.db.backends.postgresql":
    # Reuse connections: async code reaches the ORM through worker threads, and a new
    # connection per ledger booking would cap bookings near 150/s.
    DATABASES["default"].setdefault("CONN_MAX_AGE", 60)
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
_ENGINES = {"django.db.backends.postgresql", "django.db.backends.sqlite3"}
if DATABASES["default"].get("ENGINE") not in _ENGINES:
    ENVIRONMENT_ERRORS.append(
        ("DATABASE_URL", "use postgres://user:password@host:5432/name or sqlite:////path/db")
    )
    DATABASES["default"] = _SQLITE
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


REDIS_URL = _read("REDIS_URL", lambda name, default: shared_redis_url(env.str(name, "")), "")
CACHES = cache_settings(REDIS_URL)
CHANNEL_LAYERS = channel_layer_settings(REDIS_URL)
DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True

# Admin login lockout (django-axes, ducke/login_lockout.py). Axes' standalone backend comes
# first: a locked-out attempt is refused there, before ModelBackend runs the password hasher.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Failed logins within the cool-off that lock a lockout parameter, each its own limit:
# a username is locked after 5 failures from anywhere, an address (the quotas client
# identity: trusted proxies, IPv6 /64) after 20 failures for any usernames. Axes compares
# every parameter against one AXES_FAILURE_LIMIT; ducke.login_lockout's handler and limit
# callable together compare each parameter against its own.
DUCKE_LOGIN_FAILURE_LIMITS = {
    "username": _read(
        "DJANGO_LOGIN_FAILURES_PER_USERNAME",
        _positive_int,
        _ducke_default("LOGIN_FAILURE_LIMITS")["username"],
    ),
    "ip_address": _read(
        "DJANGO_LOGIN_FAILURES_PER_ADDRESS",
        _positive_int,
        _ducke_default("LOGIN_FAILURE_LIMITS")["ip_address"],
    ),
}
AXES_LOCKOUT_PARAMETERS = list(DUCKE_LOGIN_FAILURE_LIMITS)
AXES_FAILURE_LIMIT = "ducke.login_lockout.failure_limit"
AXES_HANDLER = "ducke.login_lockout.LoginLockoutHandler"
AXES_COOLOFF_TIME = timedelta(minutes=_read("DJANGO_LOGIN_COOLOFF_MINUTES", _positive_int, 15))
# A refused attempt during a lockout is not counted again, so the lock ends when the page
# says it does, and a guesser cannot keep a username locked by merely retrying.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
# A successful login clears that username's failures (the handler keeps the address's).
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "ducke.login_lockout.client_identity"
AXES_LOCKOUT_CALLABLE = "ducke.login_lockout.lockout_response"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves the page's assets under daphne; finders keep it working before collectstatic.
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "admin:login"

# Quotas (see quotas/conf.py for what each setting does).
QUOTAS_ENABLED = _read("QUOTAS_ENABLED", _bool, True)
QUOTAS_FAIL_MODE = env.str("QUOTAS_FAIL_MODE", default="local").strip().lower()
QUOTAS_TRUSTED_PROXIES = env.str("QUOTAS_TRUSTED_PROXIES", default="")
QUOTAS_IPV6_PREFIX = _read("QUOTAS_IPV6_PREFIX", _int, 64)
QUOTAS_IPV4_PREFIX = _read("QUOTAS_IPV4_PREFIX", _int, 32)
# The quota counters: REDIS_URL unless QUOTAS_REDIS_URL names another (a cluster, say).
QUOTAS_REDIS_URL = _read(
    "QUOTAS_REDIS_URL",
    lambda name, default: quota_redis_url(env.str(name, ""), REDIS_URL),
    REDIS_URL,
)
# Secrets of DUCK-E's own that alerts must never show.
QUOTAS_REDACT_SETTINGS = ("OPENAI_API_KEY", "DUCKE_METRICS_TOKEN")
# Rules, spend limits and prices a fresh install starts with (quotas.defaults).
QUOTAS_DEFAULT_POLICIES = "ducke.policies.DEFAULT_POLICIES"
# The product name in quota messages to users and in alerts.
QUOTAS_SERVICE_NAME = env.str("QUOTAS_SERVICE_NAME", default="DUCK-E").strip() or "DUCK-E"
# Calendar spend limits (day/week/month) reset at midnight here; empty -> TIME_ZONE.
QUOTAS_BUDGET_TIMEZONE = env.str("QUOTAS_BUDGET_TIMEZONE", default="").strip()
QUOTAS_EVENT_RETENTION_DAYS = _read("QUOTAS_EVENT_RETENTION_DAYS", _int, 90)
# Stale-session sweep: how often each process runs it (at start-up too; 0: only on demand),
# and how often a running session proves its process alive (stale after 3 of these).
QUOTAS_SPEND_SWEEP_SECONDS = _read("QUOTAS_SPEND_SWEEP_SECONDS", _float, 300.0)
QUOTAS_SESSION_HEARTBEAT_SECONDS = _read("QUOTAS_SESSION_HEARTBEAT_SECONDS", _float, 30.0)
# Threads for the ledger's database calls: sessions' commits overlap on PostgreSQL instead of
# queueing behind one another (SQLite always uses one).
QUOTAS_LEDGER_THREADS = _read("QUOTAS_LEDGER_THREADS", _int, 4)

# Realtime upstream.
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="").strip()
DUCKE_REALTIME_MODEL = env.str(
    "DUCKE_REALTIME_MODEL", default=_ducke_default("REALTIME_MODEL")
).strip()
DUCKE_REALTIME_URL = env.str("DUCKE_REALTIME_URL", default=_ducke_default("REALTIME_URL")).strip()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "quotas": {"level": "INFO"},
        "ducke": {"level": "INFO"},
    },
}

# The local Realtime simulator is the upstream when there is no OpenAI key (and no URL override).
DUCKE_SIMULATOR_ENABLED = _read("DUCKE_SIMULATOR_ENABLED", _bool, not OPENAI_API_KEY)
DUCKE_SIMULATOR_PACE = _read("DUCKE_SIMULATOR_PACE", _float, _ducke_default("SIMULATOR_PACE"))
# Benchmarks only: stamp each simulator event with its send order and monotonic send time.
DUCKE_SIMULATOR_STAMP = _read("DUCKE_SIMULATOR_STAMP", _bool, _ducke_default("SIMULATOR_STAMP"))
# Tests across processes: append every client event and response.done the simulator sees to
# this JSON-lines file. Empty (the default): no log.
DUCKE_SIMULATOR_LOG = env.str(
    "DUCKE_SIMULATOR_LOG", default=_ducke_default("SIMULATOR_LOG")
).strip()

# Relay limits.
DUCKE_MAX_FRAME_BYTES = _read("DUCKE_MAX_FRAME_BYTES", _int, _ducke_default("MAX_FRAME_BYTES"))
DUCKE_IDLE_TIMEOUT_SECONDS = _read(
    "DUCKE_IDLE_TIMEOUT_SECONDS", _float, _ducke_default("IDLE_TIMEOUT_SECONDS")
)
# A browser that leaves this much of the relayed stream unread is disconnected (1013).
DUCKE_MAX_SEND_BACKLOG_BYTES = _read(
    "DUCKE_MAX_SEND_BACKLOG_BYTES", _int, _ducke_default("MAX_SEND_BACKLOG_BYTES")
)
DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS = _read(
    "DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
    _float,
    _ducke_default("UPSTREAM_CONNECT_TIMEOUT_SECONDS"),
)

# Server-side tools (Open-Meteo needs no key; web search uses OPENAI_API_KEY).
DUCKE_GEOCODING_URL = env.str("DUCKE_GEOCODING_URL", default=_ducke_default("GEOCODING_URL"))
DUCKE_WEATHER_URL = env.str("DUCKE_WEATHER_URL", default=_ducke_default("WEATHER_URL"))
DUCKE_OPENAI_BASE_URL = env.str("DUCKE_OPENAI_BASE_URL", default=_ducke_default("OPENAI_BASE_URL"))
DUCKE_TOOL_TIMEOUT_SECONDS = _read(
    "DUCKE_TOOL_TIMEOUT_SECONDS", _float, _ducke_default("TOOL_TIMEOUT_SECONDS")
)
DUCKE_WEB_SEARCH_TIMEOUT_SECONDS = _read(
    "DUCKE_WEB_SEARCH_TIMEOUT_SECONDS", _float, _ducke_default("WEB_SEARCH_TIMEOUT_SECONDS")
)

# /metrics access (ducke/metrics_access.py); empty = no restriction.
DUCKE_METRICS_ALLOWED_CIDRS = env.str(
    "DUCKE_METRICS_ALLOWED_CIDRS", default=_ducke_default("METRICS_ALLOWED_CIDRS")
).strip()
DUCKE_METRICS_TOKEN = env.str(
    "DUCKE_METRICS_TOKEN", default=_ducke_default("METRICS_TOKEN")
).strip()

# Operator alerts (quotas/alerts.py).
QUOTAS_ALERT_EMAILS = _read("QUOTAS_ALERT_EMAILS", env.list, [])
QUOTAS_ALERT_WEBHOOK_URL = env.str("QUOTAS_ALERT_WEBHOOK_URL", default="").strip()
SERVER_EMAIL = env.str("SERVER_EMAIL", default="ducke@localhost")
# SMTP for alert mail, e.g. smtp+tls://user:password@smtp.example.com:587.
if env.str("EMAIL_URL", default="").strip():
    globals().update(_read("EMAIL_URL", env.email_url, {}))
