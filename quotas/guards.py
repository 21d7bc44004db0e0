"""Guards for Channels: refuse WebSocket connections and tool calls over their limits.

``ConnectionGuard`` is ASGI middleware in the style of Channels' ``OriginValidator``: it
decides before the consumer runs and keeps no per-connection state on the instance. It
checks, in order: the websocket rate-limit rules (4429), the spend limits of the client and
user, the rolling-hour cap and the circuit breaker (4402 ``client_budget`` / ``user_budget``,
4503 ``global_budget`` / ``hourly_cap`` / ``breaker``, each with ``retry_after``), and the
client's concurrent sessions (4429). A refused connection is accepted just long enough to
receive a ``quota.exceeded`` event and then closed, so the browser can tell the person why.

Behind Channels' ``AuthMiddlewareStack`` the signed-in user (``scope["user"]``) is known:
``user`` rules and spend limits count per user, and group tiers apply.
"""

import json
import logging
import uuid

from channels.db import database_sync_to_async
from django.utils.translation import gettext as _

from .caps import Identity
from .clientip import configured_client_ip
from .concurrency import SessionSlots
from .conf import quota_settings
from .events import record_violation
from .limiter import ceil_seconds, get_limiter
from .metrics import rate_limit_exceeded_total
from .middleware import limits_for
from .policies import policy_cache
from .protocol import CLOSE_RATE_LIMITED, close_code_for, exceeded_event
from .redis_client import shared_redis
from .spend import spend_counters
from .sweep import ensure_sweeper

logger = logging.getLogger("quotas.guards")

_slots = {}


def reset_session_slots():
    """Forget the process-wide session slots (``quotas.testing``)."""
    _slots.clear()


def session_slots():
    """The process-wide ``SessionSlots`` for the current Redis settings."""
    link = shared_redis()
    slots = _slots.get(id(link))
    if slots is None or slots.link is not link:
        slots = _slots[id(link)] = SessionSlots(link)
    return slots


def scope_client_ip(scope):
    """The client identity of an ASGI scope (``client_ip`` of its peer and X-Forwarded-For)."""
    peer = (scope.get("client") or ("", 0))[0] or ""
    forwarded = ""
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1")
    return configured_client_ip(peer, forwarded)


async def refuse_websocket(receive, send, code, reason, message, retry_after):
    """Accept, send one ``quota.exceeded`` event, close with ``code``."""
    event = await receive()
    if event.get("type") != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    payload = exceeded_event(reason, message, retry_after)
    await send({"type": "websocket.send", "text": json.dumps(payload)})
    await send({"type": "websocket.close", "code": code})


class ConnectionGuard:
    """Applies the websocket rules, the spend limits and caps, and the per-client
    concurrent-session limit.

    ``room``: optional ``room(budget) -> micro-USD`` (sync; may read the database), what a
    session needs left under every cap to be worth starting (a Realtime relay: one answer
    bounded by ``max_output_tokens``, ``quotas.realtime.meter.smallest_answer_micro``). Without it a
    client is refused only when a cap has nothing left at all."""

    def __init__(self, application, room=None):
        self.application = application
        self.room = room

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or not quota_settings.ENABLED:
            return await self.application(scope, receive, send)
        ensure_sweeper()
        client = scope_client_ip(scope)
        snapshot = await policy_cache.aget()
        identity = await scope_identity(scope, client)
        rules = snapshot.rules_for("websocket", scope.get("path", ""))
        decision = await get_limiter().ahit(limits_for(rules, client, identity.user_id, scope))
        # The rule target, not the raw path: a client must not be able to invent new rows.
        endpoint = rules[0].target if rules else "*"
        _record_decision(decision, "websocket", endpoint)
        if not decision.allowed:
            rate_limit_exceeded_total.labels(endpoint=rules[0].target).inc()
            retry = max(1, ceil_seconds(decision.retry_after))
            logger.info("connection refused for %s: rate limit (retry in %ss)", client, retry)
            return await refuse_websocket(
                receive,
                send,
                CLOSE_RATE_LIMITED,
                "rate_limited",
                _("Too many new sessions from your address. Try again in %(seconds)d seconds.")
                % {"seconds": retry},
                retry,
            )
        caps = spend_counters().caps_for(snapshot.budget, identity, limits=snapshot.spend_limits)
        room = await database_sync_to_async(self.room)(snapshot.budget) if self.room else 0
        from .realtime.meter import admit_new_session  # not at import: see quotas/README.md

        admission = await admit_new_session(snapshot.budget, caps=caps, room_micro=room)
        if not admission.allowed:
            record_violation(f"budget:{admission.reason}", "websocket", endpoint)
            logger.info("connection refused for %s: %s", client, admission.reason)
            return await refuse_websocket(
                receive,
                send,
                close_code_for(admission.reason),
                admission.reason,
                admission.message,
                admission.retry_after,
            )
        maximum = snapshot.budget.max_concurrent_sessions_per_client
        token = uuid.uuid4().hex
        slots = session_slots()
        if not await slots.acquire(client, token, maximum):
            record_violation("budget:concurrent_sessions", "websocket", endpoint)
            logger.info("connection refused for %s: %s sessions open already", client, maximum)
            return await refuse_websocket(
                receive,
                send,
                CLOSE_RATE_LIMITED,
                "concurrent_sessions",
                _("You already have %(count)d %(service)s sessions open. Close one and try again.")
                % {"count": maximum, "service": quota_settings.SERVICE_NAME},
                30,
            )
        scope = dict(
            scope,
            quotas={"client": client, "slot": token, "policy": snapshot, "identity": identity},
        )
        try:
            return await self.application(scope, receive, send)
        finally:
            await slots.release(client, token)


async def scope_identity(scope, client):
    """Who a connection's money and ``user`` limits count for: client, user and groups."""
    user = scope.get("user")
    if user is None or not getattr(user, "is_authenticated", False):
        return Identity(client=client)
    return Identity(client=client, user_id=user.pk, group_ids=await _group_ids(user.pk))


@database_sync_to_async
def _group_ids(user_id):
    from django.contrib.auth.models import Group

    return frozenset(
        Group.user_set.through.objects.filter(user_id=user_id).values_list("group_id", flat=True)
    )


async def check_tool_call(tool_name, client, user_id=None):
    """Count one call of ``tool_name`` by ``client`` (and signed-in ``user_id``); the Decision
    says whether it may run."""
    if not quota_settings.ENABLED:
        return None
    snapshot = await policy_cache.aget()
    rules = snapshot.rules_for("tool", tool_name)
    decision = await get_limiter().ahit(limits_for(rules, client, user_id))
    _record_decision(decision, "tool", f"tool:{tool_name}")
    if not decision.allowed:
        rate_limit_exceeded_total.labels(endpoint=f"tool:{tool_name}").inc()
    return decision


def _record_decision(decision, scope, endpoint):
    """Count the rules that refused (or would have, in shadow mode) one hit."""
    for state in decision.refusing:
        record_violation(state.limit.label, scope, endpoint)
    for state in decision.shadow_over:
        record_violation(state.limit.label, scope, endpoint, shadow=True)
