"""The policy snapshot each process enforces, and how edits reach every process.

Every save or delete of a rule, price or budget policy bumps ``PolicyVersion`` (signals.py)
in the same transaction. Each process keeps an immutable ``PolicySnapshot`` and compares its
version with the database's at most every ``QUOTAS_POLICY_REFRESH_SECONDS`` (default 0.5 s),
so an edit from the admin, a shell or another instance is live everywhere within a second,
with or without Redis. A save in this process invalidates at once.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.db import DatabaseError

from .conf import quota_settings
from .defaults import DEFAULT_BUDGET

logger = logging.getLogger("quotas.policies")


@dataclass(frozen=True)
class RuleSpec:
    """An enabled rate-limit rule as the enforcement code sees it."""

    name: str
    scope: str
    target: str
    key: str
    limit: int
    window_seconds: int
    shadow: bool

    @property
    def is_catch_all(self):
        return self.target == "*"

    def matches(self, path):
        if self.target == "*":
            return True
        if self.target.endswith("*"):
            return path.startswith(self.target[:-1])
        return path == self.target

    @property
    def specificity(self):
        """Exact paths beat prefixes, longer prefixes beat shorter ones, ``*`` is last."""
        if self.target == "*":
            return (0, 0)
        if self.target.endswith("*"):
            return (1, len(self.target))
        return (2, len(self.target))


@dataclass(frozen=True)
class BudgetSpec:
    """The active budget policy's caps (defaults: ``quotas.defaults.DEFAULT_BUDGET``)."""

    session_cap_usd: Decimal = DEFAULT_BUDGET["session_cap_usd"]
    session_max_seconds: int = DEFAULT_BUDGET["session_max_seconds"]
    hourly_cap_usd: Decimal = DEFAULT_BUDGET["hourly_cap_usd"]
    breaker_threshold_usd: Decimal = DEFAULT_BUDGET["breaker_threshold_usd"]
    breaker_cooldown_seconds: int = DEFAULT_BUDGET["breaker_cooldown_seconds"]
    max_concurrent_sessions_per_client: int = DEFAULT_BUDGET["max_concurrent_sessions_per_client"]
    max_output_tokens_per_response: int = DEFAULT_BUDGET["max_output_tokens_per_response"]

    FIELDS = (
        "session_cap_usd",
        "session_max_seconds",
        "hourly_cap_usd",
        "breaker_threshold_usd",
        "breaker_cooldown_seconds",
        "max_concurrent_sessions_per_client",
        "max_output_tokens_per_response",
    )


@dataclass(frozen=True)
class SpendLimitSpec:
    """An enabled spend limit as the enforcement code sees it."""

    name: str
    key: str  # client | user | global
    cap_usd: Decimal
    period: str  # rolling | day | week | month
    window_seconds: int | None = None
    group_id: int | None = None
    alert_at_percent: int | None = None
    shadow: bool = False

    @property
    def signature(self):
        """Limits with the same signature are alternatives: a tier replaces the untiered one."""
        return (self.key, self.period, self.window_seconds if self.period == "rolling" else None)


@dataclass(frozen=True)
class PolicySnapshot:
    """Everything enforcement needs, loaded in one go and never mutated."""

    version: int
    rules: tuple = ()
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    spend_limits: tuple = ()

    def rules_for(self, scope, target):
        """The rules a hit on ``target`` counts against, most specific first.

        The most specific matching rule(s) of the scope and, for HTTP, every catch-all (``*``)
        rule as well. For tools, the rules naming the tool.
        """
        if scope == "tool":
            return tuple(r for r in self.rules if r.scope == "tool" and r.target == target)
        matching = [r for r in self.rules if r.scope == scope and r.matches(target)]
        specific = [r for r in matching if not r.is_catch_all]
        chosen = []
        if specific:
            best = max(r.specificity for r in specific)
            chosen = [r for r in specific if r.specificity == best]
        if scope == "http" or not chosen:
            chosen += [r for r in matching if r.is_catch_all]
        return tuple(chosen)


def rule_path(scope, target):
    """The path an http/websocket rule targets: its own, or its URL name's (None: unknown)."""
    if scope not in ("http", "websocket") or not target or target[0] in "/*":
        return target
    from django.urls import NoReverseMatch, reverse

    try:
        return reverse(target)
    except NoReverseMatch:
        return None


def load_snapshot():
    """Read policies from the database (sync; call through ``sync_to_async`` from async code)."""
    from .models import BudgetPolicy, PolicyVersion, RateLimitRule, SpendLimit

    version = PolicyVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0
    rules = []
    for r in RateLimitRule.objects.filter(enabled=True).order_by("name"):
        target = rule_path(r.scope, r.target)
        if target is None:
            logger.warning("rule %s: no URL is named %r; the rule is not applied", r.name, r.target)
            continue
        rules.append(
            RuleSpec(
                name=r.name,
                scope=r.scope,
                target=target,
                key=r.key,
                limit=r.limit,
                window_seconds=r.window_seconds,
                shadow=r.shadow,
            )
        )
    rules = tuple(rules)
    policy = BudgetPolicy.objects.filter(active=True).first()
    budget = BudgetSpec()
    if policy is not None:
        budget = BudgetSpec(**{name: getattr(policy, name) for name in BudgetSpec.FIELDS})
    spend_limits = tuple(
        SpendLimitSpec(
            name=limit.name,
            key=limit.key,
            cap_usd=limit.cap_usd,
            period=limit.period,
            window_seconds=limit.window_seconds,
            group_id=limit.group_id,
            alert_at_percent=limit.alert_at_percent,
            shadow=limit.shadow,
        )
        for limit in SpendLimit.objects.filter(enabled=True).order_by("name")
    )
    return PolicySnapshot(version=version, rules=rules, budget=budget, spend_limits=spend_limits)


def read_version():
    """The database's current policy version (one indexed single-row read)."""
    from .models import PolicyVersion

    return PolicyVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0


class PolicyCache:
    """This process's snapshot, re-read when the database version moves."""

    def __init__(self, timer=time.monotonic):
        self.timer = timer
        self._snapshot = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def invalidate(self):
        """Forget the snapshot: the next access reloads."""
        with self._lock:
            self._snapshot = None
            self._checked_at = float("-inf")

    def _due(self):
        return self._snapshot is None or (
            self.timer() - self._checked_at >= float(quota_settings.POLICY_REFRESH_SECONDS)
        )

    def get(self):
        """The current snapshot (sync)."""
        if not self._due():
            return self._snapshot
        return self._refresh()

    async def aget(self):
        """The current snapshot; only a due refresh leaves the event loop."""
        if not self._due():
            return self._snapshot
        return await sync_to_async(self._refresh, thread_sensitive=True)()

    def _refresh(self):
        with self._lock:
            if not self._due():
                return self._snapshot
            snapshot = self._snapshot
            try:
                if snapshot is None or read_version() != snapshot.version:
                    snapshot = load_snapshot()
                    if self._snapshot is not None:
                        logger.info("policies reloaded at version %s", snapshot.version)
            except DatabaseError as exc:
                if snapshot is None:
                    raise
                # Keep enforcing the last policies while the database is away; look again
                # after the usual interval rather than on every request.
                logger.warning(
                    "policies not refreshed (%s); keeping version %s", exc, snapshot.version
                )
            self._snapshot = snapshot
            self._checked_at = self.timer()
            return snapshot


policy_cache = PolicyCache()
