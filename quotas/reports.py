"""The operator's reports: one query per report, shared by the admin pages, CSV and the command.

Every report takes a ``Period`` (``since`` inclusive, ``until`` exclusive, aware datetimes) and
returns a ``ReportResult``: its columns, its rows (aggregated in the database with
``annotate``/``aggregate`` and ``Trunc*``; Python only formats the few aggregated rows) and a
chart description. ``cells()`` gives the exact strings shown in the page's table, which is
also what CSV, ``--format table`` and (typed) ``--format json`` print.

Report names (``REPORTS``): spend-by-hour, spend-by-day, spend-by-model, spend-by-token-kind,
budget, top-sessions, top-clients, top-users, sessions-by-end-reason, violations,
budget-refusals, breaker-events, tool-calls.

``top-clients`` and ``top-users`` also show, for each row, the tightest enforced spend limit
that applies to it (``key=client`` limits for a client; ``key=user`` limits, with the user's
tiers, for a user): the one with the least left in its current window, which ends now (a
rolling window) or began at the period start (a calendar day, week or month in
``QUOTAS_BUDGET_TIMEZONE``), whatever the report's range. The spend in each distinct window
is one conditional ``Sum`` over the ledger in the report's single query; Python picks the
tightest limit per row from those few sums.
"""

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db.models import (
    Case,
    CharField,
    Count,
    DecimalField,
    Exists,
    F,
    IntegerField,
    Max,
    Min,
    OuterRef,
    Q,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Substr, TruncDay, TruncHour
from django.utils import timezone

from .caps import Identity, applicable_limits, period_bounds
from .conf import quota_settings
from .models import (
    BreakerEvent,
    ModelPrice,
    QuotaSession,
    RateLimitViolation,
    ToolCallCount,
    UsageRecord,
)
from .pricing import PER_TOKENS, TOKEN_KINDS, PriceBook, quantize_usd

DEFAULT_DAYS = 7
MAX_DAYS = 400
TOP_N = 20
MAX_EVENT_ROWS = 500
ZERO = Decimal("0.000000")
TOOL_STATUSES = ("ok", "refused", "failed", "invalid")
BUDGET_RULE_PREFIX = "budget:"  # connect refusals recorded as RateLimitViolation rows
# Session end reasons that are a budget refusing the session mid-way.
SESSION_REFUSALS = (
    "budget",
    "client_budget",
    "user_budget",
    "global_budget",
    "hourly_cap",
    "breaker",
)
CAP_OF_REASON = {
    "budget": "session cap",
    "client_budget": "client spend limit",
    "user_budget": "user spend limit",
    "global_budget": "global spend limit",
    "hourly_cap": "hourly cap",
    "breaker": "circuit breaker",
    "concurrent_sessions": "concurrent sessions per client",
}
AT_CONNECT, IN_SESSION = "at connect", "in session"


@dataclass(frozen=True)
class Period:
    """A half-open time range ``[since, until)`` of aware datetimes."""

    since: datetime
    until: datetime

    @classmethod
    def last_days(cls, days=DEFAULT_DAYS, now=None):
        """The ``days`` days up to ``now`` (the reports' default range)."""
        now = now or timezone.now()
        return cls(now - timedelta(days=days), now)


class PeriodError(ValueError):
    """A report range that makes no sense (end before start, too long)."""


def check_period(since, until):
    """A ``Period`` from two aware datetimes, or ``PeriodError`` saying what is wrong."""
    if until <= since:
        raise PeriodError("The end of the range must be after its start.")
    if until - since > timedelta(days=MAX_DAYS):
        raise PeriodError(f"Choose a range of at most {MAX_DAYS} days.")
    return Period(since, until)


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its heading and how its values are shown."""

    key: str
    label: str
    kind: str = "text"  # text | int | usd | datetime | percent


@dataclass(frozen=True)
class Chart:
    """How to draw a result: pygal chart type, the label column and the value columns."""

    kind: str  # line | bar | hbar | pie | stacked
    label: str
    values: tuple
    title: str = ""


@dataclass
class ReportResult:
    """One report over one period: columns, aggregated rows, chart and notes."""

    name: str
    title: str
    period: Period
    columns: tuple
    rows: list
    chart: Chart | None = None
    notes: list = field(default_factory=list)
    chart_rows: list | None = None  # rows the chart draws, when not the table's rows


@dataclass(frozen=True)
class Report:
    """A named report: its title, what it shows and the function that computes it."""

    name: str
    title: str
    description: str
    build: object  # callable(Period) -> ReportResult


def _usd(value):
    return quantize_usd(value if value is not None else 0)


def _usage(period):
    return UsageRecord.objects.filter(created_at__gte=period.since, created_at__lt=period.until)


def _sessions(period):
    return QuotaSession.objects.filter(started_at__gte=period.since, started_at__lt=period.until)


# -- spend ---------------------------------------------------------------------------------


def _spend_over_time(name, title, trunc, label):
    def build(period):
        rows = list(
            _usage(period)
            .annotate(bucket=trunc("created_at"))
            .values("bucket")
            .annotate(records=Count("id"), cost_usd=Sum("cost_usd"))
            .order_by("bucket")
        )
        for row in rows:
            row["cost_usd"] = _usd(row["cost_usd"])
        columns = (
            Column("bucket", label, "datetime"),
            Column("records", "usage records", "int"),
            Column("cost_usd", "cost (USD)", "usd"),
        )
        chart = Chart("line" if len(rows) > 1 else "bar", "bucket", ("cost_usd",), title)
        return ReportResult(name, title, period, columns, rows, chart)

    return build


def spend_by_model(period):
    """Cost, records and tokens by model."""
    sums = {kind: Coalesce(Sum(kind), 0) for kind in TOKEN_KINDS}
    rows = list(
        _usage(period)
        .values("model")
        .annotate(records=Count("id"), cost_usd=Sum("cost_usd"), **sums)
        .order_by("-cost_usd", "model")
    )
    for row in rows:
        row["cost_usd"] = _usd(row["cost_usd"])
    columns = (
        Column("model", "model"),
        Column("records", "usage records", "int"),
        *(Column(kind, kind.replace("_", " "), "int") for kind in TOKEN_KINDS),
        Column("cost_usd", "cost (USD)", "usd"),
    )
    chart = Chart("bar", "model", ("cost_usd",), "Spend by model (USD)")
    return ReportResult("spend-by-model", "Spend by model", period, columns, rows, chart)


def _price_segments(book_rows):
    """Every ``effective_from`` of any price, sorted: rates are constant between two of them."""
    return sorted({when for _, when, _ in book_rows})


def spend_by_token_kind(period):
    """Tokens by kind and their cost at the prices in force when each was used.

    Rows are grouped in the database by model and by price segment (the span between two
    price changes, via CASE), so each group has one set of rates; the few groups are then
    priced with the same ``PriceBook`` the meter uses.
    """
    book_rows = [
        (row[0], row[1], tuple(row[2:]))
        for row in ModelPrice.objects.values_list("model", "effective_from", *TOKEN_KINDS)
    ]
    book = PriceBook(book_rows)
    boundaries = _price_segments(book_rows)
    segment = Case(
        *(
            When(created_at__gte=when, then=Value(index + 1))
            for index, when in reversed(list(enumerate(boundaries)))
        ),
        default=Value(0),
        output_field=IntegerField(),
    )
    groups = (
        _usage(period)
        .annotate(segment=segment)
        .values("model", "segment")
        .annotate(**{kind: Coalesce(Sum(kind), 0) for kind in TOKEN_KINDS})
        .order_by()
    )
    tokens = dict.fromkeys(TOKEN_KINDS, 0)
    exact = dict.fromkeys(TOKEN_KINDS, Decimal(0))
    for group in groups:
        index = group["segment"]
        # A moment inside the segment: its start, or just before the first price row.
        when = boundaries[index - 1] if index else (boundaries or [period.since])[0]
        if not index:
            when -= timedelta(microseconds=1)
        rates = book.rates_at(group["model"], when)
        for kind in TOKEN_KINDS:
            tokens[kind] += group[kind]
            exact[kind] += group[kind] * getattr(rates, kind) / PER_TOKENS
    rows = [
        {"token_kind": kind, "tokens": tokens[kind], "cost_usd": quantize_usd(exact[kind])}
        for kind in TOKEN_KINDS
    ]
    booked = _usd(_usage(period).aggregate(total=Sum("cost_usd"))["total"])
    columns = (
        Column("token_kind", "token kind"),
        Column("tokens", "tokens", "int"),
        Column("cost_usd", "cost (USD)", "usd"),
    )
    chart = Chart("pie", "token_kind", ("cost_usd",), "Spend by token kind (USD)")
    notes = [
        f"Costs by kind are tokens x the price in force; the ledger booked ${booked} in total "
        "(each row is rounded up to $0.000001)."
    ]
    return ReportResult(
        "spend-by-token-kind", "Spend by token kind", period, columns, rows, chart, notes
    )


# -- budget ----------------------------------------------------------------------------------


def budget_utilisation(period):
    """The rolling hour now, live from the spend counters, against the cap and threshold."""
    from .policies import policy_cache
    from .spend import spend_counters

    budget = policy_cache.get().budget
    state = spend_counters().read(budget)
    now = timezone.now()
    ledger_hour = _usd(
        UsageRecord.objects.filter(created_at__gt=now - timedelta(hours=1)).aggregate(
            total=Sum("cost_usd")
        )["total"]
    )
    hour = state.hour_usd

    def share(limit):
        return (hour / limit * 100).quantize(Decimal("0.1")) if limit else Decimal(0)

    rows = [
        {"measure": "rolling hour spend (counters)", "usd": hour, "percent": None},
        {"measure": "rolling hour spend (ledger)", "usd": ledger_hour, "percent": None},
        {
            "measure": "hourly cap",
            "usd": _usd(budget.hourly_cap_usd),
            "percent": share(budget.hourly_cap_usd),
        },
        {
            "measure": "breaker threshold",
            "usd": _usd(budget.breaker_threshold_usd),
            "percent": share(budget.breaker_threshold_usd),
        },
    ]
    columns = (
        Column("measure", "measure"),
        Column("usd", "USD", "usd"),
        Column("percent", "rolling hour as % of it", "percent"),
    )
    notes = [
        f"Circuit breaker: {state.breaker.replace('_', '-')} (counters: {state.engine}).",
        "Live figures: the date range does not apply to this report.",
    ]
    if state.breaker_open:
        until = datetime.fromtimestamp(state.breaker_until, tz=timezone.get_current_timezone())
        notes.insert(1, f"Open until {until:%Y-%m-%d %H:%M:%S %Z} unless reset.")
    chart = Chart("hbar", "measure", ("usd",), "Rolling hour against the caps (USD)")
    result = ReportResult("budget", "Budget utilisation", period, columns, rows, chart, notes)
    return result


# -- sessions and clients --------------------------------------------------------------------


def top_sessions(period):
    """The most expensive sessions started in the period."""
    rows = list(
        _sessions(period)
        .order_by("-cost_usd", "-started_at")
        .values("id", "client", "model", "started_at", "ended_at", "end_reason", "cost_usd")[:TOP_N]
    )
    for row in rows:
        row["id"] = str(row["id"])
        row["end_reason"] = row["end_reason"] or "(open)"
        row["cost_usd"] = _usd(row["cost_usd"])
    columns = (
        Column("id", "session"),
        Column("client", "client"),
        Column("model", "model"),
        Column("started_at", "started", "datetime"),
        Column("ended_at", "ended", "datetime"),
        Column("end_reason", "end reason"),
        Column("cost_usd", "cost (USD)", "usd"),
    )
    chart = Chart("bar", "id", ("cost_usd",), f"Top {TOP_N} sessions by cost (USD)")
    return ReportResult("top-sessions", "Top sessions", period, columns, rows, chart)


@dataclass(frozen=True)
class LimitWindow:
    """The current window of one spend limit: ledger rows after (or from) ``since`` count."""

    limit: object  # a ``SpendLimitSpec``
    alias: str  # the conditional Sum's column in the report query
    since: datetime
    inclusive: bool  # calendar periods include their start; rolling windows exclude it

    @property
    def label(self):
        if self.limit.period == "rolling":
            return f"rolling {self.limit.window_seconds} s"
        return self.limit.period


def _limit_windows(limits, now):
    """A ``LimitWindow`` per limit; limits whose windows start together share one column."""
    tz = quota_settings.budget_timezone
    columns, windows = {}, []
    for limit in limits:
        if limit.period == "rolling":
            since, inclusive = now - timedelta(seconds=int(limit.window_seconds or 3600)), False
        else:
            start, _ = period_bounds(limit.period, now.timestamp(), tz)
            since, inclusive = datetime.fromtimestamp(start, tz=now.tzinfo), True
        alias = columns.setdefault((since, inclusive), f"window_{len(columns)}")
        windows.append(LimitWindow(limit, alias, since, inclusive))
    return windows


def _window_sums(windows):
    """One conditional Sum of the sessions' ledger rows per distinct window."""
    sums = {}
    for window in windows:
        lookup = "usage__created_at__gte" if window.inclusive else "usage__created_at__gt"
        sums[window.alias] = Sum("usage__cost_usd", filter=Q(**{lookup: window.since}))
    return sums


def _in_scope(period, windows):
    """Sessions started in the period, and those that may have spend in a current window."""
    scope = Q(started_at__gte=period.since, started_at__lt=period.until)
    if windows:
        earliest = min(window.since for window in windows)
        scope |= Q(ended_at__isnull=True) | Q(ended_at__gte=earliest)
    return scope


def _money_sum(expression, **options):
    return Coalesce(
        Sum(expression, **options),
        Value(ZERO),
        output_field=DecimalField(max_digits=14, decimal_places=6),
    )


def _tightest(row, windows):
    """Fill the row's limit columns with the enforced limit that has the least left."""
    best = None
    for window in windows:
        if window.limit.shadow:  # counted, never refused: not what stops this row
            continue
        cap = _usd(window.limit.cap_usd)
        spent = _usd(row.get(window.alias))
        key = (cap - spent, cap)
        if best is None or key < best[0]:
            best = (key, window, cap, spent)
    row.update(limit_name="", limit_window="", limit_cap_usd=None, limit_spent_usd=None)
    row["limit_percent"] = None
    if best is None:
        return
    _, window, cap, spent = best
    row.update(
        limit_name=window.limit.name,
        limit_window=window.label,
        limit_cap_usd=cap,
        limit_spent_usd=spent,
        limit_percent=(spent / cap * 100).quantize(Decimal("0.1")),
    )


LIMIT_COLUMNS = (
    Column("limit_name", "tightest limit"),
    Column("limit_window", "its window"),
    Column("limit_cap_usd", "limit cap (USD)", "usd"),
    Column("limit_spent_usd", "spent in the window (USD)", "usd"),
    Column("limit_percent", "% of the limit", "percent"),
)
LIMIT_NOTE = (
    "Tightest limit: the enforced spend limit with the least left in its current window "
    "(ending now, or since the calendar period began), from the ledger; the date range "
    "does not apply to it."
)


def _spend_limits(key):
    from .policies import policy_cache

    return [limit for limit in policy_cache.get().spend_limits if limit.key == key]


def _top_by(period, group, windows, *, sessions_filter=None, extra=None):
    """The report query of top-clients / top-users: one aggregated query over the sessions."""
    in_period = Q(started_at__gte=period.since, started_at__lt=period.until)
    queryset = QuotaSession.objects.filter(_in_scope(period, windows))
    if sessions_filter is not None:
        queryset = queryset.filter(sessions_filter)
    if extra:
        queryset = queryset.annotate(**extra)
    return list(
        queryset.values(*group, *(extra or ()))
        .annotate(
            sessions=Count("id", filter=in_period, distinct=True),
            # The ledger of the period's sessions: their cost, as their cost_usd totals are.
            cost_usd=_money_sum("usage__cost_usd", filter=in_period),
            last_started=Max("started_at", filter=in_period),
            **_window_sums(windows),
        )
        .filter(sessions__gt=0)
        .order_by("-cost_usd", *group)[:TOP_N]
    )


def top_clients(period, *, now=None):
    """The clients whose sessions (started in the period) cost the most, against their limit."""
    now = now or timezone.now()
    limits = applicable_limits(_spend_limits("client"), Identity(client="-"))
    windows = _limit_windows(limits, now)
    rows = _top_by(period, ("client",), windows)
    for row in rows:
        row["cost_usd"] = _usd(row["cost_usd"])
        _tightest(row, windows)
    columns = (
        Column("client", "client"),
        Column("sessions", "sessions", "int"),
        Column("cost_usd", "cost (USD)", "usd"),
        Column("last_started", "last session", "datetime"),
        *LIMIT_COLUMNS,
    )
    chart = Chart("bar", "client", ("cost_usd",), f"Top {TOP_N} clients by cost (USD)")
    return ReportResult("top-clients", "Top clients", period, columns, rows, chart, [LIMIT_NOTE])


def top_users(period, *, now=None):
    """The signed-in users whose sessions (started in the period) cost the most."""
    now = now or timezone.now()
    limits = _spend_limits("user")
    windows = _limit_windows(limits, now)
    memberships = get_user_model().groups.through.objects
    tiers = sorted({limit.group_id for limit in limits if limit.group_id is not None})
    # Membership of each tier's group rides along as a grouped column of the same query.
    extra = {
        f"in_group_{group_id}": Exists(
            memberships.filter(user_id=OuterRef("user_id"), group_id=group_id)
        )
        for group_id in tiers
    }
    username = f"user__{get_user_model().USERNAME_FIELD}"
    rows = _top_by(
        period, ("user", username), windows, sessions_filter=Q(user__isnull=False), extra=extra
    )
    for row in rows:
        row["username"] = row.pop(username)
        row["cost_usd"] = _usd(row["cost_usd"])
        groups = frozenset(group_id for group_id in tiers if row.pop(f"in_group_{group_id}"))
        mine = applicable_limits(limits, Identity("-", row["user"], groups))
        _tightest(row, [window for window in windows if window.limit in mine])
    columns = (
        Column("username", "user"),
        Column("sessions", "sessions", "int"),
        Column("cost_usd", "cost (USD)", "usd"),
        Column("last_started", "last session", "datetime"),
        *LIMIT_COLUMNS,
    )
    chart = Chart("bar", "username", ("cost_usd",), f"Top {TOP_N} users by cost (USD)")
    notes = ["Signed-in users only: anonymous sessions count per client.", LIMIT_NOTE]
    return ReportResult("top-users", "Top users", period, columns, rows, chart, notes)


def sessions_by_end_reason(period):
    """How sessions started in the period ended (open ones as "(open)")."""
    rows = list(
        _sessions(period)
        .values("end_reason")
        .annotate(sessions=Count("id"), cost_usd=Sum("cost_usd"))
        .order_by("-sessions", "end_reason")
    )
    for row in rows:
        row["end_reason"] = row["end_reason"] or "(open)"
        row["cost_usd"] = _usd(row["cost_usd"])
    columns = (
        Column("end_reason", "end reason"),
        Column("sessions", "sessions", "int"),
        Column("cost_usd", "cost (USD)", "usd"),
    )
    chart = Chart("pie", "end_reason", ("sessions",), "Sessions by end reason")
    return ReportResult(
        "sessions-by-end-reason", "Sessions by end reason", period, columns, rows, chart
    )


# -- abuse: refusals, breaker, tools ----------------------------------------------------------


def violations(period):
    """Refused (and shadow-over) hits by rule and endpoint."""
    rows = list(
        RateLimitViolation.objects.filter(minute__gte=period.since, minute__lt=period.until)
        .values("rule", "scope", "endpoint", "shadow")
        .annotate(
            hits=Sum("count"),
            minutes=Count("id"),
            first_minute=Min("minute"),
            last_minute=Max("minute"),
        )
        .order_by("-hits", "rule", "endpoint")
    )
    for row in rows:
        row["label"] = f"{row['rule']} {row['endpoint']}" + (" (shadow)" if row["shadow"] else "")
        row["shadow"] = "yes" if row["shadow"] else "no"
    columns = (
        Column("rule", "rule"),
        Column("scope", "scope"),
        Column("endpoint", "endpoint"),
        Column("shadow", "shadow"),
        Column("hits", "refused hits", "int"),
        Column("minutes", "minutes with refusals", "int"),
        Column("first_minute", "first", "datetime"),
        Column("last_minute", "last", "datetime"),
    )
    chart = Chart("hbar", "label", ("hits",), "Refused hits by rule and endpoint")
    return ReportResult("violations", "Rate-limit violations", period, columns, rows, chart)


def budget_refusals(period):
    """Refusals by a budget: at connect (recorded violations) and mid-session (end reasons)."""
    place = CharField()
    at_connect = (
        RateLimitViolation.objects.filter(
            minute__gte=period.since,
            minute__lt=period.until,
            rule__startswith=BUDGET_RULE_PREFIX,
            shadow=False,
        )
        .annotate(
            reason=Substr("rule", len(BUDGET_RULE_PREFIX) + 1, output_field=CharField()),
            place=Value(AT_CONNECT, output_field=place),
        )
        .values("reason", "place")
        .annotate(refusals=Sum("count"))
        .order_by()
    )
    in_session = (
        QuotaSession.objects.filter(
            ended_at__gte=period.since, ended_at__lt=period.until, end_reason__in=SESSION_REFUSALS
        )
        .annotate(reason=F("end_reason"), place=Value(IN_SESSION, output_field=place))
        .values("reason", "place")
        .annotate(refusals=Count("id"))
        .order_by()
    )
    rows = list(at_connect.union(in_session, all=True))
    rows.sort(key=lambda row: (-row["refusals"], row["reason"], row["place"]))
    for row in rows:
        row["cap"] = CAP_OF_REASON.get(row["reason"], row["reason"])
        row["label"] = f"{row['reason']} ({row['place']})"
    columns = (
        Column("cap", "cap"),
        Column("reason", "reason"),
        Column("place", "where"),
        Column("refusals", "refusals", "int"),
    )
    notes = [
        "At connect: sessions refused before they started (per minute counts). In session: "
        "sessions a budget ended (a refused reservation, or the breaker), by when they ended."
    ]
    chart = Chart("hbar", "label", ("refusals",), "Budget refusals by cap and reason")
    return ReportResult("budget-refusals", "Budget refusals", period, columns, rows, chart, notes)


def breaker_events(period):
    """Every breaker transition in the period, and a count of each kind for the chart."""
    events = BreakerEvent.objects.filter(at__gte=period.since, at__lt=period.until)
    rows = list(
        events.order_by("at", "id").values(
            "at", "kind", "hour_cost_usd", "threshold_usd", "actor", "engine"
        )[:MAX_EVENT_ROWS]
    )
    counts = {
        row["kind"]: row["n"] for row in events.values("kind").annotate(n=Count("id")).order_by()
    }
    columns = (
        Column("at", "at", "datetime"),
        Column("kind", "event"),
        Column("hour_cost_usd", "rolling hour (USD)", "usd"),
        Column("threshold_usd", "threshold (USD)", "usd"),
        Column("actor", "by"),
        Column("engine", "counters"),
    )
    notes = [
        "Trips: {opened}, half-open: {half_open}, closed by themselves: {closed}, "
        "reset by hand: {reset}.".format(
            **{kind: counts.get(kind, 0) for kind in BreakerEvent.Kind.values}
        )
    ]
    if sum(counts.values()) > MAX_EVENT_ROWS:
        notes.append(f"Showing the first {MAX_EVENT_ROWS} events; narrow the range for more.")
    result = ReportResult(
        "breaker-events", "Breaker trips and resets", period, columns, rows, None, notes
    )
    result.chart_rows = [
        {"kind": kind, "events": counts.get(kind, 0)} for kind in BreakerEvent.Kind.values
    ]
    result.chart = Chart("bar", "kind", ("events",), "Breaker events by kind")
    return result


def tool_calls(period):
    """Tool calls by tool and how they ended (ok, refused by its rate limit, failed...)."""
    by_status = {
        status: Coalesce(Sum("count", filter=Q(status=status)), 0) for status in TOOL_STATUSES
    }
    rows = list(
        ToolCallCount.objects.filter(minute__gte=period.since, minute__lt=period.until)
        .values("tool")
        .annotate(
            calls=Sum("count"),
            other=Coalesce(Sum("count", filter=~Q(status__in=TOOL_STATUSES)), 0),
            **by_status,
        )
        .order_by("-calls", "tool")
    )
    columns = (
        Column("tool", "tool"),
        Column("calls", "calls", "int"),
        *(Column(status, status, "int") for status in TOOL_STATUSES),
        Column("other", "other", "int"),
    )
    chart = Chart("stacked", "tool", (*TOOL_STATUSES, "other"), "Tool calls by outcome")
    return ReportResult("tool-calls", "Tool calls and refusals", period, columns, rows, chart)


REPORTS = {
    report.name: report
    for report in (
        Report(
            "spend-by-hour",
            "Spend per hour",
            "Ledger cost per hour.",
            _spend_over_time("spend-by-hour", "Spend per hour", TruncHour, "hour"),
        ),
        Report(
            "spend-by-day",
            "Spend per day",
            "Ledger cost per day.",
            _spend_over_time("spend-by-day", "Spend per day", TruncDay, "day"),
        ),
        Report("spend-by-model", "Spend by model", "Cost and tokens by model.", spend_by_model),
        Report(
            "spend-by-token-kind",
            "Spend by token kind",
            "Tokens and their cost by kind (text/audio, in/out, cached).",
            spend_by_token_kind,
        ),
        Report(
            "budget",
            "Budget utilisation",
            "The rolling hour now against the hourly cap and the breaker; breaker state.",
            budget_utilisation,
        ),
        Report("top-sessions", "Top sessions", "The most expensive sessions.", top_sessions),
        Report(
            "top-clients",
            "Top clients",
            "The clients that cost the most, and their tightest spend limit now.",
            top_clients,
        ),
        Report(
            "top-users",
            "Top users",
            "The signed-in users who cost the most, and their tightest spend limit now.",
            top_users,
        ),
        Report(
            "sessions-by-end-reason",
            "Sessions by end reason",
            "How sessions ended: closed by the client, budget, duration, breaker...",
            sessions_by_end_reason,
        ),
        Report(
            "violations",
            "Rate-limit violations",
            "Refused requests, connections and tool calls by rule and endpoint.",
            violations,
        ),
        Report(
            "budget-refusals",
            "Budget refusals",
            "Sessions refused or ended by a budget, by cap and reason, at connect or mid-session.",
            budget_refusals,
        ),
        Report(
            "breaker-events",
            "Breaker trips and resets",
            "Every circuit-breaker transition, with who reset it.",
            breaker_events,
        ),
        Report("tool-calls", "Tool calls and refusals", "Tool calls by outcome.", tool_calls),
    )
}


def run_report(name, period):
    """Compute report ``name`` over ``period`` (KeyError for an unknown name)."""
    return REPORTS[name].build(period)


# -- output ----------------------------------------------------------------------------------


def format_cell(column, value):
    """The text of one table cell, identical in the page, CSV and the table output."""
    if value is None:
        return ""
    if column.kind == "usd":
        return str(quantize_usd(value))
    if column.kind == "datetime":
        return timezone.localtime(value).strftime("%Y-%m-%d %H:%M")
    if column.kind == "percent":
        return f"{value}"
    return str(value)


def cells(result):
    """The table as lists of strings: one per row, in column order."""
    return [[format_cell(c, row.get(c.key)) for c in result.columns] for row in result.rows]


def to_csv(result):
    """The table as CSV text (header line, then exactly the page's cells)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.label for c in result.columns])
    writer.writerows(cells(result))
    return out.getvalue()


def _json_value(column, value):
    if value is None:
        return None
    if column.kind == "int":
        return int(value)
    return format_cell(column, value)


def to_json(result):
    """The report as a JSON-ready dict: money as decimal strings, counts as integers."""
    return {
        "report": result.name,
        "title": result.title,
        "since": result.period.since.isoformat(),
        "until": result.period.until.isoformat(),
        "columns": [c.key for c in result.columns],
        "rows": [
            {c.key: _json_value(c, row.get(c.key)) for c in result.columns} for row in result.rows
        ],
        "notes": list(result.notes),
    }


def to_text_table(result):
    """The table as aligned plain text for a terminal."""
    header = [c.label for c in result.columns]
    body = cells(result)
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    right = [c.kind in ("int", "usd", "percent") for c in result.columns]

    def line(values):
        return "  ".join(
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ).rstrip()

    lines = [
        f"{result.title} ({result.period.since:%Y-%m-%d %H:%M} .. "
        f"{result.period.until:%Y-%m-%d %H:%M})",
        line(header),
        line(["-" * w for w in widths]),
    ]
    lines += [line(r) for r in body]
    if not body:
        lines.append("(no rows)")
    lines += list(result.notes)
    return "\n".join(lines) + "\n"


def dumps_json(results):
    """JSON text of one or more results."""
    return json.dumps([to_json(r) for r in results], indent=2) + "\n"
