"""Per-session metering: reserve each response's worst case before it starts, book usage to
the ledger exactly once, settle the shared counters, project the running response's cost, and
tell the relay when to warn, cancel or close.

One ``SessionMeter`` per WebSocket session, used from async code. Before the relay sends any
``response.create``, ``reserve_response()`` holds the response's worst case (the conversation
it re-bills as input, never under-counted, plus ``max_output_tokens``) against every cap of
the session (``quotas.caps``) in one decision; refused, nothing starts. The hold is then
written to the ledger as a provisional ``UsageRecord`` (``estimated``), which
``response.done`` replaces in place by the exact usage while the counters swap the hold for
the exact cost. A crash between the two leaves the estimate booked: never less than spent.
On PostgreSQL each ledger write (a hold, its settlement, a plain booking) is one statement
and one commit.

Other usage (transcriptions, tools, a response without a hold) is booked plainly: insert the
``UsageRecord`` (unique per session and response id: the idempotency key) and update the
session's totals in one transaction, then one decision of the spend counters. The ledger
is written before the counters change, so a Redis outage loses nothing: the counters are
rebuilt from it later.

Each hold (with its provisional row), settlement and booking is ONE worker-thread call
(``quotas.ledger_hop``: its connections checked at most once a second) holding the ledger
write and the counters' decision (the sync Redis path: one round trip); the decision is
observed (gauges, alerts, the breaker's broadcast) back on the event loop. A session keeps its
``CapSet`` between decisions while its policy, its calendar periods and the minute are the same.

Close codes and events are ``quotas.protocol``'s. Passing the hourly cap does not end a
running session by itself; its next reservation is refused.
"""

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from decimal import Decimal

from django.db import IntegrityError, connection, transaction

from ..breaker import broadcast_breaker_open
from ..caps import SESSION, Identity
from ..ledger_hop import ledger_hop
from ..metrics import (
    active_sessions_total,
    api_cost_total_usd,
    session_duration_seconds,
    token_usage_total,
)
from ..pricing import (
    PER_TOKENS,
    TOKEN_KINDS,
    quantize_usd,
    timestamp_to_datetime,
    to_micro,
    warn_unknown,
)
from ..protocol import (
    CLOSE_BUDGET,
    CLOSE_DURATION,
    CLOSE_PAUSED,
    breaker_message,
    close_code_for,
    dollars,
    exceeded_event,
    format_usd,
    warning_event,
)
from ..sessions import count_refusal, end_session
from ..spend import Admission, entry_member, spend_counters
from .prices import price_book
from .text_tokens import text_token_bound
from .usage import (
    INPUT_AUDIO_TOKENS_PER_SECOND,
    OUTPUT_AUDIO_TOKENS_PER_SECOND,
    OUTPUT_KINDS,
    PCM16_BYTES_PER_SECOND,
    TokenCounts,
    tool_token_counts,
    transcription_token_counts,
    usage_token_counts,
)

logger = logging.getLogger("quotas.meter")

BUDGET_WARNINGS = (
    (Decimal("0.50"), "budget_50"),
    (Decimal("0.80"), "budget_80"),
    (Decimal("0.95"), "budget_95"),
)
DURATION_WARNINGS = ((300, "duration_5min"), (60, "duration_1min"))
# Cancel a response when its projected cost would pass the cap within this much more audio.
PROJECTION_HORIZON_SECONDS = 1
_OUTPUT_TOKENS_PER_BYTE = Decimal(OUTPUT_AUDIO_TOKENS_PER_SECOND) / PCM16_BYTES_PER_SECOND
_INPUT_TOKENS_PER_BYTE = Decimal(INPUT_AUDIO_TOKENS_PER_SECOND) / PCM16_BYTES_PER_SECOND
_CENTS = Decimal("0.01")
# A session keeps its caps between decisions for at most this long (and never past a calendar
# period's end): only a calendar counter's key lifetime depends on the time it was built at.
CAPS_MAX_AGE_SECONDS = 60


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


