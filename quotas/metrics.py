"""Prometheus metrics of the quotas app (names kept from the original DUCK-E dashboards).

Labels are bounded: ``endpoint`` is a rule target from the admin, ``model`` a priced model
name (unknown models are reported as ``unknown``), ``reason`` and ``status`` come from
fixed lists. Never a session id or a client address.
"""

from prometheus_client import Counter, Gauge, Histogram

rate_limit_exceeded_total = Counter(
    "rate_limit_exceeded_total", "Hits refused (or, for shadow rules, over) by a rate limit", ["endpoint"]
)
rate_limit_check_duration_seconds = Histogram(
    "rate_limit_check_duration_seconds",
    "Time to decide one rate-limited request",
    ["endpoint"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
redis_available = Gauge("quotas_redis_available", "1 when the quota Redis answered the last call")
