"""HTTP rate limits decided at the ASGI edge, before Django runs.

``RateLimitEdge`` wraps Django's ASGI handler (``RateLimitEdge(get_asgi_application())``).
For every HTTP request it decides, in one limiter call, the matching rules whose key needs no
Django user: ``ip``, ``global``, and key functions marked with ``quotas.edge_key`` (they are
called with the ASGI scope). A refused request is answered here, with the 429 contract of
``quotas.middleware`` (JSON ``error``, ``detail``, ``limit``, ``window_seconds``,
``retry_after``; ``Retry-After`` and ``RateLimit-*``), and never enters Django's middleware or
view. Allowed requests go on; their response gets the ``RateLimit-*`` headers of the tightest
rule, combining this decision with the one ``RateLimitMiddleware`` makes later for the rules
that need the user (``user`` keys, unmarked key functions).

Refusals are counted (``rate_limit_exceeded_total``, the violation events) and logged at most
once per rule and client per window; nothing else is written per refusal, so a flood costs
a few hundred microseconds a request.
"""

import json
import logging
import time

from .conf import quota_settings

logger = logging.getLogger("quotas.edge")

SCOPE_KEY = "quotas_edge"  # scope entry: {"decision": edge Decision, "decided": rule names}
_LOG_SLOTS = 4096


def edge_key(function):
    """Mark a rule key function as decidable at the ASGI edge: it takes the ASGI scope."""
    function.quotas_edge = True
    return function


def decided_at_edge(rule):
    """Whether the edge can decide ``rule`` (its key needs no Django user)."""
    if rule.key in ("ip", "global"):
        return True
    if rule.key == "user":
        return False
    from .middleware import key_function

    function = key_function(rule.key)
    return bool(getattr(function, "quotas_edge", False))


class RefusalLog:
    """Logs a refusal once per rule and client per window (bounded memory)."""

    def __init__(self, timer=time.monotonic):
        self.timer = timer
        self._until = {}

    def should_log(self, rule, client, window_seconds):
        now = self.timer()
        key = (rule, client)
        if self._until.get(key, 0.0) > now:
            return False
        if len(self._until) >= _LOG_SLOTS:
            self._until = {k: v for k, v in self._until.items() if v > now}
            if len(self._until) >= _LOG_SLOTS:
                return False
        self._until[key] = now + float(window_seconds)
        return True


refusal_log = RefusalLog()


def _headers(decisions):
    """The ``RateLimit-*`` headers of the tightest enforced state over ``decisions``."""
    from .limiter import ceil_seconds

    states = [s for d in decisions if d is not None for s in d.states if s.limit.enforce]
    if not states:
        return []
    tightest = min(states, key=lambda s: (s.remaining, -s.reset_seconds))
    return [
        (b"ratelimit-limit", str(tightest.limit.limit).encode()),
        (b"ratelimit-remaining", str(tightest.remaining).encode()),
        (b"ratelimit-reset", str(ceil_seconds(tightest.reset_seconds)).encode()),
    ]


class RateLimitEdge:
    """ASGI middleware deciding the user-independent HTTP rules before Django."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not quota_settings.ENABLED:
            return await self.application(scope, receive, send)
        from .policies import policy_cache

        snapshot = await policy_cache.aget()
        path = scope.get("path", "")
        rules = [rule for rule in snapshot.rules_for("http", path) if decided_at_edge(rule)]
        if not rules:
            return await self.application(scope, receive, send)
        decision, client = await self._decide(scope, rules)
        if not decision.allowed:
            return await self._refuse(scope, send, rules, decision, client)
        scope = dict(scope)
        scope[SCOPE_KEY] = {"decision": decision, "decided": {rule.name for rule in rules}}
        edge = scope[SCOPE_KEY]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                later = edge.get("middleware_decision")
                extra = _headers((decision, later))
                if extra:
                    names = {name for name, _ in extra}
                    kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in names]
                    message = {**message, "headers": [*kept, *extra]}
            await send(message)

        return await self.application(scope, receive, send_with_headers)

    async def _decide(self, scope, rules):
        from .guards import scope_client_ip
        from .limiter import get_limiter
        from .metrics import rate_limit_check_duration_seconds
        from .middleware import limits_for

        client = scope_client_ip(scope)
        started = time.perf_counter()
        decision = await get_limiter().ahit(limits_for(rules, client, None, scope))
        rate_limit_check_duration_seconds.labels(endpoint=rules[0].target).observe(
            time.perf_counter() - started
        )
        self._count_shadow(rules, decision)
        return decision, client

    @staticmethod
    def _count_shadow(rules, decision):
        from .events import record_violation
        from .metrics import rate_limit_exceeded_total

        for state in decision.shadow_over:
            rate_limit_exceeded_total.labels(endpoint=rules[0].target).inc()
            record_violation(state.limit.label, "http", rules[0].target, shadow=True)

    async def _refuse(self, scope, send, rules, decision, client):
        from .events import record_violation
        from .limiter import ceil_seconds
        from .metrics import rate_limit_exceeded_total

        endpoint = rules[0].target
        rate_limit_exceeded_total.labels(endpoint=endpoint).inc()
        for state in decision.refusing:
            record_violation(state.limit.label, "http", endpoint)
        refusing = max(decision.refusing, key=lambda s: s.reset_seconds)
        retry_after = max(1, ceil_seconds(refusing.reset_seconds))
        limit = refusing.limit
        if refusal_log.should_log(limit.label, client, limit.window_seconds):
            logger.info(
                "refusing %s on %s: rule %s (%s per %ss); further refusals of this client "
                "are not logged for %ss",
                client,
                endpoint,
                limit.label,
                limit.limit,
                limit.window_seconds,
                limit.window_seconds,
            )
        if quota_settings.REFUSAL_VIEW:
            return await self._refuse_with_view(scope, send, decision)
        body = json.dumps(
            {
                "error": "rate_limited",
                "detail": f"Too many requests: at most {limit.limit} per {limit.window_seconds:g} "
                f"seconds ({limit.label}). Try again in {retry_after} s.",
                "limit": limit.limit,
                "window_seconds": int(limit.window_seconds),
                "retry_after": retry_after,
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after).encode()),
            *_headers((decision,)),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _refuse_with_view(self, scope, send, decision):
        """A project's own refusal view, rendered from a request built on the scope."""
        import io

        from asgiref.sync import sync_to_async
        from django.core.handlers.asgi import ASGIRequest

        from .api import check_of, refusal_response

        request = ASGIRequest(scope, io.BytesIO())
        response = await sync_to_async(refusal_response)(request, check_of(decision))
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": response.content})


async def count_hit(scope):
    """Count a connection no route serves (an unknown WebSocket path) against the HTTP rules
    of its path (the catch-all), as a request would be; returns the Decision or None."""
    from .events import record_violation
    from .guards import scope_client_ip
    from .limiter import get_limiter
    from .metrics import rate_limit_exceeded_total
    from .middleware import limits_for
    from .policies import policy_cache

    if not quota_settings.ENABLED:
        return None
    snapshot = await policy_cache.aget()
    rules = [r for r in snapshot.rules_for("http", scope.get("path", "")) if decided_at_edge(r)]
    if not rules:
        return None
    client = scope_client_ip(scope)
    decision = await get_limiter().ahit(limits_for(rules, client, None, scope))
    if not decision.allowed:
        rate_limit_exceeded_total.labels(endpoint=rules[0].target).inc()
        for state in decision.refusing:
            record_violation(state.limit.label, scope["type"], rules[0].target)
    return decision
