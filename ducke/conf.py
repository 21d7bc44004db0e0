"""DUCK-E's own settings (``DUCKE_*``): one default each, read on every access.

``ducke/settings.py`` parses each variable from the environment with the default written
here, and every call site reads through ``ducke_settings`` (so ``override_settings`` works
in tests, and a settings module without the name still gets the default). Nothing here is
captured at import time and nothing is written back to ``settings``.

DUCKE_REALTIME_MODEL          Realtime model of every session, default "gpt-realtime".
DUCKE_REALTIME_URL            upstream base URL override; empty -> OpenAI with a key, else
                              the local simulator of this server (ducke.realtime.upstream).
DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS  time to open the upstream WebSocket, default 10.
DUCKE_MAX_FRAME_BYTES         a browser frame larger than this closes the session (1009),
                              default 256 KiB.
DUCKE_IDLE_TIMEOUT_SECONDS    a session silent this long (and no answer running) is closed,
                              default 300.
DUCKE_MAX_SEND_BACKLOG_BYTES  a browser that leaves this much of the relayed stream unread is
                              disconnected (1013), default 4 MiB.
DUCKE_SIMULATOR_ENABLED       serve the local Realtime simulator; default: on without an
                              OPENAI_API_KEY.
DUCKE_SIMULATOR_PACE          real-time factor of the simulator's streamed audio, default 1.0.
DUCKE_SIMULATOR_STAMP         benchmarks only: stamp each simulator event, default off.
DUCKE_SIMULATOR_LOG           JSON-lines request log of the simulator; empty (default): none.
DUCKE_GEOCODING_URL           Open-Meteo geocoding API, default https://geocoding-api.open-meteo.com
DUCKE_WEATHER_URL             Open-Meteo forecast API, default https://api.open-meteo.com
DUCKE_OPENAI_BASE_URL         base URL of the web search's Responses API, default
                              https://api.openai.com/v1.
DUCKE_TOOL_TIMEOUT_SECONDS    total time for one weather tool call, default 5.
DUCKE_WEB_SEARCH_TIMEOUT_SECONDS  total time for one web search, default 25.
DUCKE_METRICS_ALLOWED_CIDRS   comma-separated CIDRs allowed to scrape /metrics; empty: any.
DUCKE_METRICS_TOKEN           bearer token a scraper must send; empty: none required.
DUCKE_LOGIN_FAILURE_LIMITS    admin login failures before a lockout, by lockout parameter.
"""

from django.conf import settings

_DEFAULTS = {
    "REALTIME_MODEL": "gpt-realtime",
    "REALTIME_URL": "",
    "UPSTREAM_CONNECT_TIMEOUT_SECONDS": 10.0,
    "MAX_FRAME_BYTES": 256 * 1024,
    "IDLE_TIMEOUT_SECONDS": 300.0,
    "MAX_SEND_BACKLOG_BYTES": 4 * 1024 * 1024,
    "SIMULATOR_ENABLED": None,  # None: on when no OPENAI_API_KEY is set
    "SIMULATOR_PACE": 1.0,
    "SIMULATOR_STAMP": False,
    "SIMULATOR_LOG": "",
    "GEOCODING_URL": "https://geocoding-api.open-meteo.com",
    "WEATHER_URL": "https://api.open-meteo.com",
    "OPENAI_BASE_URL": "https://api.openai.com/v1",
    "TOOL_TIMEOUT_SECONDS": 5.0,
    "WEB_SEARCH_TIMEOUT_SECONDS": 25.0,
    "METRICS_ALLOWED_CIDRS": "",
    "METRICS_TOKEN": "",
    "LOGIN_FAILURE_LIMITS": {"username": 5, "ip_address": 20},
}


class DuckeSettings:
    """Attribute access to ``DUCKE_*`` settings with their defaults, evaluated on each access."""

    def __getattr__(self, name):
        if name not in _DEFAULTS:
            raise AttributeError(name)
        value = getattr(settings, f"DUCKE_{name}", _DEFAULTS[name])
        if name == "SIMULATOR_ENABLED" and value is None:
            return not getattr(settings, "OPENAI_API_KEY", "")
        return value


ducke_settings = DuckeSettings()


def default(name):
    """The built-in default of ``DUCKE_<name>`` (what a bad value falls back to)."""
    value = _DEFAULTS[name]
    return dict(value) if isinstance(value, dict) else value