# The ledger's statements written by hand (``_ledger_sql``), built once per database vendor.
_LEDGER_SQL = {}
_SESSION_TOTALS = ("cost_usd", *TOKEN_KINDS)  # the session's columns each booking adds to
_BOOKED_COLUMNS = (
    "session_id",
    "kind",
    "model",
    "response_id",
    *TOKEN_KINDS,
    "cost_usd",
    "unknown_model",
    "estimated",
    "created_at",
)
_SETTLED_COLUMNS = ("response_id", "cost_usd", "unknown_model", "estimated", "created_at")


def _ledger_sql(name):
    """One of the ledger's hand-written statements for this connection's database:

    - ``add``     the session's cost and token totals ``+= %s`` (one prepared UPDATE: the
                  same as ``update(cost_usd=F("cost_usd") + cost, ...)``, whose seven F()
                  expressions cost more to compile than the write)
    - ``book``    PostgreSQL: insert a record and, if it was new, ``add`` it, in ONE statement
    - ``settle``  PostgreSQL: replace a provisional record and, if it was still provisional,
                  ``add`` the difference, in ONE statement
    """
    statements = _LEDGER_SQL.get(connection.vendor)
    if statements is None:
        statements = _LEDGER_SQL[connection.vendor] = _build_ledger_sql()
    return statements[name]


def _build_ledger_sql():
    from ..models import QuotaSession, UsageRecord

    quote = connection.ops.quote_name

    def names(columns):
        return ", ".join(quote(column) for column in columns)

    records = quote(UsageRecord._meta.db_table)
    record_pk = quote(UsageRecord._meta.pk.column)
    session_pk = quote(QuotaSession._meta.pk.column)
    add = (
        f"UPDATE {quote(QuotaSession._meta.db_table)} SET "
        + ", ".join(f"{quote(c)} = {quote(c)} + %s" for c in _SESSION_TOTALS)
        + f" WHERE {session_pk} = %s"
    )
    settled = ", ".join(f"{quote(c)} = %s" for c in (*_SETTLED_COLUMNS, *TOKEN_KINDS))
    return {
        "add": add,
        "book": (
            f"WITH ins AS (INSERT INTO {records} ({names(_BOOKED_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(_BOOKED_COLUMNS))}) "
            f"ON CONFLICT ({names(('session_id', 'response_id'))}) DO NOTHING "
            f"RETURNING {record_pk}), "
            f"upd AS ({add} AND EXISTS (SELECT 1 FROM ins) RETURNING 1) "
            f"SELECT {record_pk} FROM ins"
        ),
        "settle": (
            f"WITH rec AS (UPDATE {records} SET {settled} "
            f"WHERE {record_pk} = %s AND {quote('estimated')} RETURNING {record_pk}), "
            f"upd AS ({add} AND EXISTS (SELECT 1 FROM rec) RETURNING 1) "
            f"SELECT {record_pk} FROM rec"
        ),
    }


def _add_to_session_totals(session_id, cost, tokens):
    """Add ``cost`` and ``tokens`` to a session's totals (the ``add`` statement)."""
    from ..models import QuotaSession

    meta = QuotaSession._meta
    params = [meta.get_field("cost_usd").get_db_prep_value(cost, connection)]
    params += [tokens[kind] for kind in TOKEN_KINDS]
    params.append(meta.pk.get_db_prep_value(uuid.UUID(str(session_id)), connection))
    with connection.cursor() as cursor:
        cursor.execute(_ledger_sql("add"), params)


def _book_in_one_statement(
    session_id, kind, model, reference, tokens, cost, unknown, when, *, estimated=False
):
    """PostgreSQL: insert the record and add it to the session in ONE atomic statement.

    ``ON CONFLICT DO NOTHING`` on the (session, response id) constraint makes a replay a
    no-op, and the UPDATE runs only when the INSERT did; one round trip and one commit
    instead of four. Returns the new record's id, or None for a replay.
    """
    session_uuid = uuid.UUID(str(session_id))
    counts = [tokens[kind_] for kind_ in TOKEN_KINDS]
    params = [session_uuid, kind, model, reference, *counts, cost, unknown, estimated, when]
    params += [cost, *counts, session_uuid]
    with connection.cursor() as cursor:
        cursor.execute(_ledger_sql("book"), params)
        row = cursor.fetchone()
    return row[0] if row else None


