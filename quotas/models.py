"""Quota policies edited in the admin: rate-limit rules, model prices, tool prices, the budget
policy and spend limits; the ledger of sessions and usage; bounded event records."""

import re
import uuid
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.module_loading import import_string

from .defaults import DEFAULT_BUDGET
from .pricing import TOKEN_KINDS, USD_QUANTUM

USD = USD_QUANTUM  # quantum of money in the ledger and in prices (quotas.pricing)
_PATH_TARGET = re.compile(r"^(\*|/[^\s*]*\*?)$")
_URL_NAME = re.compile(r"^[A-Za-z_][\w.-]*(:[A-Za-z_][\w.-]*)*$")
_TOOL_TARGET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RateLimitRule(models.Model):
    """At most ``limit`` hits per ``window_seconds`` (moving window) for one target and key."""

    class Scope(models.TextChoices):
        HTTP = "http", "HTTP request"
        WEBSOCKET = "websocket", "WebSocket connection"
        TOOL = "tool", "Tool call"
        VIEW = "view", "Named in code (quotas.ratelimit / quotas.check)"

    class Key(models.TextChoices):
        IP = "ip", "per client IP"
        USER = "user", "per signed-in user (IP when anonymous)"
        GLOBAL = "global", "one shared counter"

    name = models.SlugField(max_length=64, unique=True)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.HTTP)
    target = models.CharField(
        max_length=200,
        blank=True,
        help_text="HTTP/WebSocket: an exact path (/status), a prefix ending in * (/api/*), "
        "* for any path, or a URL name (admin:login). Tool: the tool name (weather, "
        "web_search). View: not used (leave empty).",
    )
    key = models.CharField(
        max_length=200,
        default=Key.IP,
        help_text="ip, user or global, or the dotted path of a function "
        "key(request_or_scope) -> str (e.g. myapp.keys.api_token).",
    )
    limit = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    window_seconds = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    enabled = models.BooleanField(default=True)
    shadow = models.BooleanField(
        default=False, help_text="Count and log hits over the limit, but do not refuse them."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scope", "name"]
        constraints = [
            models.CheckConstraint(condition=Q(limit__gt=0), name="quotas_rule_limit_positive"),
            models.CheckConstraint(
                condition=Q(window_seconds__gt=0), name="quotas_rule_window_positive"
            ),
        ]

    def __str__(self):
        return f"{self.name}: {self.limit}/{self.window_seconds}s on {self.scope} {self.target}"

    def clean(self):
        target = (self.target or "").strip()
        key = (self.key or "").strip()
        errors = {}
        if self.scope == self.Scope.TOOL:
            if not _TOOL_TARGET.match(target):
                errors["target"] = "A tool rule's target is a tool name: letters, digits, _ . -"
        elif self.scope == self.Scope.VIEW:
            target = ""
        elif _URL_NAME.match(target) and target != "*":
            try:
                reverse(target)
            except NoReverseMatch:
                errors["target"] = (
                    f"No URL is named {target!r} (or it needs arguments): use a URL name "
                    "without arguments, or a path."
                )
        elif not _PATH_TARGET.match(target):
            errors["target"] = (
                "Use an exact path starting with / (/status), a prefix ending "
                "in a single * (/api/*), * alone for any path, or a URL name (admin:login)."
            )
        if key not in self.Key.values:
            try:
                function = import_string(key)
            except ImportError:
                function = None
            if not callable(function):
                errors["key"] = (
                    "Use ip, user or global, or the dotted path of an importable function "
                    "key(request_or_scope) -> str."
                )
        if errors:
            raise ValidationError(errors)
        self.target = target
        self.key = key


class ModelPrice(models.Model):
    """USD per 1M tokens of one model, by token kind, from ``effective_from`` on."""

    TOKEN_KINDS = TOKEN_KINDS

    model = models.CharField(max_length=100, db_index=True)
    text_input = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    cached_text_input = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    audio_input = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    cached_audio_input = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    text_output = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    audio_output = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    effective_from = models.DateTimeField(default=timezone.now)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="quotas_price_unique"),
        ]

    def __str__(self):
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M}"

    def clean(self):
        self.model = (self.model or "").strip()
        if not self.model:
            raise ValidationError({"model": "Name the model, e.g. gpt-realtime."})


