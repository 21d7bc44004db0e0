"""Per-session metering: book usage to the ledger exactly once, charge the shared counters,
project the running response's cost, and tell the relay when to warn, cancel or close.

One ``SessionMeter`` per WebSocket session, used from async code. Each booking is one small
sync function run through ``database_sync_to_async`` (Django has no transactions in async
code): insert the ``UsageRecord`` (unique per session and response id: the idempotency key)
and ``F()``-update the session's totals in one transaction; then one round trip to the spend
counters (Redis, or the in-process twin while Redis is down). The ledger is written first, so
a Redis outage loses nothing: the counters are rebuilt from it later.

Close codes for the relay: 4402 session budget spent, 4408 duration reached, 4503 service
paused (breaker). Passing the hourly cap does not end a running session (it only refuses new
ones), so it only sets ``ChargeOutcome.hourly_cap_reached``.
"""

import logging
import time
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from channels.db import database_sync_to_async
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum

from .defaults import TOKEN_KINDS
from .metrics import (
    active_sessions_total,
    api_cost_total_usd,
    budget_exceeded_total,
    session_duration_seconds,
    token_usage_total,
)
from .pricing import (
    INPUT_AUDIO_TOKENS_PER_SECOND,
    OUTPUT_AUDIO_TOKENS_PER_SECOND,
    PCM16_BYTES_PER_SECOND,
    PER_TOKENS,
    price_book,
    timestamp_to_datetime,
    to_micro,
    tool_token_counts,
    transcription_token_counts,
    usage_token_counts,
    warn_unknown,
)
from .spend import (
    BREAKER_MESSAGE,
    broadcast_breaker_open,
    entry_member,
    minutes_until,
    spend_counters,
)

logger = logging.getLogger("quotas.meter")

CLOSE_BUDGET = 4402
CLOSE_DURATION = 4408
CLOSE_PAUSED = 4503
BUDGET_WARNINGS = (
    (Decimal("0.50"), "budget_50"),
    (Decimal("0.80"), "budget_80"),
    (Decimal("0.95"), "budget_95"),
)
DURATION_WARNINGS = ((300, "duration_5min"), (60, "duration_1min"))
# Cancel a response when its projected cost would pass the cap within this much more audio.
PROJECTION_HORIZON_SECONDS = 1
TEXT_CHARS_PER_TOKEN = 4
_OUTPUT_TOKENS_PER_BYTE = Decimal(OUTPUT_AUDIO_TOKENS_PER_SECOND) / PCM16_BYTES_PER_SECOND
_INPUT_TOKENS_PER_BYTE = Decimal(INPUT_AUDIO_TOKENS_PER_SECOND) / PCM16_BYTES_PER_SECOND
_CENTS = Decimal("0.01")


def format_usd(amount):
    """Money for the browser: a decimal string with 2 to 6 places ("0.0123", "5.00")."""
    text = f"{Decimal(amount).quantize(Decimal('0.000001'), rounding=ROUND_HALF_UP):f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction.ljust(2, '0')}"


def warning_event(reason, message):
    """A ``quota.warning`` event."""
    return {"type": "quota.warning", "reason": reason, "message": message}


def exceeded_event(reason, message, retry_after=0):
    """A ``quota.exceeded`` event (sent right before a quota close)."""
    return {
        "type": "quota.exceeded",
        "reason": reason,
        "message": message,
        "retry_after": retry_after,
    }


@dataclass
class ChargeOutcome:
    """What one booking cost and what the relay must tell the browser or do next."""

    cost: Decimal
    session_cost: Decimal
    booked: bool
    warnings: list = field(default_factory=list)
    exceeded: dict | None = None
    close_code: int | None = None
    hourly_cap_reached: bool = False
    breaker_tripped: bool = False  # this charge opened the breaker (already broadcast)
    unknown_model: bool = False


@dataclass
class DurationCheck:
    """Duration warnings due now, and the exceeded event once the cap is reached."""

    warnings: list = field(default_factory=list)
    exceeded: dict | None = None
    close_code: int | None = None


