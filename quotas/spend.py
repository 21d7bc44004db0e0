"""The spend engine: every cap's counter, reservations, settlements and the circuit breaker.

Amounts are integer micro-USD. One decision is one Redis round trip (``lua/spend.lua``) over
every cap that applies (``quotas.caps``: the session, each spend limit, the rolling hour),
so decisions are race-free across instances. Without Redis, or while it is down, the same
semantics run in process (``LocalSpend``, the twin a property test holds to the script).

Each cap is a counter: a sorted set of entries ``"<micro>:<id>"`` scored by their time (ms)
plus a running total. A rolling counter first forgets the entries at or before
``now - window`` (each entry is added once and removed once: amortised O(1)); a calendar or
session counter keeps every entry until its key expires. The id of an entry is its ledger
row's id, so adding is idempotent and ``rebuild_from_ledger`` can replay the ledger into
Redis after an outage without counting anything twice.

Operations (one script, ``op``):
- ``reserve``  the worst case of a response about to start: refused (nothing written) when it
               would take any non-shadow cap past its cap, or while the breaker is open; else
               the entry is added to every counter. A running reservation counts against
               every cap, on every instance, until it is settled.
- ``settle``   replace the reservation's entry by the exact cost's (same ledger row).
- ``release``  remove a reservation whose response never started.
- ``charge``   add a cost that was not reserved (transcriptions, tools); never refused.
- ``admit``    may a new session start: refused when a cap has no room for one bounded answer
               (``amount``; 0: nothing left at all) or the breaker is open; ``retry_after``
               is when enough spend leaves the window (rolling), the period resets
               (calendar), or the breaker turns half-open.
- ``read``     totals and breaker state only.

Breaker state machine (one shared hash; absent means closed), watching the rolling hour:
- closed    -> open       a charge or settlement leaves the rolling hour >= the threshold
                          (``until = now + breaker_cooldown_seconds``; ``tripped`` is reported
                          once, to the charger, who broadcasts it on ``quotas.breaker``)
- open      -> half_open  at the first evaluation at or after ``until``
- half_open -> open       a charge leaves the rolling hour >= the threshold (new cool-down)
- half_open -> closed     an evaluation finds the rolling hour below the threshold
- any       -> closed     ``reset_breaker()`` (admin action).

Redis not configured, or down: ``LocalSpend``, seeded from the ledger when this process
starts using it. Costs are always counted (money is never ignored); ``QUOTAS_FAIL_MODE`` only
decides admissions and reservations while Redis is down: ``local`` uses the in-process twin,
``open`` allows, ``closed`` refuses (reason ``breaker``). When Redis comes back
(``SharedRedis.on_recovery``), the ledger is replayed into Redis; the database is the source
of truth for money.
"""

import asyncio
import heapq
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from channels.db import database_sync_to_async

from .breaker import (  # noqa: F401 (the breaker's names, re-exported for callers)
    BREAKER_EVENT,
    BREAKER_GROUP,
    CLOSED,
    HALF_OPEN,
    OPEN,
    broadcast_breaker_open,
)
from .caps import HOUR_SECONDS, HOURLY, SESSION, CapSet, Identity, hourly_cap, session_cap
from .caps import spend_caps as build_caps
from .conf import quota_settings
from .hash_tags import spend_prefix
from .metrics import circuit_breaker_open, hourly_cost_usd
from .notifications import spend_notifier
from .pricing import MICRO_PER_USD, from_micro, timestamp_to_datetime, to_micro
from .protocol import refusal_message
from .redis_client import LuaScript, fallback_mode, shared_redis

logger = logging.getLogger("quotas.spend")

WINDOW_SECONDS = HOUR_SECONDS
REPLAY_BATCH = 1000
OPS = ("read", "admit", "reserve", "charge", "settle", "release")
SPEND = LuaScript("spend")
REPLAY = LuaScript("spend_replay")
RESET_BREAKER = LuaScript("breaker_reset")


def entry_member(micro, entry_id):
    """A counter entry: its amount and a unique id (the ledger row's)."""
    return f"{int(micro)}:{entry_id}"


def member_amount(member):
    """The micro-USD amount an entry carries."""
    return int(member.split(":", 1)[0])


def _ms(timestamp):
    return round(timestamp * 1000)


