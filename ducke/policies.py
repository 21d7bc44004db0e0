"""DUCK-E's fresh-install policies (``QUOTAS_DEFAULT_POLICIES`` points here).

Loaded by the quotas data migrations on a fresh install and restored by
``manage.py quotas_load_defaults``; the admin is where they are edited afterwards.
"""

from decimal import Decimal as D

from quotas.realtime.prices import PRICE_SHEETS

DEFAULT_RULES = (
    # name, scope, target, key, limit, window_seconds
    ("status", "http", "/status", "ip", 60, 60),
    ("page", "http", "/", "ip", 30, 60),
    ("session-connect", "websocket", "/session", "ip", 5, 60),
    ("default", "http", "*", "ip", 100, 60),
    ("tool-weather", "tool", "weather", "ip", 10, 3600),
    ("tool-web-search", "tool", "web_search", "ip", 5, 3600),
)

DEFAULT_SPEND_LIMITS = (
    # name, key, cap_usd, period, window_seconds: a fifth of the hourly cap per client and hour
    ("client-hour", "client", D("10.00"), "rolling", 3600),
    ("client-day", "client", D("20.00"), "rolling", 86400),
)

DEFAULT_POLICIES = {
    "rules": DEFAULT_RULES,
    # The budget policy's caps are quotas' own defaults ($5 and 30 min a session, $50 an
    # hour, breaker at $100, 2 sessions per client, 1,000 output tokens per answer).
    "budget": {},
    "spend_limits": DEFAULT_SPEND_LIMITS,
    # The conservative sheet of the product brief.
    "price_sheet": PRICE_SHEETS["default"],
    # USD per call on top of the tool's tokens (OpenAI bills web search per call).
    "tool_prices": {"web_search": D("0.025")},
}
