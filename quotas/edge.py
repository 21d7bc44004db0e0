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
once per rule and client per window; nothing else is written per refusal. A refusal that must
stand (``RefusalMemory``) is answered again from memory, without asking the limiter (no Redis
round trip), until its limit frees or ``QUOTAS_POLICY_REFRESH_SECONDS`` pass. The rules of a
path and the client identity of a peer and X-Forwarded-For are looked up in bounded caches,
so a flood costs a few dozen microseconds of Python a request.
"""

import functools
import itertools
import logging
import time

from .conf import quota_settings
from .events import record_violation
from .limiter import Decision, LimitState, get_limiter
from .metrics import rate_limit_check_duration_seconds, rate_limit_exceeded_total
from .policies import policy_cache
from .refusal import ratelimit_headers, refusal_answer, refusing_state

logger = logging.getLogger("quotas.edge")

SCOPE_KEY = "quotas_edge"  # scope entry: {"decision": edge Decision, "decided": rule names}
_LOG_SLOTS = 4096
_MEMORY_SLOTS = 4096
_PATH_SLOTS = 1024
_PATH_CHARS = 256  # a longer path is matched against the rules each time
_ENGINES_REMEMBERED = ("redis", "local")  # exact answers; not the fail-open/closed stand-ins


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


class Deadlines:
    """A bounded map ``key -> (deadline, value)``; an entry lives while its deadline is ahead.

    When full, the expired entries go; if it is still full, ``put`` either refuses the new
    entry (``evict=False``) or drops the oldest eighth of the entries to make room.
    """

    def __init__(self, size, *, evict):
        self.size = size
        self.evict = evict
        self._entries = {}

    def live(self, key, now):
        """``(deadline, value)`` of ``key`` if its deadline is after ``now``, else None."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry[0] > now else None

    def put(self, key, deadline, now, value=None):
        """Keep ``key`` until ``deadline``; False when full and not evicting."""
        entries = self._entries
        if key not in entries and len(entries) >= self.size:
            entries = self._entries = {k: e for k, e in entries.items() if e[0] > now}
            if len(entries) >= self.size:
                if not self.evict:
                    return False
                for old in list(itertools.islice(entries, max(1, self.size // 8))):
                    del entries[old]
        entries[key] = (deadline, value)
        return True

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries = {}


class RefusalLog:
    """Logs a refusal once per rule and client per window (bounded memory)."""

    def __init__(self, timer=time.monotonic):
        self.timer = timer
        self._until = Deadlines(_LOG_SLOTS, evict=False)

    def should_log(self, rule, client, window_seconds):
        now = self.timer()
        key = (rule, client)
        if self._until.live(key, now) is not None:
            return False
        return self._until.put(key, now + float(window_seconds), now)

    def clear(self):
        self._until.clear()


refusal_log = RefusalLog()


class RefusalMemory:
    """Refusals answered without asking the limiter again while they must stand.

    A refused hit is not counted, and other processes can only add hits, so a limit that
    refused with ``reset_seconds`` T keeps refusing for T: the limiter would say the same.
    Each refusing limit (its counter key, limit and window: a rule edited to other values is
    another entry) is remembered until ``min(T, QUOTAS_POLICY_REFRESH_SECONDS)`` from now, so a
    limit an operator raised, or a counter the operator cleared, is seen within the policy
    refresh interval, as any policy edit is. Requests with a shadow limit always ask the
    limiter (it counts them). Answers of another limiter (rebuilt after a setting changed) are
    forgotten. Bounded: ``_MEMORY_SLOTS`` entries, the oldest dropped when full.
    """

    def __init__(self, timer=time.monotonic, size=_MEMORY_SLOTS):
        self.timer = timer
        self._refused = Deadlines(size, evict=True)
        self._limiter = None

    @staticmethod
    def _key(limit):
        return (limit.key, limit.limit, limit.window_seconds)

    def remember(self, limiter, decision):
        """Remember the refusing limits of ``decision``, what ``limiter`` answered."""
        if decision.allowed or decision.engine not in _ENGINES_REMEMBERED:
            return
        if limiter is not self._limiter:
            self._forget_all(limiter)
        now = self.timer()
        refresh = float(quota_settings.POLICY_REFRESH_SECONDS)
        for state in decision.refusing:
            wait = state.reset_seconds
            if wait > 0:
                until = now + min(wait, refresh)
                self._refused.put(self._key(state.limit), until, now, (now + wait, decision.engine))

    def recall(self, limiter, limits):
        """A refused ``Decision`` for ``limits`` from memory, or None: ask the limiter."""
        if limiter is not self._limiter:
            self._forget_all(limiter)
            return None
        if not len(self._refused):
            return None
        now = self.timer()
        states = []
        engine = None
        for limit in limits:
            if not limit.enforce:
                return None
            entry = self._refused.live(self._key(limit), now)
            if entry is not None:
                free_at, engine = entry[1]
                states.append(LimitState(limit, limit.limit, max(0.0, free_at - now), False))
        if not states:
            return None
        return Decision(allowed=False, states=tuple(states), engine=engine)

    def _forget_all(self, limiter):
        self._refused.clear()
        self._limiter = limiter

    def clear(self):
        self._refused.clear()


refusal_memory = RefusalMemory()


class EdgeRules:
    """The rules the edge decides for a path, per policy snapshot (bounded cache)."""

    def __init__(self, size=_PATH_SLOTS):
        self.size = size
        self._snapshot = None
        self._rules = {}

    def of(self, snapshot, path):
        if snapshot is not self._snapshot:
            self._snapshot, self._rules = snapshot, {}
        rules = self._rules.get(path)
        if rules is None:
            rules = tuple(r for r in snapshot.rules_for("http", path) if decided_at_edge(r))
            if len(path) <= _PATH_CHARS:
                if len(self._rules) >= self.size:
                    self._rules = {}
                self._rules[path] = rules
        return rules


edge_rules = EdgeRules()


async def decide(scope, memory=refusal_memory):
    """Count one hit of ``scope`` (HTTP or WebSocket) against the edge's rules of its path.

    Returns ``(rules, client, decision)``, or None when no such rule applies. Refusals and
    shadow overs are counted here (``rate_limit_exceeded_total``, the violation events).
    """
    from .guards import scope_client_ip
    from .middleware import limits_for

    rules = edge_rules.of(await policy_cache.aget(), scope.get("path", ""))
    if not rules:
        return None
    client = scope_client_ip(scope)
    limits = limits_for(rules, client, None, scope)
    limiter = get_limiter()
    decision = memory.recall(limiter, limits)
    endpoint = rules[0].target
    if decision is None:
        started = time.perf_counter()
        decision = await limiter.ahit(limits)
        rate_limit_check_duration_seconds.labels(endpoint=endpoint).observe(
            time.perf_counter() - started
        )
        memory.remember(limiter, decision)
    _count(scope["type"], endpoint, decision)
    return rules, client, decision


def _count(kind, endpoint, decision):
    exceeded = None
    for state in decision.states:
        if state.over:
            exceeded = exceeded or _exceeded_counter(endpoint)
            if not state.limit.enforce:
                exceeded.inc()
                record_violation(state.limit.label, kind, endpoint, shadow=True)
            elif not decision.allowed:
                record_violation(state.limit.label, kind, endpoint)
    if not decision.allowed:
        (exceeded or _exceeded_counter(endpoint)).inc()


@functools.lru_cache(maxsize=256)
def _exceeded_counter(endpoint):
    """``rate_limit_exceeded_total`` of one endpoint (a rule's target: the policy's, bounded)."""
    return rate_limit_exceeded_total.labels(endpoint=endpoint)


class RateLimitEdge:
    """ASGI middleware deciding the user-independent HTTP rules before Django."""

    def __init__(self, application, memory=refusal_memory):
        self.application = application
        self.memory = memory

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not quota_settings.ENABLED:
            return await self.application(scope, receive, send)
        decided = await decide(scope, self.memory)
        if decided is None:
            return await self.application(scope, receive, send)
        rules, client, decision = decided
        if not decision.allowed:
            return await self._refuse(scope, send, rules, decision, client)
        scope = dict(scope)
        scope[SCOPE_KEY] = {"decision": decision, "decided": {rule.name for rule in rules}}
        edge = scope[SCOPE_KEY]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = ratelimit_headers(decision, edge.get("middleware_decision")).asgi
                if extra:
                    names = {name for name, _ in extra}
                    kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in names]
                    message = {**message, "headers": [*kept, *extra]}
            await send(message)

        return await self.application(scope, receive, send_with_headers)

    async def _refuse(self, scope, send, rules, decision, client):
        limit = refusing_state(decision).limit
        if refusal_log.should_log(limit.label, client, limit.window_seconds):
            logger.info(
                "refusing %s on %s: rule %s (%s per %ss); further refusals of this client "
                "are not logged for %ss",
                client,
                rules[0].target,
                limit.label,
                limit.limit,
                limit.window_seconds,
                limit.window_seconds,
            )
        if quota_settings.REFUSAL_VIEW:
            return await self._refuse_with_view(scope, send, decision)
        answer = refusal_answer(decision)
        await send(
            {"type": "http.response.start", "status": 429, "headers": list(answer.headers.asgi)}
        )
        await send({"type": "http.response.body", "body": answer.body})

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
    if not quota_settings.ENABLED:
        return None
    decided = await decide(scope)
    return None if decided is None else decided[2]