@dataclass(frozen=True)
class SpendState:
    """Totals and breaker state after one decision (amounts in micro-USD)."""

    session_micro: int
    hour_micro: int
    breaker: str
    tripped: bool  # this decision opened the breaker
    breaker_until: float  # POSIX seconds when an open breaker turns half-open
    added: bool  # the entry was counted (False: replayed entry, refused, or no entry)
    retry_seconds: float  # a refusal: until it would be allowed (0: not by waiting)
    engine: str  # "redis" | "local"
    breaker_before: str = ""  # the breaker state before this decision (transitions)
    allowed: bool = True
    refused: object = None  # the Cap that refused (None: allowed, or the breaker)
    totals: tuple = ()  # (Cap, micro) per cap of the decision
    over: tuple = ()  # the caps a reserve/admit found over (shadow ones included)

    @property
    def session_usd(self):
        return from_micro(self.session_micro)

    @property
    def hour_usd(self):
        return from_micro(self.hour_micro)

    @property
    def breaker_open(self):
        return self.breaker == OPEN

    @property
    def refused_by_breaker(self):
        return not self.allowed and self.refused is None

    @property
    def reason(self):
        """The refusal reason (``budget``, ``client_budget``, ... ``breaker``), or None."""
        if self.allowed:
            return None
        return "breaker" if self.refused is None else self.refused.reason

    @property
    def hourly_retry_seconds(self):
        return self.retry_seconds

    def total_of(self, name):
        """The total of the cap called ``name`` (0 when the decision had no such cap)."""
        for cap, micro in self.totals:
            if cap.name == name:
                return micro
        return 0

    def session_over(self, budget):
        """True when the session has spent its cap."""
        return self.session_micro >= to_micro(budget.session_cap_usd)

    def hour_over(self, budget):
        """True when the rolling hour has reached the hourly cap."""
        return self.hour_micro >= to_micro(budget.hourly_cap_usd)

    def breaker_retry_seconds(self, now):
        return max(0, math.ceil(self.breaker_until - now)) if self.breaker_open else 0

    def tightest(self):
        """(cap, micro left) of the enforced cap with the least left, or None."""
        best = None
        for cap, micro in self.totals:
            if cap.cap_micro <= 0 or cap.shadow:
                continue
            left = max(0, cap.cap_micro - micro)
            if best is None or left < best[1]:
                best = (cap, left)
        return best


@dataclass(frozen=True)
class Admission:
    """Whether a session or response may start; ``reason`` names the cap when not."""

    allowed: bool
    reason: str | None = None
    retry_after: int = 0
    message: str = ""
    state: SpendState | None = None

    def event(self):
        """The ``quota.exceeded`` event for a refusal."""
        from .protocol import exceeded_event

        return exceeded_event(self.reason, self.message, self.retry_after)


# -- the in-process twin ------------------------------------------------------------------------


class _LocalCounter:
    """One counter of the twin: entries by member, a heap by score, the running total."""

    __slots__ = ("entries", "expires_at", "heap", "total")

    def __init__(self):
        self.entries = {}  # member -> score
        self.heap = []  # (score, member); entries removed early stay until popped
        self.total = 0
        self.expires_at = 0

    def forget_before(self, floor):
        heap, entries = self.heap, self.entries
        while heap and heap[0][0] <= floor:
            score, member = heapq.heappop(heap)
            if entries.get(member) == score:
                del entries[member]
                self.total -= member_amount(member)

    def add(self, score, member):
        if member in self.entries:
            return False
        self.entries[member] = score
        heapq.heappush(self.heap, (score, member))
        self.total += member_amount(member)
        return True

    def remove(self, member):
        if self.entries.pop(member, None) is None:
            return False
        self.total -= member_amount(member)
        return True

    def retry_ms(self, cap, now, extra):
        if cap.resets_at:
            return _ms(cap.resets_at) - now
        if not cap.window_ms:
            return 0
        need = self.total + extra - cap.cap_micro + (0 if extra else 1)
        gone = 0
        for score, member in sorted((s, m) for m, s in self.entries.items()):
            gone += member_amount(member)
            if gone >= need:
                return score + cap.window_ms - now
        return cap.window_ms