def _settle_in_one_statement(record_id, session_id, reference, tokens, cost, unknown, when, delta):
    """PostgreSQL: replace a provisional record by the exact usage and correct the session's
    totals by ``delta`` (cost first, then ``TOKEN_KINDS``) in ONE atomic statement.

    The record changes only while it is still provisional, and the session only when the
    record did, so a replayed settlement changes nothing; one round trip and one commit
    instead of four. Returns whether the record was settled.
    """
    params = [reference, cost, unknown, False, when, *(tokens[kind] for kind in TOKEN_KINDS)]
    params += [record_id, *delta, uuid.UUID(str(session_id))]
    with connection.cursor() as cursor:
        cursor.execute(_ledger_sql("settle"), params)
        return cursor.fetchone() is not None


@dataclass(frozen=True)
class _Booking:
    record_id: int | None
    cost: Decimal
    counts: object
    rates: object
    session_cost: Decimal | None = None
    state: object = None  # the counters' decision taken with the write (not yet observed)


_CURRENT = object()  # charge_response: the meter's current reservation, if it matches


@dataclass
class Reservation:
    """A response's worst case, held against every cap from before it starts until it settles."""

    reference: str  # the provisional record's response_id until the response is known
    micro: int
    cost: Decimal
    counts: TokenCounts
    record_id: int | None = None  # the provisional UsageRecord, once written
    response_id: str | None = None
    # The input noted before it was reserved: what its response re-bills (input noted while
    # it runs is the next response's).
    pending_input_bytes: int = 0
    pending_text_tokens: int = 0

    @property
    def member(self):
        return entry_member(self.micro, self.reference)


def smallest_answer_micro(budget, at=None, *, input_text_tokens=0, model=None):
    """The worst case of a first answer under ``budget``: ``input_text_tokens`` (what every
    answer re-bills: instructions, tool schemas) at the text input price, plus
    ``max_output_tokens`` at the dearest output price, of ``model`` (default, or unknown:
    the dearest prices known) (sync: reads the price book)."""
    when = timestamp_to_datetime(time.time() if at is None else at)
    book = price_book()
    rates = book.rates_at(model, when) if model else book.dearest_at(when)
    per_output = rates.per_token_cost(rates.max_kind(OUTPUT_KINDS))
    per_input = rates.per_token_cost("text_input")
    return to_micro(
        per_output * int(budget.max_output_tokens_per_response) + per_input * int(input_text_tokens)
    )