class BudgetPolicy(models.Model):
    """Spend and time caps; exactly one row is active."""

    name = models.CharField(max_length=64, default="default")
    active = models.BooleanField(default=True)
    session_cap_usd = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        default=DEFAULT_BUDGET["session_cap_usd"],
        validators=[MinValueValidator(0)],
    )
    session_max_seconds = models.PositiveIntegerField(
        default=DEFAULT_BUDGET["session_max_seconds"], validators=[MinValueValidator(1)]
    )
    hourly_cap_usd = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        default=DEFAULT_BUDGET["hourly_cap_usd"],
        validators=[MinValueValidator(0)],
    )
    breaker_threshold_usd = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        default=DEFAULT_BUDGET["breaker_threshold_usd"],
        validators=[MinValueValidator(0)],
    )
    breaker_cooldown_seconds = models.PositiveIntegerField(
        default=DEFAULT_BUDGET["breaker_cooldown_seconds"], validators=[MinValueValidator(1)]
    )
    max_concurrent_sessions_per_client = models.PositiveIntegerField(
        default=DEFAULT_BUDGET["max_concurrent_sessions_per_client"],
        validators=[MinValueValidator(1)],
    )
    max_output_tokens_per_response = models.PositiveIntegerField(
        default=DEFAULT_BUDGET["max_output_tokens_per_response"],
        validators=[MinValueValidator(1), MaxValueValidator(4096)],
        help_text="Sent upstream as max_output_tokens: bounds each response's output, so its "
        "worst-case cost is known before it starts (1-4096).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "budget policies"
        constraints = [
            models.UniqueConstraint(
                fields=["active"], condition=Q(active=True), name="quotas_one_active_budget"
            ),
        ]

    def __str__(self):
        return f"{self.name} ({'active' if self.active else 'inactive'})"

    def clean(self):
        errors = {}
        if self.session_cap_usd is not None and self.session_cap_usd <= 0:
            errors["session_cap_usd"] = "The session cap must be more than $0."
        if self.hourly_cap_usd is not None and self.hourly_cap_usd <= 0:
            errors["hourly_cap_usd"] = "The hourly cap must be more than $0."
        if (
            self.breaker_threshold_usd is not None
            and self.hourly_cap_usd is not None
            and self.breaker_threshold_usd < self.hourly_cap_usd
        ):
            errors["breaker_threshold_usd"] = (
                "The circuit-breaker threshold must be at least the hourly cap "
                f"(${self.hourly_cap_usd}); otherwise the breaker trips before the cap refuses."
            )
        if self.active:
            others = BudgetPolicy.objects.filter(active=True).exclude(pk=self.pk)
            if others.exists():
                errors["active"] = (
                    "Only one budget policy can be active; "
                    f"deactivate {others.first().name!r} first."
                )
        if errors:
            raise ValidationError(errors)

    def warnings(self):
        """Settings that are allowed but probably not meant (shown by the admin on save)."""
        found = []
        cap = self.session_cap_usd
        if cap is not None and self.hourly_cap_usd is not None and cap > self.hourly_cap_usd:
            found.append(
                f"The session cap (${cap}) is above the hourly cap (${self.hourly_cap_usd}): "
                "one session can spend the whole hour's budget."
            )
        threshold = self.breaker_threshold_usd
        if cap is not None and threshold is not None and cap > threshold:
            found.append(
                f"The session cap (${cap}) is above the circuit-breaker threshold "
                f"(${threshold}): one session can pause the service for everyone."
            )
        return found


class SpendLimit(models.Model):
    """At most ``cap_usd`` spent per key (client, user or everyone) per period.

    ``rolling`` periods are a moving window of ``window_seconds``; ``day``, ``week`` (from
    Monday) and ``month`` reset at local midnight in ``QUOTAS_BUDGET_TIMEZONE``. A limit with a
    ``group`` is a tier: it applies only to signed-in members of that group and, for them,
    replaces the limits of the same key and period that have no group (the most generous tier
    wins when a user is in several).
    """

    class Key(models.TextChoices):
        CLIENT = "client", "per client (address)"
        USER = "user", "per signed-in user (client when anonymous)"
        GLOBAL = "global", "everyone together"

    class Period(models.TextChoices):
        ROLLING = "rolling", "rolling window"
        DAY = "day", "calendar day"
        WEEK = "week", "calendar week (from Monday)"
        MONTH = "month", "calendar month"

    name = models.SlugField(max_length=64, unique=True)
    key = models.CharField(max_length=16, choices=Key.choices, default=Key.CLIENT)
    cap_usd = models.DecimalField(max_digits=12, decimal_places=6)
    period = models.CharField(max_length=16, choices=Period.choices, default=Period.ROLLING)
    window_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Length of a rolling window; only for rolling periods."
    )
    group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        help_text="A tier: only signed-in members of this group, in place of the untiered limit.",
    )
    alert_at_percent = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(99)],
        help_text="Alert the operator once per key and window when spend passes this share.",
    )
    enabled = models.BooleanField(default=True)
    shadow = models.BooleanField(default=False, help_text="Count, log and alert, but never refuse.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key", "name"]
        constraints = [
            models.CheckConstraint(condition=Q(cap_usd__gt=0), name="quotas_spendlimit_cap"),
        ]

    def __str__(self):
        span = f"{self.window_seconds}s" if self.period == self.Period.ROLLING else self.period
        tier = f" for {self.group}" if self.group_id else ""
        return f"{self.name}: ${self.cap_usd} per {self.key} per {span}{tier}"

    def clean(self):
        errors = {}
        if self.cap_usd is not None and self.cap_usd <= 0:
            errors["cap_usd"] = "The cap must be more than $0."
        if self.period == self.Period.ROLLING:
            if not self.window_seconds:
                errors["window_seconds"] = (
                    "A rolling limit needs its window in seconds (e.g. 3600 for an hour)."
                )
        elif self.window_seconds:
            errors["window_seconds"] = (
                "Only rolling limits take a window; calendar periods reset at local midnight."
            )
        if self.alert_at_percent is not None and not 1 <= self.alert_at_percent <= 99:
            errors["alert_at_percent"] = (
                "Alert between 1 and 99 percent of the cap, or leave empty."
            )
        if errors:
            raise ValidationError(errors)


