"""Django settings for DUCK-E, read from the environment with embedded defaults.

Every variable is optional: without any, DUCK-E runs on SQLite, the local-memory cache,
the in-memory channel layer and the local Realtime simulator. A malformed value does not
raise here; it is recorded in ``ENVIRONMENT_ERRORS`` and reported by the ``ducke.E001``
system check, so start-up stops with a message naming the variable.
"""

from pathlib import Path
from urllib.parse import urlsplit

import environ

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

SECRET_KEY = _read("DJANGO_SECRET_KEY", env.str, "insecure-dev-key-change-me-" + "x" * 24)
DEBUG = _read("DJANGO_DEBUG", _bool, False)
ALLOWED_HOSTS = _read("DJANGO_ALLOWED_HOSTS", env.list, ["127.0.0.1", "localhost", "[::1]"])

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
    "quotas",
    "ducke",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
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


def _redis_url(name):
    raw = env.str(name, default="").strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(f"scheme must be redis://, rediss:// or unix://, got {parts.scheme!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("missing host")
    parts.port  # noqa: B018 - raises ValueError for a malformed port
    return raw


REDIS_URL = _read("REDIS_URL", lambda name, default: _redis_url(name), "")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 1,
                "IGNORE_EXCEPTIONS": True,
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True

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
QUOTAS_REDIS_URL = REDIS_URL
# The product name in quota messages to users and in alerts.
QUOTAS_SERVICE_NAME = env.str("QUOTAS_SERVICE_NAME", default="DUCK-E").strip() or "DUCK-E"
# Calendar spend limits (day/week/month) reset at midnight here; empty -> TIME_ZONE.
QUOTAS_BUDGET_TIMEZONE = env.str("QUOTAS_BUDGET_TIMEZONE", default="").strip()
QUOTAS_EVENT_RETENTION_DAYS = _read("QUOTAS_EVENT_RETENTION_DAYS", _int, 90)
# Stale-session sweep: how often each process runs it (at start-up too; 0: only on demand),
# and how often a running session proves its process alive (stale after 3 of these).
QUOTAS_SPEND_SWEEP_SECONDS = _read("QUOTAS_SPEND_SWEEP_SECONDS", _float, 300.0)
QUOTAS_SESSION_HEARTBEAT_SECONDS = _read("QUOTAS_SESSION_HEARTBEAT_SECONDS", _float, 30.0)

# Realtime upstream.
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="").strip()
DUCKE_REALTIME_MODEL = env.str("DUCKE_REALTIME_MODEL", default="gpt-realtime").strip()
DUCKE_REALTIME_URL = env.str("DUCKE_REALTIME_URL", default="").strip()

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
DUCKE_SIMULATOR_PACE = _read("DUCKE_SIMULATOR_PACE", _float, 1.0)
# Benchmarks only: stamp each simulator event with its send order and monotonic send time.
DUCKE_SIMULATOR_STAMP = _read("DUCKE_SIMULATOR_STAMP", _bool, False)
# Tests across processes: append every client event and response.done the simulator sees to
# this JSON-lines file. Empty (the default): no log.
DUCKE_SIMULATOR_LOG = env.str("DUCKE_SIMULATOR_LOG", default="").strip()

# Relay limits.
DUCKE_MAX_FRAME_BYTES = _read("DUCKE_MAX_FRAME_BYTES", _int, 256 * 1024)
DUCKE_IDLE_TIMEOUT_SECONDS = _read("DUCKE_IDLE_TIMEOUT_SECONDS", _float, 300.0)
# A browser that leaves this much of the relayed stream unread is disconnected (1013).
DUCKE_MAX_SEND_BACKLOG_BYTES = _read("DUCKE_MAX_SEND_BACKLOG_BYTES", _int, 4 * 1024 * 1024)
DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS = _read(
    "DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS", _float, 10.0
)

# Server-side tools (Open-Meteo needs no key; web search uses OPENAI_API_KEY).
DUCKE_GEOCODING_URL = env.str("DUCKE_GEOCODING_URL", default="https://geocoding-api.open-meteo.com")
DUCKE_WEATHER_URL = env.str("DUCKE_WEATHER_URL", default="https://api.open-meteo.com")
DUCKE_OPENAI_BASE_URL = env.str("DUCKE_OPENAI_BASE_URL", default="https://api.openai.com/v1")
DUCKE_TOOL_TIMEOUT_SECONDS = _read("DUCKE_TOOL_TIMEOUT_SECONDS", _float, 5.0)
DUCKE_WEB_SEARCH_TIMEOUT_SECONDS = _read("DUCKE_WEB_SEARCH_TIMEOUT_SECONDS", _float, 25.0)

# /metrics access (ducke/metrics_access.py); empty = no restriction.
DUCKE_METRICS_ALLOWED_CIDRS = env.str("DUCKE_METRICS_ALLOWED_CIDRS", default="").strip()
DUCKE_METRICS_TOKEN = env.str("DUCKE_METRICS_TOKEN", default="").strip()

# Operator alerts (quotas/alerts.py).
QUOTAS_ALERT_EMAILS = _read("QUOTAS_ALERT_EMAILS", env.list, [])
QUOTAS_ALERT_WEBHOOK_URL = env.str("QUOTAS_ALERT_WEBHOOK_URL", default="").strip()
SERVER_EMAIL = env.str("SERVER_EMAIL", default="ducke@localhost")
# SMTP for alert mail, e.g. smtp+tls://user:password@smtp.example.com:587.
if env.str("EMAIL_URL", default="").strip():
    globals().update(_read("EMAIL_URL", env.email_url, {}))
