"""HTTP rate limiting: match the request's rules, decide in one call, answer 429 or go on."""

import functools
import logging
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpResponse

from .clientip import client_address, configured_client_ip
from .conf import quota_settings
from .edge import SCOPE_KEY as EDGE_SCOPE_KEY
from .events import record_violation
from .limiter import Limit, get_limiter
from .metrics import rate_limit_check_duration_seconds, rate_limit_exceeded_total
from .policies import policy_cache
from .refusal import ratelimit_headers, refusal_answer

logger = logging.getLogger("quotas.middleware")


def request_client_ip(request):
    """The client identity of a Django request: what its limits are counted under."""
    return configured_client_ip(
        request.META.get("REMOTE_ADDR", ""), request.META.get("HTTP_X_FORWARDED_FOR", "")
    )


def request_client_address(request):
    """The client's own address per ``QUOTAS_TRUSTED_PROXIES`` (not widened), or None."""
    return client_address(
        request.META.get("REMOTE_ADDR", ""),
        request.META.get("HTTP_X_FORWARDED_FOR", ""),
        quota_settings.TRUSTED_PROXIES,
    )


def rule_key(rule, ip, user_id=None, target=None):
    """Who a hit of ``rule`` counts for: ``ip``, ``user`` (else ip), ``global``, or the value
    of the rule's key callable for ``target`` (a Django request or an ASGI scope)."""
    if rule.key == "global":
        return "global"
    if rule.key == "user":
        return f"user:{user_id}" if user_id is not None else f"ip:{ip}"
    if rule.key == "ip":
        return f"ip:{ip}"
    function = key_function(rule.key)
    value = function(target) if function is not None and target is not None else None
    # A key function that has nothing to say counts the client, never nobody.
    return f"key:{value}" if value else f"ip:{ip}"


@functools.lru_cache(maxsize=64)
def key_function(path):
    """The callable a rule's dotted-path ``key`` names (None, logged, when it cannot load)."""
    from django.utils.module_loading import import_string

    try:
        function = import_string(path)
    except ImportError:
        logger.warning("rate-limit key %r cannot be imported; counting per client", path)
        return None
    return function


def limits_for(rules, ip, user_id=None, target=None):
    """One ``Limit`` per rule, keyed by the rule and the client it counts."""
    limits = []
    for rule in rules:
        who = rule_key(rule, ip, user_id, target)
        limits.append(
            Limit(
                key=f"{rule.name}:{who}",
                limit=rule.limit,
                window_seconds=rule.window_seconds,
                enforce=not rule.shadow,
                label=rule.name,
            )
        )
    return limits


def too_many_requests(decision):
    """The 429 of the contract for a refused ``decision`` (``quotas.refusal``) as a Django
    response."""
    answer = refusal_answer(decision)
    response = HttpResponse(answer.body, status=429, content_type="application/json")
    for name, value in answer.headers.text:
        if name not in ("Content-Type", "Content-Length"):
            response[name] = value
    # Counted in metrics and violation events: not one django.request WARNING per refusal.
    response._has_been_logged = True
    return response


def add_ratelimit_headers(response, decision):
    """``RateLimit-Limit``, ``-Remaining``, ``-Reset`` of the tightest enforced limit."""
    for name, value in ratelimit_headers(decision).text:
        response[name] = value


class RateLimitMiddleware:
    """Applies the HTTP rules of the policy snapshot to every request (sync or async)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        if not quota_settings.ENABLED:
            return self.get_response(request)
        rules, edge = self._rules(request, policy_cache.get())
        if not rules:
            return self.get_response(request)
        user_id = None
        if any(rule.key == "user" for rule in rules):
            user = getattr(request, "user", None)
            user_id = user.pk if user is not None and user.is_authenticated else None
        limits = limits_for(rules, request_client_ip(request), user_id, request)
        started = time.perf_counter()
        decision = get_limiter().hit(limits)
        if edge is not None:
            edge["middleware_decision"] = decision
        return self._respond(request, rules, decision, started, self.get_response)

    async def __acall__(self, request):
        if not quota_settings.ENABLED:
            return await self.get_response(request)
        rules, edge = self._rules(request, await policy_cache.aget())
        if not rules:
            return await self.get_response(request)
        user_id = None
        if any(rule.key == "user" for rule in rules) and hasattr(request, "auser"):
            user = await request.auser()
            user_id = user.pk if user.is_authenticated else None
        limits = limits_for(rules, request_client_ip(request), user_id, request)
        started = time.perf_counter()
        decision = await get_limiter().ahit(limits)
        if edge is not None:
            edge["middleware_decision"] = decision  # the edge merges the RateLimit-* headers
        response = self._respond(request, rules, decision, started, None)
        if response is None:
            response = await self.get_response(request)
            self._add_headers(response, decision)
        return response

    @staticmethod
    def _rules(request, snapshot):
        """The rules this middleware decides, and the edge's record when ``RateLimitEdge``
        has decided the others already (``quotas.edge``)."""
        rules = snapshot.rules_for("http", request.path)
        scope = getattr(request, "scope", None)
        edge = scope.get(EDGE_SCOPE_KEY) if scope is not None else None
        if edge is not None and rules:
            rules = tuple(rule for rule in rules if rule.name not in edge["decided"])
        return rules, edge

    def _respond(self, request, rules, decision, started, get_response):
        endpoint = rules[0].target
        rate_limit_check_duration_seconds.labels(endpoint=endpoint).observe(
            time.perf_counter() - started
        )
        for state in decision.shadow_over:
            rate_limit_exceeded_total.labels(endpoint=endpoint).inc()
            record_violation(state.limit.label, "http", endpoint, shadow=True)
            logger.info(
                "shadow rule %s over its limit (%s/%ss) for %s",
                state.limit.label,
                state.limit.limit,
                state.limit.window_seconds,
                request.path,
            )
        if not decision.allowed:
            rate_limit_exceeded_total.labels(endpoint=endpoint).inc()
            for state in decision.refusing:
                record_violation(state.limit.label, "http", endpoint)
            return self._refusal(request, decision)
        if get_response is None:
            return None
        response = get_response(request)
        self._add_headers(response, decision)
        return response

    @staticmethod
    def _add_headers(response, decision):
        add_ratelimit_headers(response, decision)

    def _refusal(self, request, decision):
        if quota_settings.REFUSAL_VIEW:
            from .api import check_of, refusal_response

            return refusal_response(request, check_of(decision))
        return too_many_requests(decision)