class LocalSpend:
    """The in-process twin of ``lua/spend.lua`` (same semantics, one lock)."""

    engine = "local"

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = {}
        self.breaker = CLOSED
        self.until_ms = 0
        self._calls = 0

    def _counter(self, cap, now):
        counter = self.counters.get(cap.key)
        if counter is None:
            counter = self.counters[cap.key] = _LocalCounter()
        if cap.window_ms:
            counter.forget_before(now - cap.window_ms)
        return counter

    def _expire_idle(self, now):
        # Like Redis key expiry: only memory, never a decision (keys outlive their windows).
        for key in [k for k, c in self.counters.items() if c.expires_at and c.expires_at < now]:
            del self.counters[key]

    def decide(self, op, caps, now, amount, add_member, remove_member, threshold, cooldown):
        """Mirror of ``lua/spend.lua``; returns the reply in the script's shape."""
        with self._lock:
            self._calls += 1
            if self._calls % 1000 == 0:
                self._expire_idle(now)
            counters = [self._counter(cap, now) for cap in caps]
            touched = [False] * len(counters)
            if op in ("settle", "release") and remove_member:
                for i, counter in enumerate(counters):
                    touched[i] = counter.remove(remove_member)
            before = self.breaker
            if self.breaker == OPEN and now >= self.until_ms:
                self.breaker = HALF_OPEN
            allowed, refused, retry = 1, 0, 0
            over = [0] * len(counters)
            extra = amount if op in ("reserve", "admit") else 0
            if op in ("admit", "reserve"):
                for i, (cap, counter) in enumerate(zip(caps, counters, strict=True)):
                    if cap.cap_micro <= 0:
                        continue
                    if extra > 0:
                        is_over = counter.total + extra > cap.cap_micro
                    else:
                        is_over = counter.total >= cap.cap_micro
                    if is_over:
                        over[i] = 1
                        if not cap.shadow and allowed and self.breaker != OPEN:
                            allowed, refused = 0, i + 1
                            retry = counter.retry_ms(cap, now, extra)
                if self.breaker == OPEN:
                    allowed, refused, retry = 0, -1, self.until_ms - now
            added = 0
            if allowed and op in ("reserve", "charge", "settle") and amount > 0 and add_member:
                for i, counter in enumerate(counters):
                    if counter.add(now, add_member):
                        touched[i] = True
                        added = 1
            for cap, counter, changed in zip(caps, counters, touched, strict=True):
                if changed:
                    counter.expires_at = now + cap.ttl_seconds * 1000
            tripped = 0
            hour = caps.index(HOURLY)
            if hour >= 0:
                total = counters[hour].total
                if added and op != "reserve" and self.breaker != OPEN and total >= threshold:
                    self.breaker, self.until_ms, tripped = OPEN, now + cooldown, 1
                if self.breaker == HALF_OPEN and total < threshold:
                    self.breaker, self.until_ms = CLOSED, 0
            return [
                allowed,
                refused,
                retry,
                self.breaker,
                tripped,
                self.until_ms,
                before,
                added,
                *(counter.total for counter in counters),
                *over,
            ]

    def replay(self, cap, now, entries):
        """Add ledger ``entries`` (score_ms, member) to one counter, each at most once."""
        with self._lock:
            counter = self._counter(cap, now)
            for score, member in entries:
                if not cap.window_ms or score > now - cap.window_ms:
                    counter.add(score, member)
            counter.expires_at = now + cap.ttl_seconds * 1000
            return counter.total

    def reset_breaker(self):
        with self._lock:
            self.breaker, self.until_ms = CLOSED, 0

    def forget_session(self, key):
        with self._lock:
            self.counters.pop(key, None)


# -- the ledger, for seeding the twin and rebuilding Redis --------------------------------------