class ToolPrice(models.Model):
    """USD per call of a server-side tool, billed on top of its tokens, from a date on."""

    tool = models.CharField(max_length=64, db_index=True)
    per_call_usd = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(0)]
    )
    effective_from = models.DateTimeField(default=timezone.now)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["tool", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["tool", "effective_from"], name="quotas_toolprice_unique"
            ),
        ]

    def __str__(self):
        return f"{self.tool} ${self.per_call_usd}/call from {self.effective_from:%Y-%m-%d}"


class PolicyVersion(models.Model):
    """One row whose ``version`` grows on every policy change; processes poll it to reload."""

    version = models.BigIntegerField(default=0)
    changed_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"policy version {self.version}"


class TokenColumns(models.Model):
    """Token columns by billing kind (``TOKEN_KINDS``) of the ledger's sessions and records;
    the Realtime add-on's ``quotas.realtime.usage.TokenCounts`` is the value they store."""

    text_input = models.BigIntegerField(default=0)
    cached_text_input = models.BigIntegerField(default=0)
    audio_input = models.BigIntegerField(default=0)
    cached_audio_input = models.BigIntegerField(default=0)
    text_output = models.BigIntegerField(default=0)
    audio_output = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class QuotaSession(TokenColumns):
    """One WebSocket session's ledger header: who, which model, when, why it ended, what it cost.

    Token totals are by billing kind, like ``UsageRecord``: ``text_input`` excludes the cached
    text tokens counted in ``cached_text_input`` (same for audio), so
    cost = sum(tokens x price per token) holds row by row.
    """

    class EndReason(models.TextChoices):
        CLIENT_CLOSED = "client_closed", "client closed"
        BUDGET = "budget", "session budget spent"
        DURATION = "duration", "session duration reached"
        HOURLY_CAP = "hourly_cap", "hourly cap reached"
        BREAKER = "breaker", "circuit breaker open"
        UPSTREAM_ERROR = "upstream_error", "upstream error"
        SERVER_SHUTDOWN = "server_shutdown", "server shutdown"
        SERVER_CRASH = "server_crash", "server crashed (closed by the sweep)"
        CLIENT_BUDGET = "client_budget", "client spend limit reached"
        USER_BUDGET = "user_budget", "user spend limit reached"
        GLOBAL_BUDGET = "global_budget", "global spend limit reached"
        IDLE = "idle", "idle"
        ERROR = "error", "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.CharField(max_length=100, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="quota_sessions",
    )
    model = models.CharField(max_length=100)
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # Refreshed by the running process; an open session whose heartbeat stopped belongs to a
    # process that is gone (closed by ``quotas_close_stale`` as ``server_crash``).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    slot = models.CharField(
        max_length=64, blank=True, default="", db_default="", help_text="Concurrent-session slot."
    )
    end_reason = models.CharField(max_length=32, choices=EndReason.choices, blank=True)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["ended_at"], name="quotas_session_ended_idx")]

    def __str__(self):
        return f"session {self.id} ({self.client}, {self.model})"