class SessionMeter:
    """Meters one WebSocket session against every cap: its budget, the spend limits of its
    client and user, the hourly cap and the breaker."""

    def __init__(
        self,
        client,
        model,
        budget,
        *,
        timer=time.time,
        counters=None,
        identity=None,
        limits=(),
        slot="",
    ):
        self.client = client
        self.model = model
        self.budget = budget
        self.timer = timer
        self.counters = counters
        self.identity = identity or Identity(client=client)
        self.limits = tuple(limits)
        self.slot = slot
        self.session_id = None
        self.started = None
        self.closed = False
        self.reservation = None
        self._limit_room = None
        self._cost = Decimal(0)
        self._hour_usd = Decimal(0)
        self._state = None  # the latest spend decision (status, warnings)
        # (budget, limits, session id, built at, valid until, CapSet, identity)
        self._caps = None
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
        self._pending_text_tokens = 0
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
        try:
            self._state = await self.counters.adecide("read", self.caps(), self.budget)
        except Exception:  # a status without limits is better than no session
            logger.exception("could not read the spend limits of a new session")
        return self.session_id

    def use_policy(self, budget, limits):
        """Count from now on against these caps (policy edits reach running sessions)."""
        self.budget = budget
        self.limits = tuple(limits)
        self._caps = None

    def caps(self, at=None):
        """The caps this session's money counts against now (kept between decisions while
        the policy, the period and the minute are the same)."""
        now = self.counters.timer() if at is None else at
        kept = self._caps
        if (
            kept is not None
            and kept[0] is self.budget
            and kept[1] == self.limits
            and kept[2] == self.session_id
            and kept[3] <= now < kept[4]
            and kept[6] is self.identity
        ):
            return kept[5]
        caps = self.counters.caps_for(
            self.budget, self.identity, limits=self.limits, session_id=self.session_id, at=now
        )
        until = min([now + CAPS_MAX_AGE_SECONDS, *(cap.resets_at for cap in caps if cap.resets_at)])
        self._caps = (self.budget, self.limits, self.session_id, now, until, caps, self.identity)
        return caps

    @ledger_hop
    def _create_session(self, started_at):
        from ..models import QuotaSession

        session = QuotaSession.objects.create(
            client=self.client[:100],
            user_id=self.identity.user_id,
            model=self.model,
            started_at=started_at,
            heartbeat_at=started_at,
            slot=(self.slot or "")[:64],
        )
        self._rates = price_book().rates_at(self.model, started_at)
        return str(session.pk)

    async def heartbeat(self):
        """Prove this session's process is alive (the stale-session sweep spares it)."""
        if self.session_id is not None and not self.closed:
            await self._heartbeat(timestamp_to_datetime(self.timer()))

    @ledger_hop
    def _heartbeat(self, at):
        from ..models import QuotaSession

        QuotaSession.objects.filter(pk=self.session_id, ended_at__isnull=True).update(
            heartbeat_at=at
        )

    async def close(self, end_reason):
        """End the session: ``ended_at``, ``end_reason`` and totals from its records; idempotent."""
        from ..models import QuotaSession

        if self.session_id is None or self.closed:
            return
        if end_reason not in QuotaSession.EndReason.values:
            logger.warning("unknown end reason %r recorded as 'error'", end_reason)
            end_reason = QuotaSession.EndReason.ERROR
        self.closed = True
        ended = self.timer()
        await ledger_hop(end_session)(self.session_id, timestamp_to_datetime(ended), end_reason)
        self.counters.forget_session(self.session_id)
        active_sessions_total.dec()
        session_duration_seconds.labels(status=end_reason).observe(max(0.0, ended - self.started))

    # -- projection (hot path: no I/O) ------------------------------------------------------------

    def note_input_audio(self, nbytes):
        """Count user audio sent upstream (pcm16 24 kHz); the next response re-bills it."""
        self._pending_input_bytes += nbytes

    def note_input_text(self, text):
        """Count text sent upstream (instructions, tool schemas, typed questions, tool output);
        the next response bills it as input. Never fewer tokens than the tokenizer counts."""
        self._pending_text_tokens += text_token_bound(text)

    def _input_tokens(self):
        pending_audio = math.ceil(self._pending_input_bytes * _INPUT_TOKENS_PER_BYTE)
        audio = self._context_audio_tokens + pending_audio
        text = self._context_text_tokens + self._pending_text_tokens
        return int(text), int(audio)

    def _projected_input(self):
        rates = self._rates
        text_tokens, audio_tokens = self._input_tokens()
        # Cache discounts are ignored: the estimate may only err on the high side.
        return (audio_tokens * rates.audio_input + text_tokens * rates.text_input) / PER_TOKENS

    def worst_case(self):
        """The token counts a new response can bill at most: the conversation it re-bills as
        input (never under-counted) plus ``max_output_tokens`` of its dearest output kind."""
        text_tokens, audio_tokens = self._input_tokens()
        output = int(self.budget.max_output_tokens_per_response)
        out_kind = self._rates.max_kind(OUTPUT_KINDS) if self._rates else "audio_output"
        return TokenCounts(text_input=text_tokens, audio_input=audio_tokens, **{out_kind: output})

    def _start_projection(self, response_id):
        self._response_input = self._projected_input()
        self._response_id = response_id
        self._response_out_bytes = 0

    def note_output_audio(self, response_id, nbytes):
        """Add an output audio delta; returns a reason ("budget", "breaker", or a spend limit's
        or the hourly cap's) once per response when the projected spend would pass that cap
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
        if self.reservation is not None and self._limit_room is not None:
            # Past its hold (an upstream that ignores max_output_tokens): the spend limits
            # and the hourly cap only have their room beyond the hold left.
            reason, room = self._limit_room
            if ahead >= self.reservation.cost + room:
                self._signalled.add(response_id)
                return reason
        return None

    def _learn_context(self, counts, reservation=None):
        # Every turn re-bills the whole conversation: this response's input and output are
        # the next one's input.
        self._context_audio_tokens = (
            counts.audio_input + counts.cached_audio_input + counts.audio_output
        )
        self._context_text_tokens = (
            counts.text_input + counts.cached_text_input + counts.text_output
        )
        if reservation is None:
            self._pending_input_bytes = 0
            self._pending_text_tokens = 0
        else:
            # What was typed or spoken while the response ran is not in its usage: it stays
            # pending for the next one.
            self._pending_input_bytes = max(
                0, self._pending_input_bytes - reservation.pending_input_bytes
            )
            self._pending_text_tokens = max(
                0, self._pending_text_tokens - reservation.pending_text_tokens
            )
        self._response_id = None

    # -- reservations ---------------------------------------------------------------------------

    async def reserve_response(self):
        """Reserve the worst case of the next response against every cap, before it starts.

        Returns an ``Admission``: refused (nothing held, nothing to start) when any cap would
        pass; allowed, with ``reservation`` held, otherwise. The provisional ledger row is
        written after the hold, so a crash keeps the estimate booked."""
        if self.session_id is None:
            raise RuntimeError("SessionMeter.open() must be awaited before reserving")
        if self.reservation is not None:
            raise RuntimeError("a response is already reserved")
        at = self.timer()
        if self._rates is None:
            self._rates = price_book().rates_at(self.model, timestamp_to_datetime(at))
        counts = self.worst_case()
        cost = counts.cost(self._rates)
        micro = to_micro(cost)
        reservation = Reservation(
            f"reserved:{uuid.uuid4().hex}",
            micro,
            cost,
            counts,
            pending_input_bytes=self._pending_input_bytes,
            pending_text_tokens=self._pending_text_tokens,
        )
        state, written = await self._reserve_and_book(reservation, self.caps(at), at)
        state = self.counters.observe(state, self.budget, "reserve", at)
        self._state = state
        self._hour_usd = state.hour_usd
        if not state.allowed:
            admission = self.counters.admission_of(state)
            self._count_exceeded(admission.reason)
            logger.info(
                "response not started for %s: $%s would pass %s",
                self.client,
                cost,
                state.refused.name if state.refused else "the breaker",
            )
            return admission
        self.reservation = reservation
        self._limit_room = self._room_beyond(state)
        if isinstance(written, Exception):
            # The hold counts in the counters already; its ledger row is written when the
            # response settles (the database may be back by then). The answer goes on.
            logger.warning(
                "provisional usage not written yet (%s); it is written at settlement",
                written.__class__.__name__,
            )
        else:
            reservation.record_id = written
        return Admission(True, state=state)

    @ledger_hop
    def _reserve_and_book(self, reservation, caps, at):
        """The hold on every cap, then (held) its provisional row, in one worker-thread call:
        (the unobserved decision, the row's id or the exception that kept it unwritten)."""
        state = self.counters.decide(
            "reserve",
            caps,
            self.budget,
            amount=reservation.micro,
            add=reservation.member,
            at=at,
            observe=False,
        )
        if not state.allowed:
            return state, None
        try:
            return state, self._write_provisional(reservation, at)
        except Exception as exc:  # reported by the caller; the hold stands
            return state, exc

    def take_reservation(self, response_id=None):
        """The hold a finished response ran under (and no longer the meter's current one),
        or None; pass it to ``charge_response`` so a retried booking settles the same hold."""
        reservation = self.reservation
        if reservation is None or reservation.response_id not in (None, str(response_id)):
            return None
        self.reservation = None
        return reservation

    @staticmethod
    def _room_beyond(state):
        """(reason, USD) the tightest spend limit or hourly cap leaves beyond a hold."""
        room = None
        for cap, micro in state.totals:
            if cap.name == SESSION or cap.shadow or cap.cap_micro <= 0:
                continue
            left = Decimal(max(0, cap.cap_micro - micro)) / 1_000_000
            if room is None or left < room[1]:
                room = (cap.reason, left)
        return room

    def note_response_started(self, response_id):
        """Upstream created the reserved response (its id will settle the reservation)."""
        if self.reservation is not None and self.reservation.response_id is None:
            self.reservation.response_id = response_id

    async def release_reservation(self):
        """Drop the reservation of a response that upstream refused to start."""
        reservation, self.reservation = self.reservation, None
        if reservation is None:
            return
        at = self.timer()
        if reservation.record_id is not None:
            await self._drop_provisional(reservation)
        self._state = await self.counters.arelease(
            self.caps(at), reservation.member, self.budget, at=at
        )

    @ledger_hop
    def _book_provisional(self, reservation, at):
        """Write a hold's provisional row (its id) when the reservation could not."""
        return self._write_provisional(reservation, at)

    def _write_provisional(self, reservation, at):
        from ..models import UsageRecord

        tokens = reservation.counts.as_dict()
        when = timestamp_to_datetime(at)
        if connection.vendor == "postgresql":
            record_id = _book_in_one_statement(
                self.session_id,
                UsageRecord.Kind.RESPONSE.value,
                self.model[:100],
                reservation.reference,
                tokens,
                reservation.cost,
                self._rates.unknown,
                when,
                estimated=True,
            )
            if record_id is None:  # as the INSERT below would: a hold's reference is unique
                raise IntegrityError(f"usage record {reservation.reference!r} exists already")
            return record_id
        with transaction.atomic():
            record = UsageRecord.objects.create(
                session_id=self.session_id,
                kind=UsageRecord.Kind.RESPONSE,
                model=self.model[:100],
                response_id=reservation.reference,
                cost_usd=reservation.cost,
                unknown_model=self._rates.unknown,
                estimated=True,
                created_at=when,
                **tokens,
            )
            _add_to_session_totals(self.session_id, reservation.cost, tokens)
        return record.pk

    @ledger_hop
    def _drop_provisional(self, reservation):
        from ..models import UsageRecord

        with transaction.atomic():
            deleted, _ = UsageRecord.objects.filter(
                pk=reservation.record_id, estimated=True
            ).delete()
            if deleted:
                tokens = {kind: -count for kind, count in reservation.counts.as_dict().items()}
                _add_to_session_totals(self.session_id, -reservation.cost, tokens)

    @ledger_hop
    def _settle_provisional(self, reservation, reference, counts_of, at):
        """Replace the provisional record by the exact usage, in place, then settle the
        counters (idempotent: a replay changes neither and answers None)."""
        from ..models import UsageRecord

        when = timestamp_to_datetime(at)
        book = price_book()
        rates = book.rates_at(self.model, when)
        counts = counts_of(rates)
        cost = counts.cost(rates)
        self._rates = rates
        tokens = counts.as_dict()
        estimate = reservation.counts.as_dict()
        delta = {kind: tokens[kind] - estimate[kind] for kind in TOKEN_KINDS}
        if connection.vendor == "postgresql":
            updated = _settle_in_one_statement(
                reservation.record_id,
                self.session_id,
                reference,
                tokens,
                cost,
                rates.unknown,
                when,
                [cost - reservation.cost, *delta.values()],
            )
        else:
            with transaction.atomic():
                updated = UsageRecord.objects.filter(
                    pk=reservation.record_id, estimated=True
                ).update(
                    response_id=reference,
                    cost_usd=cost,
                    unknown_model=rates.unknown,
                    estimated=False,
                    created_at=when,
                    **tokens,
                )
                if updated:
                    _add_to_session_totals(self.session_id, cost - reservation.cost, delta)
        if not updated:
            return None
        # The ledger first (a crash from here on keeps the exact row), then the counters swap
        # the hold for the exact cost in the same worker-thread call.
        micro = to_micro(cost)
        state = self.counters.decide(
            "settle",
            self.caps(at),
            self.budget,
            amount=micro,
            add=entry_member(micro, reservation.record_id),
            remove=reservation.member,
            at=at,
            observe=False,
        )
        return _Booking(reservation.record_id, cost, counts, rates, state=state)

    # -- charging -------------------------------------------------------------------------------

    async def charge_response(self, event, reservation=_CURRENT):
        """Book a ``response.done`` server event's usage (once per response id): settles the
        reservation it ran under (``reservation``: one from ``take_reservation``; by default
        the meter's current one if it matches), or books it plainly when it had none."""
        response = event.get("response") or {}
        response_id = response.get("id") or event.get("response_id")
        if not response_id:
            response_id = f"event:{event.get('event_id') or id(event)}"
            logger.warning("response.done without a response id; booked as %s", response_id)
        usage = response.get("usage") or {}

        def counts_of(rates):
            return usage_token_counts(usage, rates)

        if reservation is _CURRENT:
            reservation = self.take_reservation(response_id)
        if reservation is not None:
            outcome, counts = await self._settle(reservation, str(response_id), counts_of)
        else:
            outcome, counts = await self._charge(
                "response", str(response_id), self.model, counts_of
            )
        if counts is not None and any(counts.as_dict().values()):
            self._learn_context(counts, reservation)
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

    async def charge_tool_fee(self, reference, tool, calls):
        """Book a tool's per-call fee (``ToolPrice``, on top of its tokens), once per reference."""
        outcome, _ = await self._charge(
            "tool_fee", str(reference), tool, lambda rates: TokenCounts(), per_call=calls
        )
        return outcome

    @ledger_hop
    def _book(self, kind, reference, model, counts_of, at, per_call=0):
        """Book plainly, then (booked, not a replay) charge the counters, in one
        worker-thread call; the decision is observed by the caller."""
        booking = self._write_booking(kind, reference, model, counts_of, at, per_call)
        if booking.record_id is None:
            return booking
        micro = to_micro(booking.cost)
        state = self.counters.decide(
            "charge",
            self.caps(at),
            self.budget,
            amount=micro,
            add=entry_member(micro, booking.record_id),
            at=at,
            observe=False,
        )
        return _replace(booking, state=state)

    def _write_booking(self, kind, reference, model, counts_of, at, per_call=0):
        from ..models import QuotaSession, UsageRecord

        when = timestamp_to_datetime(at)
        book = price_book()
        rates = book.rates_at(model, when)
        counts = counts_of(rates)
        cost = counts.cost(rates)
        if per_call:
            rates = _replace(rates, unknown=False)
            cost = quantize_usd(book.tool_fee_at(model, when) * int(per_call))
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

    def _count_booking(self, booking, kind, reference):
        rates = booking.rates
        if rates.unknown:
            warn_unknown(rates, f"{kind} {reference}")
        label = rates.metric_model
        api_cost_total_usd.labels(model=label).inc(float(booking.cost))
        for token_kind, count in booking.counts.as_dict().items():
            if count:
                token_usage_total.labels(model=label, type=token_kind).inc(count)

    async def _after_decision(self, state, at):
        self._state = state
        self._hour_usd = state.hour_usd
        if state.tripped:
            await broadcast_breaker_open(state, at)

    async def _settle(self, reservation, reference, counts_of):
        at = self.timer()
        if reservation.record_id is None:
            # The hold was taken but its ledger row is not written yet (the database was
            # away): write it now, so the exact usage has a row to replace.
            reservation.record_id = await self._book_provisional(reservation, at)
        booking = await self._settle_provisional(reservation, reference, counts_of, at)
        if booking is None:
            logger.info("replayed response %s (session %s): not booked", reference, self.session_id)
            return self._outcome(None, booked=False, state=None, at=at), None
        self._count_booking(booking, "response", reference)
        self._cost += booking.cost
        state = self.counters.observe(booking.state, self.budget, "settle", at)
        await self._after_decision(state, at)
        return self._outcome(booking, booked=True, state=state, at=at), booking.counts

    async def _charge(self, kind, reference, model, counts_of, per_call=0):
        if self.session_id is None:
            raise RuntimeError("SessionMeter.open() must be awaited before charging")
        at = self.timer()
        booking = await self._book(kind, reference, model, counts_of, at, per_call)
        if booking.record_id is None:
            logger.info("replayed %s %s (session %s): not booked", kind, reference, self.session_id)
            self._cost = max(self._cost, booking.session_cost)
            return self._outcome(booking, booked=False, state=None, at=at), None
        self._count_booking(booking, kind, reference)
        self._cost += booking.cost
        state = self.counters.observe(booking.state, self.budget, "charge", at)
        await self._after_decision(state, at)
        return self._outcome(booking, booked=True, state=state, at=at), booking.counts

    def _outcome(self, booking, *, booked, state, at):
        # The ledger's total, not the shared counter's (which holds a running reservation).
        session_cost = self._cost
        outcome = ChargeOutcome(
            cost=booking.cost if booking is not None else Decimal(0),
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
                        f"This session has used {percent}% of its {dollars(cap)} budget.",
                    )
                )
        outcome.warnings += self._limit_warnings(state)
        if session_cost >= cap:
            outcome.exceeded = exceeded_event(
                "budget", f"This session has spent its {dollars(cap)} budget.", 0
            )
            outcome.close_code = CLOSE_BUDGET
            self._count_exceeded("budget")
        elif state is not None and state.breaker_open:
            retry = max(1, state.breaker_retry_seconds(at))
            outcome.exceeded = exceeded_event("breaker", breaker_message(retry), retry)
            outcome.close_code = CLOSE_PAUSED
            self._count_exceeded("breaker")
        if state is not None:
            outcome.hourly_cap_reached = state.hour_over(self.budget)
            outcome.breaker_tripped = state.tripped
        return outcome

    def _limit_warnings(self, state):
        """``quota.warning`` at 50/80/95 % of the tightest spend limit, once each."""
        tightest = state.tightest() if state is not None else None
        if tightest is None or tightest[0].name == SESSION:
            return []
        cap, left = tightest
        used = Decimal(cap.cap_micro - left) / cap.cap_micro
        warnings = []
        for share, suffix in (
            (Decimal("0.95"), "95"),
            (Decimal("0.80"), "80"),
            (Decimal("0.50"), "50"),
        ):
            key = f"{cap.name}:{suffix}"
            if used >= share and key not in self._sent:
                self._sent.update(
                    f"{cap.name}:{s}" for s in ("50", "80", "95") if int(s) <= int(suffix)
                )
                warnings.append(
                    warning_event(
                        f"{cap.reason}_{suffix}",
                        f"You have used {suffix}% of the {dollars(cap.cap_micro / 1_000_000)} "
                        f"spending limit '{cap.name}'.",
                    )
                )
                break
        return warnings

    def _count_exceeded(self, reason):
        key = f"exceeded:{reason}"
        if key not in self._sent:
            self._sent.add(key)
            count_refusal(reason)

    def refusal(self, admission):
        """The close code and ``quota.exceeded`` event of a refused reservation."""
        return close_code_for(admission.reason), admission.event()

    # -- status and duration ------------------------------------------------------------------

    def seconds_left(self, now=None):
        """Whole seconds until the duration cap (from the meter's start)."""
        if self.started is None:
            return int(self.budget.session_max_seconds)
        now = self.timer() if now is None else now
        return max(0, int(self.started + self.budget.session_max_seconds - now))

    def status(self):
        """The ``quota.status`` event for the browser."""
        event = {
            "type": "quota.status",
            "session_cost_usd": format_usd(self._cost),
            "session_cap_usd": format_usd(self.budget.session_cap_usd),
            "seconds_left": self.seconds_left(),
        }
        tightest = self._state.tightest() if self._state is not None else None
        if tightest is not None:
            cap, left = tightest
            if cap.name == SESSION:
                # The ledger's spend, not the counter (which holds a running reservation).
                left = max(0, cap.cap_micro - to_micro(self._cost))
            event["limit_name"] = cap.name
            event["limit_left_usd"] = format_usd(Decimal(left) / 1_000_000)
        else:
            event["limit_name"] = SESSION
            event["limit_left_usd"] = format_usd(
                max(Decimal(0), self.budget.session_cap_usd - self._cost)
            )
        return event

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
