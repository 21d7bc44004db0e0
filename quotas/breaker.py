"""The circuit breaker's states and its broadcast to every instance's sessions.

The state machine itself runs inside every spend decision (``quotas/lua/spend.lua`` and its
twin in ``quotas.spend``); this module names its states and tells running sessions, on every
instance, when it opens: a message of type ``quotas.breaker_open`` to the channel-layer group
``quotas.breaker``, which consumers join (``quotas.consumers.QuotaConsumerMixin``).
"""

import logging

from .protocol import breaker_message

logger = logging.getLogger("quotas.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
BREAKER_GROUP = "quotas.breaker"
BREAKER_EVENT = "quotas.breaker_open"


async def broadcast_breaker_open(state, now):
    """Tell every instance's sessions (group ``quotas.breaker``) that the breaker opened."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return False
    retry = state.breaker_retry_seconds(now)
    message = {
        "type": BREAKER_EVENT,
        "hourly_cost_usd": str(state.hour_usd),
        "retry_after": retry,
        "message": breaker_message(retry),
    }
    try:
        await layer.group_send(BREAKER_GROUP, message)
    except Exception:  # a channel layer outage must not break the charge that tripped it
        logger.exception("could not broadcast the breaker opening")
        return False
    return True