def _add_to_session_totals(session_id, cost, tokens):
    """``F()``-style increment of a session's cost and token totals, as one prepared UPDATE.

    The same statement as ``filter(pk=...).update(cost_usd=F("cost_usd") + cost, ...)``,
    written once: compiling seven F() expressions per booking cost more than the write.
    """
    from .models import QuotaSession

    meta = QuotaSession._meta
    quote = connection.ops.quote_name
    sql = _UPDATE_SQL.get(connection.vendor)
    if sql is None:
        columns = ("cost_usd", *TOKEN_KINDS)
        assignments = ", ".join(f"{quote(c)} = {quote(c)} + %s" for c in columns)
        sql = _UPDATE_SQL[connection.vendor] = (
            f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"
        )
    params = [meta.get_field("cost_usd").get_db_prep_value(cost, connection)]
    params += [tokens[kind] for kind in TOKEN_KINDS]
    params.append(meta.pk.get_db_prep_value(uuid.UUID(str(session_id)), connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


_UPDATE_SQL = {}
_BOOK_SQL = {}


def _book_in_one_statement(session_id, kind, model, reference, tokens, cost, unknown, when):
    """PostgreSQL: insert the record and add it to the session in ONE atomic statement.

    ``ON CONFLICT DO NOTHING`` on the (session, response id) constraint makes a replay a
    no-op, and the UPDATE runs only when the INSERT did; one round trip and one commit
    instead of four. Returns the new record's id, or None for a replay.
    """
    from .models import QuotaSession, UsageRecord

    sql = _BOOK_SQL.get("postgresql")
    if sql is None:
        quote = connection.ops.quote_name
        record_columns = (
            "session_id",
            "kind",
            "model",
            "response_id",
            *TOKEN_KINDS,
            "cost_usd",
            "unknown_model",
            "created_at",
        )
        session_columns = ("cost_usd", *TOKEN_KINDS)
        sql = _BOOK_SQL["postgresql"] = (
            f"WITH ins AS (INSERT INTO {quote(UsageRecord._meta.db_table)} "
            f"({', '.join(quote(c) for c in record_columns)}) "
            f"VALUES ({', '.join(['%s'] * len(record_columns))}) "
            f"ON CONFLICT ({quote('session_id')}, {quote('response_id')}) DO NOTHING "
            f"RETURNING {quote('id')}), "
            f"upd AS (UPDATE {quote(QuotaSession._meta.db_table)} SET "
            + ", ".join(f"{quote(c)} = {quote(c)} + %s" for c in session_columns)
            + f" WHERE {quote('id')} = %s AND EXISTS (SELECT 1 FROM ins) RETURNING 1) "
            f"SELECT {quote('id')} FROM ins"
        )
    session_uuid = uuid.UUID(str(session_id))
    counts = [tokens[kind_] for kind_ in TOKEN_KINDS]
    params = [session_uuid, kind, model, reference, *counts, cost, unknown, when]
    params += [cost, *counts, session_uuid]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row else None


@dataclass(frozen=True)
class _Booking:
    record_id: int | None
    cost: Decimal
    counts: object
    rates: object
    session_cost: Decimal | None = None


async def admit_new_session(budget, counters=None):
    """Whether a new session may start now (rolling-hour cap and breaker), as an ``Admission``."""
    counters = counters or spend_counters()
    admission = await counters.aadmit(budget)
    if not admission.allowed:
        budget_exceeded_total.labels(reason=admission.reason).inc()
    return admission


class SessionMeter:
    """Meters one WebSocket session against its budget, the hourly cap and the breaker."""

    def __init__(self, client, model, budget, *, timer=time.time, counters=None):
        self.client = client
        self.model = model
        self.budget = budget
        self.timer = timer
        self.counters = counters
        self.session_id = None
        self.started = None
        self.closed = False
        self._cost = Decimal(0)
        self._hour_usd = Decimal(0)
        self._sent = set()
        self._rates = None
        # The running response's projection.
        self._response_id = None
        self._response_input = Decimal(0)
        self._response_out_bytes = 0
        self._signalled = set()
        # What the next response will re-bill as input: the conversation so far.
        self._context_audio_tokens = 0
        self._context_text_tokens = 0
        self._pending_input_bytes = 0
        self._pending_text_tokens = Decimal(0)
        for seconds, reason in DURATION_WARNINGS:
            if seconds >= budget.session_max_seconds:
                self._sent.add(reason)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self):
        """Create the ``QuotaSession``; returns its id."""
        if self.counters is None:
            self.counters = spend_counters()
        self.started = self.timer()
        self.session_id = await self._create_session(timestamp_to_datetime(self.started))
        active_sessions_total.inc()
        return self.session_id

    @database_sync_to_async
    def _create_session(self, started_at):
        from .models import QuotaSession

        session = QuotaSession.objects.create(
            client=self.client[:100], model=self.model, started_at=started_at
        )
        self._rates = price_book().rates_at(self.model, started_at)
        return str(session.pk)

    async def close(self, end_reason):
        """End the session: ``ended_at``, ``end_reason`` and totals from its records; idempotent."""
        from .models import QuotaSession

        if self.session_id is None or self.closed:
            return
        if end_reason not in QuotaSession.EndReason.values:
            logger.warning("unknown end reason %r recorded as 'error'", end_reason)
            end_reason = QuotaSession.EndReason.ERROR
        self.closed = True
        ended = self.timer()
        await self._end_session(timestamp_to_datetime(ended), end_reason)
        self.counters.forget_session(self.session_id)
        active_sessions_total.dec()
        session_duration_seconds.labels(status=end_reason).observe(max(0.0, ended - self.started))

    @database_sync_to_async
    def _end_session(self, ended_at, end_reason):
        from .models import QuotaSession, UsageRecord

        sums = UsageRecord.objects.filter(session_id=self.session_id).aggregate(
            cost=Sum("cost_usd"), **{kind: Sum(kind) for kind in TOKEN_KINDS}
        )
        totals = {kind: sums[kind] or 0 for kind in TOKEN_KINDS}
        return QuotaSession.objects.filter(pk=self.session_id, ended_at__isnull=True).update(
            ended_at=ended_at, end_reason=end_reason, cost_usd=sums["cost"] or Decimal(0), **totals
        )

    # -- projection (hot path: no I/O) ------------------------------------------------------------

    def note_input_audio(self, nbytes):
        """Count user audio sent upstream (pcm16 24 kHz); the next response re-bills it."""
        self._pending_input_bytes += nbytes

    def note_input_text(self, nchars):
        """Count text sent upstream (instructions, tool schemas, typed questions) at about
        4 characters per token; the next response bills it as input."""
        self._pending_text_tokens += Decimal(nchars) / TEXT_CHARS_PER_TOKEN

    def _projected_input(self):
        rates = self._rates
        pending_tokens = self._pending_input_bytes * _INPUT_TOKENS_PER_BYTE
        audio_tokens = self._context_audio_tokens + pending_tokens
        text_tokens = self._context_text_tokens + self._pending_text_tokens
        # Cache discounts are ignored: the estimate may only err on the high side.
        return (audio_tokens * rates.audio_input + text_tokens * rates.text_input) / PER_TOKENS

    def admits_response(self):
        """Whether a new response fits the session budget: spend so far, plus the projected
        input it re-bills (the whole conversation), plus about one second of output audio.

        The relay asks before every ``response.create`` it sends or forwards: upstream bills
        a response's input as soon as it starts, so only refusing to start it keeps spend
        within the cap when the conversation alone would pass it."""
        if self._rates is None:
            return True
        horizon = PROJECTION_HORIZON_SECONDS * OUTPUT_AUDIO_TOKENS_PER_SECOND
        ahead = self._projected_input() + horizon * self._rates.audio_output / PER_TOKENS
        return self._cost + ahead < self.budget.session_cap_usd

    def _start_projection(self, response_id):
        self._response_input = self._projected_input()
        self._response_id = response_id
        self._response_out_bytes = 0

    def note_output_audio(self, response_id, nbytes):
        """Add an output audio delta; returns "budget" or "breaker" once per response when the
        projected spend would pass the session cap (or the rolling hour the breaker threshold)
        within about one more second of output audio: the relay then cancels the response."""
        if self._rates is None:
            return None
        if response_id != self._response_id:
            self._start_projection(response_id)
        self._response_out_bytes += nbytes
        if response_id in self._signalled:
            return None
        per_token = self._rates.audio_output / PER_TOKENS
        out_tokens = self._response_out_bytes * _OUTPUT_TOKENS_PER_BYTE
        running = self._response_input + out_tokens * per_token
        ahead = running + PROJECTION_HORIZON_SECONDS * OUTPUT_AUDIO_TOKENS_PER_SECOND * per_token
        if self._cost + ahead >= self.budget.session_cap_usd:
            self._signalled.add(response_id)
            return "budget"
        if self._hour_usd + ahead >= self.budget.breaker_threshold_usd:
            self._signalled.add(response_id)
            return "breaker"
        return None

    def _learn_context(self, counts):
        # Every turn re-bills the whole conversation: this response's input and output are
        # the next one's input.
        self._context_audio_tokens = (
            counts.audio_input + counts.cached_audio_input + counts.audio_output
        )
        self._context_text_tokens = (
            counts.text_input + counts.cached_text_input + counts.text_output
        )
        self._pending_input_bytes = 0
        self._pending_text_tokens = Decimal(0)
        self._response_id = None

    # -- charging -------------------------------------------------------------------------------

    async def charge_response(self, event):
        """Book a ``response.done`` server event's usage (once per response id)."""
        response = event.get("response") or {}
        response_id = response.get("id") or event.get("response_id")
        if not response_id:
            response_id = f"event:{event.get('event_id') or id(event)}"
            logger.warning("response.done without a response id; booked as %s", response_id)
        usage = response.get("usage") or {}
        outcome, counts = await self._charge(
            "response", str(response_id), self.model, lambda rates: usage_token_counts(usage, rates)
        )
        if counts is not None and any(counts.as_dict().values()):
            self._learn_context(counts)
        return outcome

    async def charge_transcription(self, item_id, usage, model):
        """Book an input transcription's usage (once per item id) at its own model's price."""

        def counts_of(rates):
            return transcription_token_counts(usage, rates)

        outcome, _ = await self._charge("transcription", str(item_id), model, counts_of)
        return outcome

    async def charge_tool(self, call_id, model, input_tokens, cached_input_tokens, output_tokens):
        """Book a tool's model usage (once per call id) as text tokens."""
        outcome, _ = await self._charge(
            "tool",
            str(call_id),
            model,
            lambda rates: tool_token_counts(input_tokens, cached_input_tokens, output_tokens),
        )
        return outcome

    @database_sync_to_async
    def _book(self, kind, reference, model, counts_of, at):
        from .models import QuotaSession, UsageRecord

        when = timestamp_to_datetime(at)
        book = price_book()
        rates = book.rates_at(model, when)
        counts = counts_of(rates)
        cost = counts.cost(rates)
        self._rates = book.rates_at(self.model, when)
        tokens = counts.as_dict()
        if connection.vendor == "postgresql":
            record_id = _book_in_one_statement(
                self.session_id, kind, model[:100], reference, tokens, cost, rates.unknown, when
            )
            if record_id is not None:
                return _Booking(record_id, cost, counts, rates)
            session_cost = QuotaSession.objects.values_list("cost_usd", flat=True).get(
                pk=self.session_id
            )
            return _Booking(None, Decimal(0), counts, rates, session_cost)
        try:
            with transaction.atomic():
                record = UsageRecord.objects.create(
                    session_id=self.session_id,
                    kind=kind,
                    model=model[:100],
                    response_id=reference,
                    cost_usd=cost,
                    unknown_model=rates.unknown,
                    created_at=when,
                    **tokens,
                )
                _add_to_session_totals(self.session_id, cost, tokens)
        except IntegrityError:
            if not UsageRecord.objects.filter(
                session_id=self.session_id, response_id=reference
            ).exists():
                raise
            session_cost = QuotaSession.objects.values_list("cost_usd", flat=True).get(
                pk=self.session_id
            )
            return _Booking(None, Decimal(0), counts, rates, session_cost)
        return _Booking(record.pk, cost, counts, rates)

    async def _charge(self, kind, reference, model, counts_of):
        if self.session_id is None:
            raise RuntimeError("SessionMeter.open() must be awaited before charging")
        at = self.timer()
        booking = await self._book(kind, reference, model, counts_of, at)
        if booking.record_id is None:
            logger.info("replayed %s %s (session %s): not booked", kind, reference, self.session_id)
            self._cost = max(self._cost, booking.session_cost)
            return self._outcome(booking, booked=False, state=None, at=at), None
        rates = booking.rates
        if rates.unknown:
            warn_unknown(rates, f"{kind} {reference}")
        label = rates.metric_model
        api_cost_total_usd.labels(model=label).inc(float(booking.cost))
        for token_kind, count in booking.counts.as_dict().items():
            if count:
                token_usage_total.labels(model=label, type=token_kind).inc(count)
        self._cost += booking.cost
        micro = to_micro(booking.cost)
        state = await self.counters.acharge(
            self.session_id,
            micro,
            self.budget,
            member=entry_member(micro, booking.record_id),
            at=at,
        )
        self._hour_usd = state.hour_usd
        if state.tripped:
            await broadcast_breaker_open(state, at)
        return self._outcome(booking, booked=True, state=state, at=at), booking.counts

    def _outcome(self, booking, *, booked, state, at):
        session_cost = self._cost
        if state is not None:
            session_cost = max(session_cost, state.session_usd)
        outcome = ChargeOutcome(
            cost=booking.cost,
            session_cost=session_cost,
            booked=booked,
            unknown_model=booked and booking.rates.unknown,
        )
        cap = self.budget.session_cap_usd
        for share, reason in BUDGET_WARNINGS:
            if reason not in self._sent and session_cost >= cap * share:
                self._sent.add(reason)
                percent = int(share * 100)
                outcome.warnings.append(
                    warning_event(
                        reason,
                        f"This session has used {percent}% of its ${cap.quantize(_CENTS)} budget.",
                    )
                )
        if session_cost >= cap:
            outcome.exceeded = exceeded_event(
                "budget", f"This session has spent its ${cap.quantize(_CENTS)} budget.", 0
            )
            outcome.close_code = CLOSE_BUDGET
            self._count_exceeded("budget")
        elif state is not None and state.breaker_open:
            retry = max(1, state.breaker_retry_seconds(at))
            outcome.exceeded = exceeded_event(
                "breaker", BREAKER_MESSAGE.format(minutes=minutes_until(retry)), retry
            )
            outcome.close_code = CLOSE_PAUSED
            self._count_exceeded("breaker")
        if state is not None:
            outcome.hourly_cap_reached = state.hour_over(self.budget)
            outcome.breaker_tripped = state.tripped
        return outcome

    def _count_exceeded(self, reason):
        key = f"exceeded:{reason}"
        if key not in self._sent:
            self._sent.add(key)
            budget_exceeded_total.labels(reason=reason).inc()

    # -- status and duration ------------------------------------------------------------------

    def seconds_left(self, now=None):
        """Whole seconds until the duration cap (from the meter's start)."""
        if self.started is None:
            return int(self.budget.session_max_seconds)
        now = self.timer() if now is None else now
        return max(0, int(self.started + self.budget.session_max_seconds - now))

    def status(self):
        """The ``quota.status`` event for the browser."""
        return {
            "type": "quota.status",
            "session_cost_usd": format_usd(self._cost),
            "session_cap_usd": format_usd(self.budget.session_cap_usd),
            "seconds_left": self.seconds_left(),
        }

    def duration_events(self, now=None):
        """Duration warnings due now (5 min and 1 min before the cap, once each) and the
        exceeded event with 4408 once the cap is reached; call it about once a second."""
        now = self.timer() if now is None else now
        check = DurationCheck()
        if self.started is None:
            return check
        left = self.started + self.budget.session_max_seconds - now
        for seconds, reason in DURATION_WARNINGS:
            if reason not in self._sent and left <= seconds:
                self._sent.add(reason)
                minutes = seconds // 60
                unit = "minutes" if minutes > 1 else "minute"
                check.warnings.append(
                    warning_event(reason, f"This session ends in {minutes} {unit}.")
                )
        if left <= 0:
            check.exceeded = exceeded_event(
                "duration", "This session has reached its time limit.", 0
            )
            check.close_code = CLOSE_DURATION
            self._count_exceeded("duration")
        return check