def ledger_entries(now, snapshot, prefix, tz, holds=None):
    """Every counter's entries as the ledger has them: {Cap: [(score_ms, member), ...]} (sync).

    Which counters a row belongs to follows from its session's identity (client, user and
    the user's groups now) and today's policies; open sessions get their own counters too.
    ``holds``: a dict to fill with each provisional row's member -> (session id, response
    id, the caps its entry went to).
    """
    from django.contrib.auth.models import Group
    from django.db.models import Q

    from .caps import limit_cap
    from .models import QuotaSession, UsageRecord

    budget = snapshot.budget
    lookback = HOUR_SECONDS
    probe = Identity(client="-", user_id=0)
    for limit in snapshot.spend_limits:
        cap = limit_cap(limit, probe, now, prefix=prefix, tz=tz)
        lookback = max(lookback, cap.window_ms / 1000 if cap.window_ms else now - cap.starts_at)
    since = timestamp_to_datetime(now - lookback)
    horizon = max(int(budget.session_max_seconds), HOUR_SECONDS) + 60
    open_ids = set(
        QuotaSession.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=timestamp_to_datetime(now - HOUR_SECONDS)),
            started_at__gt=timestamp_to_datetime(now) - timedelta(seconds=horizon),
        ).values_list("id", flat=True)
    )
    rows = list(
        UsageRecord.objects.filter(Q(created_at__gt=since) | Q(session_id__in=open_ids))
        .order_by("created_at")
        .values_list(
            "pk",
            "created_at",
            "cost_usd",
            "session_id",
            "session__client",
            "session__user",
            "estimated",
            "response_id",
        )
    )
    users = {row[5] for row in rows if row[5] is not None}
    groups = {}
    for user_id, group_id in Group.user_set.through.objects.filter(user_id__in=users).values_list(
        "user_id", "group_id"
    ):
        groups.setdefault(user_id, set()).add(group_id)
    entries = {}
    cap_sets = {}
    for pk, created_at, cost, session_id, client, user_id, estimated, reference in rows:
        micro = to_micro(cost)
        if micro <= 0:
            continue
        at = created_at.timestamp()
        # A provisional row is the hold itself (its entry is named by its reference).
        member = entry_member(micro, reference if estimated else pk)
        identity = (client, user_id)
        caps = cap_sets.get(identity)
        if caps is None:
            who = Identity(client, user_id, frozenset(groups.get(user_id, ())))
            caps = cap_sets[identity] = build_caps(
                budget, snapshot.spend_limits, who, now, prefix=prefix, tz=tz
            )
        chosen = list(caps)
        if session_id in open_ids:
            chosen.append(session_cap(budget, session_id, prefix=prefix))
        counted = [cap for cap in chosen if cap.name == SESSION or cap.counts_entry_at(at, now)]
        for cap in counted:
            entries.setdefault(cap, []).append((_ms(at), member))
        if estimated and holds is not None and counted:
            holds[member] = (session_id, reference, CapSet(tuple(counted)))
    entries.setdefault(hourly_cap(budget, prefix=prefix), [])
    return entries


# -- the engine ---------------------------------------------------------------------------------


def _cap_plan(caps):
    """The keys and per-counter arguments of ``lua/spend.lua`` for ``caps`` (kept with them)."""
    keys, args = [], []
    for cap in caps:
        keys += (cap.key, cap.total_key)
        resets = _ms(cap.resets_at) if cap.resets_at else 0
        shadow = 1 if cap.shadow else 0
        args.append(f"{cap.window_ms} {cap.cap_micro} {cap.ttl_seconds} {shadow} {resets}")
    plan = caps.derived["spend"] = (tuple(keys), tuple(args))
    return plan


