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


# -- spend decisions in one call, for tests (the engine itself is async-first) -------------


def charge(counters, session_id, amount_micro, budget, *, member=None, at=None, caps=None):
    """Add ``amount_micro`` to the session, the rolling hour (and ``caps``), synchronously."""
    import uuid

    from .spend import entry_member

    caps = caps or counters.default_caps(budget, session_id)
    member = member or entry_member(amount_micro, uuid.uuid4().hex)
    return counters.decide("charge", caps, budget, amount=amount_micro, add=member, at=at)


def reserve(counters, caps, amount_micro, member, budget, *, at=None):
    """Hold ``amount_micro`` against every cap of ``caps``, or refuse, synchronously."""
    return counters.decide("reserve", caps, budget, amount=amount_micro, add=member, at=at)


def settle(counters, caps, reserved_member, amount_micro, member, budget, *, at=None):
    """Replace a reservation's entry by the exact cost's, synchronously."""
    return counters.decide(
        "settle", caps, budget, amount=amount_micro, add=member, remove=reserved_member, at=at
    )


def admit(counters, budget, caps=None, *, room_micro=0):
    """May a new session start? (an ``Admission``, synchronously)."""
    caps = caps or counters.default_caps(budget)
    return counters.admission_of(counters.decide("admit", caps, budget, amount=room_micro))


async def aread(counters, budget, session_id=None):
    """The session's and the rolling hour's totals and the breaker, without charging."""
    return await counters.adecide("read", counters.default_caps(budget, session_id), budget)
