"""Health facts for /status and metrics: Redis reachability and circuit-breaker state."""

from .metrics import redis_available
from .redis_client import shared_redis


def redis_status():
    """'disabled' without Redis, else 'ok' or 'unavailable' from a live PING.

    While a recent failure has marked Redis down, no PING is sent until the retry pause
    ends, so /status stays fast when Redis is unreachable."""
    link = shared_redis()
    if link is None:
        return "disabled"
    up = link.available and link.ping()
    redis_available.set(1 if up else 0)
    return "ok" if up else "unavailable"


def breaker_state():
    """'closed', 'open' or 'half_open' (this process's twin while Redis is down)."""
    from .spend import spend_counters

    return spend_counters().breaker_state()