class UsageRecord(TokenColumns):
    """One billed usage event (a response, a transcription or a tool call), booked once."""

    class Kind(models.TextChoices):
        RESPONSE = "response", "realtime response"
        TRANSCRIPTION = "transcription", "input transcription"
        TOOL = "tool", "tool call"
        TOOL_FEE = "tool_fee", "tool call fee"

    session = models.ForeignKey(QuotaSession, on_delete=models.PROTECT, related_name="usage")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    model = models.CharField(max_length=100)
    # The idempotency key: response id, transcription item id or tool call id.
    response_id = models.CharField(max_length=128)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6)
    unknown_model = models.BooleanField(default=False)
    estimated = models.BooleanField(
        default=False,
        db_default=False,
        help_text="A reservation's worst case, booked before the response started; replaced "
        "by the exact usage at response.done (kept if the server crashed first).",
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "response_id"], name="quotas_usage_once_per_session"
            ),
        ]
        # Reports group a date range by model (spend by model, by token kind).
        indexes = [
            models.Index(fields=["created_at", "model"], name="quotas_usage_created_model_idx")
        ]

    def __str__(self):
        return f"{self.kind} {self.response_id}: ${self.cost_usd}"


# -- Events: bounded records of refusals, tool calls, breaker transitions and policy edits ------


class RateLimitViolation(models.Model):
    """Refused (or shadow-over) hits of one rule at one endpoint, counted per minute."""

    minute = models.DateTimeField(help_text="Start of the minute (UTC) the hits fell in.")
    rule = models.CharField(
        max_length=64,
        help_text="Rule name; budget:* names mark session refusals that are not rate rules.",
    )
    scope = models.CharField(max_length=16, choices=RateLimitRule.Scope.choices)
    endpoint = models.CharField(max_length=200, help_text="The matched rule target.")
    shadow = models.BooleanField(default=False, help_text="Over a shadow rule (not refused).")
    count = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-minute", "rule"]
        constraints = [
            models.UniqueConstraint(
                fields=["minute", "rule", "scope", "endpoint", "shadow"],
                name="quotas_violation_once_per_minute",
            ),
        ]

    def __str__(self):
        return f"{self.rule} on {self.endpoint} at {self.minute:%Y-%m-%d %H:%M}: {self.count}"


class ToolCallCount(models.Model):
    """Tool calls of one tool ending in one status (ok, refused, failed...), per minute."""

    minute = models.DateTimeField(help_text="Start of the minute (UTC) the calls fell in.")
    tool = models.CharField(max_length=64)
    status = models.CharField(max_length=32)
    count = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-minute", "tool", "status"]
        constraints = [
            models.UniqueConstraint(
                fields=["minute", "tool", "status"], name="quotas_toolcall_once_per_minute"
            ),
        ]

    def __str__(self):
        return f"{self.tool} {self.status} at {self.minute:%Y-%m-%d %H:%M}: {self.count}"


class BreakerEvent(models.Model):
    """One circuit-breaker transition, with the rolling hour's spend at that moment."""

    class Kind(models.TextChoices):
        OPENED = "opened", "opened (tripped)"
        HALF_OPEN = "half_open", "half-open (cool-down over)"
        CLOSED = "closed", "closed (spend back under the threshold)"
        RESET = "reset", "reset by hand"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    hour_cost_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    threshold_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    actor = models.CharField(max_length=150, default="system", help_text="Who reset it.")
    engine = models.CharField(max_length=16, blank=True, help_text="redis or local.")

    class Meta:
        ordering = ["-at"]

    def __str__(self):
        return f"breaker {self.kind} at {self.at:%Y-%m-%d %H:%M:%S}"


class PolicyChange(models.Model):
    """One create, change or delete of a rate-limit rule, price or budget policy."""

    class Action(models.TextChoices):
        CREATED = "created", "created"
        CHANGED = "changed", "changed"
        DELETED = "deleted", "deleted"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(
        max_length=150, help_text='Admin username, or "system" for changes outside the admin.'
    )
    object_type = models.CharField(max_length=64, help_text="e.g. quotas.ratelimitrule")
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200)
    action = models.CharField(max_length=16, choices=Action.choices)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id"], name="quotas_policychange_obj_idx")
        ]

    def __str__(self):
        return f"{self.object_repr} {self.action} by {self.actor}"

    @property
    def changed_fields(self):
        """Names of the fields whose value differs between ``before`` and ``after``."""
        before, after = self.before or {}, self.after or {}
        return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


class Reports(UsageRecord):
    """The admin's entry to the spend and abuse reports (a proxy: no table of its own)."""

    class Meta:
        proxy = True
        verbose_name = "report"
        verbose_name_plural = "reports"
