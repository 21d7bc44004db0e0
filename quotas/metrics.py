"""Prometheus metrics of the quotas app (names kept from the original DUCK-E dashboards).

Labels are bounded: ``endpoint`` is a rule target from the admin, ``model`` a priced model
name (unknown models are reported as ``unknown``), ``reason`` and ``status`` come from
fixed lists. Never a session id or a client address.
"""

from prometheus_client import Counter, Gauge, Histogram

rate_limit_exceeded_total = Counter(
    "rate_limit_exceeded_total",
    "Hits refused (or, for shadow rules, over) by a rate limit",
    ["endpoint"],
)
rate_limit_check_duration_seconds = Histogram(
    "rate_limit_check_duration_seconds",
    "Time to decide one rate-limited request",
    ["endpoint"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
redis_available = Gauge("quotas_redis_available", "1 when the quota Redis answered the last call")

# Budget metering (quotas.realtime.meter, quotas.spend). ``model`` is a priced model or "unknown".
api_cost_total_usd = Counter("api_cost_total_usd", "USD booked to the ledger", ["model"])
token_usage_total = Counter(
    "token_usage_total", "Tokens booked to the ledger, by billing kind", ["model", "type"]
)
budget_exceeded_total = Counter(
    "budget_exceeded_total", "Sessions ended or refused by a budget", ["reason"]
)
circuit_breaker_open = Gauge("circuit_breaker_open", "1 while the spend circuit breaker is open")
hourly_cost_usd = Gauge("hourly_cost_usd", "USD spent in the rolling hour, as last seen")
active_sessions_total = Gauge("active_sessions_total", "Metered sessions open in this process")
session_duration_seconds = Histogram(
    "session_duration_seconds",
    "Length of metered sessions, by end reason",
    ["status"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600),
)
unknown_model_usage_total = Counter(
    "unknown_model_usage_total", "Usage events priced for a model with no price row"
)
