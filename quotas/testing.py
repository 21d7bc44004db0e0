"""Hooks for the tests of projects that install quotas (and for quotas' own).

``reset_quota_state()`` forgets everything this process keeps between requests: the policy
snapshot, the limiter, the spend counters and their in-process twin, the session slots, the
Redis links, buffered events, the alert memory and the price book. Call it between tests,
and after changing ``QUOTAS_REDIS_URL`` or ``QUOTAS_KEY_PREFIX`` in a running test.
"""


def reset_quota_state():
    """Forget this process's cached policies, counters, Redis links and pending events."""
    from . import events, guards, limiter, pricing, redis_client, spend
    from .notifications import spend_notifier
    from .policies import policy_cache

    policy_cache.invalidate()
    limiter.reset_limiter()
    spend.reset_spend_counters()
    guards.reset_session_slots()
    redis_client.reset_shared_redis()
    pricing.reset_price_book()
    events.discard()
    spend_notifier.forget()


def reset_redis_links():
    """Forget the Redis links and what was built on them (after a Redis setting changed)."""
    from . import guards, limiter, redis_client, spend

    redis_client.reset_shared_redis()
    limiter.reset_limiter()
    spend.reset_spend_counters()
    guards.reset_session_slots()