class SpendCounters:
    """Spend decisions on Redis when up, else in process; one per process (``spend_counters``)."""

    def __init__(self, link=None, *, timer=time.time, fail_mode=None, prefix=None, ledger=True):
        self.link = link
        self.timer = timer
        self._fail_mode = fail_mode
        self._prefix = prefix
        self.ledger = ledger  # seed the local twin / rebuild Redis from the database
        self.local = LocalSpend()
        self._local_seeded = False
        self._scripts = {}
        self._tasks = set()
        if link is not None and ledger:
            link.on_recovery(self._on_redis_recovery)

    @property
    def prefix(self):
        """The prefix of every spend key; on a Redis Cluster it carries the one hash tag
        that every spend key shares (``quotas.hash_tags``)."""
        cluster = self.link is not None and self.link.cluster
        return spend_prefix(self._prefix or quota_settings.KEY_PREFIX, cluster)

    @property
    def fail_mode(self):
        return fallback_mode(self.link, self._fail_mode)

    # -- caps ---------------------------------------------------------------------------------

    def caps_for(self, budget, identity=None, *, limits=(), session_id=None, at=None):
        """The caps of a decision for ``identity`` (and ``session_id``) at ``at``."""
        now = self.timer() if at is None else at
        identity = identity or Identity(client="-")
        return build_caps(
            budget,
            limits,
            identity,
            now,
            prefix=self.prefix,
            # Only calendar periods need the zone (looking it up costs more than the caps).
            tz=quota_settings.budget_timezone if limits else None,
            session_id=session_id,
        )

    def default_caps(self, budget, session_id=None):
        """The session (when given) and the rolling hour: decisions that know no identity."""
        return self.caps_for(budget, session_id=session_id)

    # -- one decision: plan, parse, and the single I/O call ------------------------------------

    def _plan(self, op, caps, budget, amount, add_member, remove_member, now):
        if op not in OPS:
            raise ValueError(f"unknown spend operation {op!r}")
        counter_keys, cap_args = caps.derived.get("spend") or _cap_plan(caps)
        args = [
            op,
            now,
            int(amount),
            add_member or "",
            remove_member or "",
            to_micro(budget.breaker_threshold_usd),
            int(budget.breaker_cooldown_seconds) * 1000,
            caps.index(HOURLY) + 1,
            *cap_args,
        ]
        return [f"{self.prefix}:spend:breaker", *counter_keys], args

    @staticmethod
    def _parse(reply, caps, engine):
        # The script answers one string of fields; the twin a list of the same fields.
        fields = reply.split() if type(reply) is bytes else reply
        n = len(caps)
        members = caps.caps
        totals = [int(value) for value in fields[8 : 8 + n]]
        flags = [int(value) for value in fields[8 + n : 8 + 2 * n]]
        state, before = fields[3], fields[6]
        if type(state) is bytes:
            state, before = state.decode(), before.decode()
        refused = int(fields[1])
        session = caps.index(SESSION)
        hour = caps.index(HOURLY)
        return SpendState(
            session_micro=totals[session] if session >= 0 else 0,
            hour_micro=totals[hour] if hour >= 0 else 0,
            breaker=state,
            tripped=int(fields[4]) == 1,
            breaker_until=int(fields[5]) / 1000.0,
            added=int(fields[7]) == 1,
            retry_seconds=max(0, int(fields[2])) / 1000.0,
            engine=engine,
            breaker_before=before,
            allowed=int(fields[0]) == 1,
            refused=members[refused - 1] if refused > 0 else None,
            totals=tuple(zip(members, totals, strict=True)),
            over=tuple(cap for cap, flag in zip(members, flags, strict=True) if flag)
            if any(flags)
            else (),
        )

    def _local_decide(self, op, caps, budget, amount, add_member, remove_member, now):
        reply = self.local.decide(
            op,
            caps,
            now,
            int(amount),
            add_member or "",
            remove_member or "",
            to_micro(budget.breaker_threshold_usd),
            int(budget.breaker_cooldown_seconds) * 1000,
        )
        return self._parse(reply, caps, "local")

    def decide(self, op, caps, budget, *, amount=0, add=None, remove=None, at=None, observe=True):
        """One spend decision (sync); see the module docstring for ``op``.

        ``observe=False``: the caller hands the state to ``observe()`` itself (a decision
        taken in a worker thread is observed back on the event loop, where alerts queue)."""
        now = _ms(self.timer() if at is None else at)
        state = None
        if self.link is not None:
            reply = self.link.run(SPEND, *self._plan(op, caps, budget, amount, add, remove, now))
            if reply is not None:
                state = self._redis_state(reply, caps)
        if state is None:
            self._seed_local()
            state = self._local_state(op, caps, budget, amount, add, remove, now)
        return self._observe(state, budget, now, op) if observe else state

    async def adecide(self, op, caps, budget, *, amount=0, add=None, remove=None, at=None):
        """``decide()`` for async callers: the Redis call does not block the event loop."""
        now = _ms(self.timer() if at is None else at)
        if self.link is not None:
            plan = self._plan(op, caps, budget, amount, add, remove, now)
            reply = await self.link.arun(SPEND, *plan)
            if reply is not None:
                return self._observe(self._redis_state(reply, caps), budget, now, op)
        if self.ledger and not self._local_seeded:
            await database_sync_to_async(self._seed_local)()
        state = self._local_state(op, caps, budget, amount, add, remove, now)
        return self._observe(state, budget, now, op)

    def observe(self, state, budget, op, at):
        """Record what a ``decide(..., observe=False)`` at ``at`` found (gauges, breaker
        transitions, alerts); returns ``state``."""
        return self._observe(state, budget, _ms(at), op)

    def _redis_state(self, reply, caps):
        self._local_seeded = False  # the next stretch of local use seeds the twin anew
        return self._parse(reply, caps, "redis")

    def _local_state(self, op, caps, budget, amount, add, remove, now):
        state = self._local_decide(self._local_op(op), caps, budget, amount, add, remove, now)
        return self._fallback(state, op)

    def _fails_over(self, op):
        return op in ("admit", "reserve") and self.link is not None and self.fail_mode != "local"

    def _local_op(self, op):
        """The twin's operation while Redis is down: ``QUOTAS_FAIL_MODE`` open or closed decides
        admissions and reservations instead of the twin (an allowed reservation still counts,
        like any cost)."""
        if not self._fails_over(op):
            return op
        return "charge" if op == "reserve" and self.fail_mode == "open" else "read"

    def _fallback(self, state, op):
        if not self._fails_over(op) or self.fail_mode == "open":
            return state
        retry = max(1.0, float(self.link.retry_seconds))
        return _replace(state, allowed=False, refused=None, retry_seconds=retry)

    def _observe(self, state, budget, now_ms, op):
        if state.totals and state.totals[-1][0].name == HOURLY:
            hourly_cost_usd.set(state.hour_micro / MICRO_PER_USD)
        circuit_breaker_open.set(1 if state.breaker_open else 0)
        if state.tripped:
            logger.warning(
                "circuit breaker opened: $%s spent in the rolling hour (%s)",
                state.hour_usd,
                state.engine,
            )
        # Transitions and thresholds are recorded and alerted without waiting for either.
        spend_notifier.observe(
            state, budget, now_ms / 1000.0, charged=op in ("charge", "settle") and state.added
        )
        return state

    # -- the operations -------------------------------------------------------------------------

    async def areserve(self, caps, amount_micro, member, budget, *, at=None):
        """Hold ``amount_micro`` against every cap of ``caps``, or refuse."""
        return await self.adecide("reserve", caps, budget, amount=amount_micro, add=member, at=at)

    async def asettle(self, caps, reserved_member, amount_micro, member, budget, *, at=None):
        """Replace a reservation's entry by the exact cost's."""
        return await self.adecide(
            "settle", caps, budget, amount=amount_micro, add=member, remove=reserved_member, at=at
        )

    async def arelease(self, caps, reserved_member, budget, *, at=None):
        """Drop a reservation whose response never started."""
        return await self.adecide("release", caps, budget, remove=reserved_member, at=at)

    async def acharge(self, session_id, amount_micro, budget, *, member=None, at=None, caps=None):
        """Add ``amount_micro`` to the session, the rolling hour (and ``caps``)."""
        caps = caps or self.default_caps(budget, session_id)
        member = member or entry_member(amount_micro, uuid.uuid4().hex)
        return await self.adecide("charge", caps, budget, amount=amount_micro, add=member, at=at)

    def read(self, budget, session_id=None):
        """Totals and breaker state without charging (sync)."""
        return self.decide("read", self.default_caps(budget, session_id), budget)

    def _admission(self, state):
        if state.allowed:
            return Admission(True, state=state)
        now = self.timer()
        if state.refused_by_breaker and state.breaker_open:
            retry = max(1, state.breaker_retry_seconds(now))
        else:
            retry = max(1, math.ceil(state.retry_seconds)) if state.retry_seconds else 0
        cap = state.refused
        message = refusal_message(state.reason, retry, cap)
        return Admission(False, state.reason, retry, message, state)

    async def aadmit(self, budget, caps=None, *, room_micro=0):
        """May a new session start? Refusals carry the cap's reason and retry_after."""
        caps = caps or self.default_caps(budget)
        return self._admission(await self.adecide("admit", caps, budget, amount=room_micro))

    def admission_of(self, state):
        """A reserve/admit ``SpendState`` as an ``Admission`` (reason, message, retry)."""
        return self._admission(state)

    def breaker_state(self, budget=None):
        """'closed', 'open' or 'half_open' as of now (one Redis round trip, sync)."""
        if budget is None:
            from .policies import policy_cache

            budget = policy_cache.get().budget
        return self.read(budget).breaker

    def reset_breaker(self, actor="system", budget=None):
        """Close the breaker everywhere (admin action); returns True when Redis was reset too.

        The reset is recorded as a ``BreakerEvent`` by ``actor`` and announced by alert.
        """
        shared = self._reset_breaker()
        try:
            if budget is None:
                from .policies import policy_cache

                budget = policy_cache.get().budget
            state = self.read(budget)
        except Exception:  # the reset itself is done; its record must not undo it
            logger.exception("could not read the spend after a breaker reset")
            state = None
        spend_notifier.manual_reset(actor, state, budget, self.timer())
        return shared

    def _reset_breaker(self):
        self.local.reset_breaker()
        circuit_breaker_open.set(0)
        if self.link is None:
            return False
        return self.link.run(RESET_BREAKER, [f"{self.prefix}:spend:breaker"], []) is not None

    def forget_session(self, session_id):
        """Drop a closed session's in-process counter (its Redis key expires by itself)."""
        self.local.forget_session(f"{self.prefix}:spend:session:{session_id}")

    # -- the ledger: seeding the twin, rebuilding Redis ----------------------------------------

    def _snapshot(self):
        from .policies import policy_cache

        return policy_cache.get()

    def _seed_local(self):
        """Load the ledger into the local twin once per stretch of local use (sync)."""
        if self.ledger and not self._local_seeded:
            now = self.timer()
            entries = ledger_entries(
                now, self._snapshot(), self.prefix, quota_settings.budget_timezone
            )
            for cap, items in entries.items():
                self.local.replay(cap, _ms(now), items)
        self._local_seeded = True

    def _on_redis_recovery(self):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self.rebuild_from_ledger()
            return
        task = loop.create_task(self.arebuild_from_ledger())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_rebuilt(self):
        """Wait for rebuilds scheduled by a Redis recovery (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def arebuild_from_ledger(self, budget=None):
        """``rebuild_from_ledger`` off the event loop."""
        return await database_sync_to_async(self.rebuild_from_ledger)(budget)

    def _drop_settled_holds(self, holds, budget):
        # A hold read from the ledger may be settled (or released) before its replay runs:
        # the settlement's swap found no entry to take out, and the replay then put the hold
        # back, counting it until its window passes. Such holds are taken out again; taking
        # out an entry that is not there changes nothing, and a settlement still to come
        # takes out the hold itself.
        for member, caps in _settled_holds(holds) if holds else ():
            self.decide("release", caps, budget, remove=member, observe=False)

    def rebuild_from_ledger(self, budget=None):
        """Replay the ledger into every Redis counter (sync); the hour's total, or None if down.

        Idempotent: an entry Redis has already is not added again, so this is safe at
        start-up as well as after an outage.
        """
        if self.link is None:
            return None
        snapshot = self._snapshot()
        if budget is not None:
            snapshot = _replace(snapshot, budget=budget)
        now = self.timer()
        holds = {}
        entries = ledger_entries(
            now, snapshot, self.prefix, quota_settings.budget_timezone, holds=holds
        )
        hour_total = 0
        for cap, items in entries.items():
            total = 0
            for start in range(0, max(1, len(items)), REPLAY_BATCH):
                args = [_ms(now), cap.window_ms, cap.ttl_seconds]
                for score, member in items[start : start + REPLAY_BATCH]:
                    args += [score, member]
                total = self.link.run(REPLAY, [cap.key, cap.total_key], args)
                if total is None:
                    logger.warning("spend counters not rebuilt: Redis is unavailable")
                    return None
            if cap.name == HOURLY:
                hour_total = int(total)
        self._drop_settled_holds(holds, snapshot.budget)
        state = self.decide("read", self.default_caps(snapshot.budget), snapshot.budget)
        logger.warning(
            "spend counters rebuilt from the ledger: %d counters, $%s in the hour",
            len(entries),
            from_micro(hour_total),
        )
        hourly_cost_usd.set(state.hour_micro / MICRO_PER_USD)
        return state.hour_micro


def _settled_holds(holds):
    """The members of ``holds`` whose provisional row is gone or no longer provisional."""
    from .models import UsageRecord

    pending = set(
        UsageRecord.objects.filter(
            estimated=True,
            session_id__in={session_id for session_id, _, _ in holds.values()},
            response_id__in={reference for _, reference, _ in holds.values()},
        ).values_list("session_id", "response_id")
    )
    return [
        (member, caps)
        for member, (session_id, reference, caps) in holds.items()
        if (session_id, reference) not in pending
    ]


def _replace(instance, **changes):
    from dataclasses import replace

    return replace(instance, **changes)


_counters = {}
_counters_lock = threading.Lock()


def spend_counters():
    """The process-wide ``SpendCounters`` for the current Redis settings."""
    link = shared_redis()
    counters = _counters.get(id(link))
    if counters is None or counters.link is not link:
        with _counters_lock:
            counters = _counters.get(id(link))
            if counters is None or counters.link is not link:
                counters = _counters[id(link)] = SpendCounters(link)
    return counters


def reset_spend_counters():
    """Forget the process-wide counters (tests: a fresh engine for new settings)."""
    with _counters_lock:
        _counters.clear()
