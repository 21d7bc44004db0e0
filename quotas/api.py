"""The public API for code: count a request against a named rule, with or without a response.

``quotas.check(request_or_scope, rule_name)`` counts one hit of a Django request or an ASGI
scope against the enabled rule called ``rule_name`` and returns a ``Check`` (allowed,
remaining, retry_after, ...) without making a response; ``quotas.acheck`` is the same for
async code. ``@quotas.ratelimit(rule_name)`` wraps a sync or async view: a refused request
gets the refusal response (``QUOTAS_REFUSAL_VIEW``, default the JSON 429 of the middleware)
and never reaches the view.

A rule's ``key`` says who is counted: ``ip`` (the client identity), ``user`` (the signed-in
user, else the client), ``global`` (everyone), or the dotted path of a callable
``key(request_or_scope) -> str``. Rules meant only for code take the ``view`` scope, so the
middleware never applies them by path. An unknown or disabled rule allows everything and
logs one warning per name.
"""

import functools
import logging
from dataclasses import dataclass

from asgiref.sync import iscoroutinefunction, sync_to_async

from .conf import quota_settings

logger = logging.getLogger("quotas.api")

_warned = set()


@dataclass(frozen=True)
class Check:
    """The outcome of one counted hit against one rule."""

    allowed: bool
    rule: str
    limit: int = 0
    remaining: int = 0
    window_seconds: int = 0
    retry_after: int = 0  # whole seconds until a refused hit could pass (0 when allowed)
    decision: object = None  # the limiter's Decision (None when no rule applied)

    def __bool__(self):
        return self.allowed


def _rule(snapshot, rule_name):
    for rule in snapshot.rules:
        if rule.name == rule_name:
            return rule
    if rule_name not in _warned:
        _warned.add(rule_name)
        logger.warning("no enabled rate-limit rule %r: hits are not counted", rule_name)
    return None


def _identity(request_or_scope):
    """(client identity, user id or None) of a Django request or an ASGI scope."""
    from .guards import scope_client_ip
    from .middleware import request_client_ip

    if isinstance(request_or_scope, dict):
        user = request_or_scope.get("user")
        client = scope_client_ip(request_or_scope)
    else:
        user = getattr(request_or_scope, "user", None)
        client = request_client_ip(request_or_scope)
    user_id = user.pk if user is not None and getattr(user, "is_authenticated", False) else None
    return client, user_id


def check_of(decision):
    """A limiter ``Decision`` as a ``Check``: the refusing limit that frees last, else the
    tightest one."""
    from .limiter import ceil_seconds

    if decision.refusing:
        state = max(decision.refusing, key=lambda s: s.reset_seconds)
    else:
        state = decision.tightest or (decision.states[0] if decision.states else None)
    if state is None:
        return Check(decision.allowed, "", decision=decision)
    retry = max(1, ceil_seconds(decision.retry_after)) if not decision.allowed else 0
    return Check(
        allowed=decision.allowed,
        rule=state.limit.label,
        limit=state.limit.limit,
        remaining=state.remaining,
        window_seconds=int(state.limit.window_seconds),
        retry_after=retry,
        decision=decision,
    )


def _record(rule, decision):
    from .events import record_violation
    from .metrics import rate_limit_exceeded_total

    if not decision.allowed:
        rate_limit_exceeded_total.labels(endpoint=f"rule:{rule.name}").inc()
        record_violation(rule.name, rule.scope, f"rule:{rule.name}")
    elif decision.shadow_over:
        record_violation(rule.name, rule.scope, f"rule:{rule.name}", shadow=True)


# One plan for check() and acheck(); only reading the snapshot, the identity and the
# limiter's call differ (sync or async).


def _applicable(snapshot, rule_name):
    """The enabled rule to count against, or None (quotas off, no such rule): allow."""
    return _rule(snapshot, rule_name) if snapshot is not None else None


def _limits(rule, request_or_scope):
    from .middleware import limits_for

    client, user_id = _identity(request_or_scope)
    return limits_for((rule,), client, user_id, request_or_scope)


def _outcome(rule, decision):
    _record(rule, decision)
    return check_of(decision)


def check(request_or_scope, rule_name):
    """Count one hit against ``rule_name`` (sync); a ``Check`` says whether it may go on."""
    from .limiter import get_limiter
    from .policies import policy_cache

    snapshot = policy_cache.get() if quota_settings.ENABLED else None
    rule = _applicable(snapshot, rule_name)
    if rule is None:
        return Check(True, rule_name)
    return _outcome(rule, get_limiter().hit(_limits(rule, request_or_scope)))


async def acheck(request_or_scope, rule_name):
    """``check()`` for async code: the limiter's Redis call does not block the event loop."""
    from .limiter import get_limiter
    from .policies import policy_cache

    snapshot = await policy_cache.aget() if quota_settings.ENABLED else None
    rule = _applicable(snapshot, rule_name)
    if rule is None:
        return Check(True, rule_name)
    limits = await sync_to_async(_limits)(rule, request_or_scope)  # a lazy user may query
    return _outcome(rule, await get_limiter().ahit(limits))


def refusal_response(request, result):
    """The response to a refused request: ``QUOTAS_REFUSAL_VIEW(request, result)``, else the
    JSON 429 of the contract (``error``, ``detail``, ``limit``, ``window_seconds``,
    ``retry_after``; ``Retry-After`` and ``RateLimit-*`` headers)."""
    from django.utils.module_loading import import_string

    from .middleware import too_many_requests

    path = quota_settings.REFUSAL_VIEW
    if path:
        return import_string(path)(request, result)
    return too_many_requests(result.decision)


def ratelimit(rule_name):
    """Decorate a sync or async Django view: each call counts against ``rule_name``."""

    def decorate(view):
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request, *args, **kwargs):
                result = await acheck(request, rule_name)
                if not result.allowed:
                    return refusal_response(request, result)
                return await view(request, *args, **kwargs)

            return async_view

        @functools.wraps(view)
        def sync_view(request, *args, **kwargs):
            result = check(request, rule_name)
            if not result.allowed:
                return refusal_response(request, result)
            return view(request, *args, **kwargs)

        return sync_view

    return decorate
