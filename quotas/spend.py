"""Shared spend counters: each session's total, the rolling-hour total and the circuit breaker.

Amounts are integer micro-USD. One charge is one Redis round trip (a Lua script) that forgets
spend older than the window, adds the amount to the session and to the rolling hour, evaluates
the breaker and returns the totals, so decisions are race-free across instances.

Rolling hour: a sorted set of entries ``"<micro>:<entry id>"`` scored by their time (ms) plus a
running total. Each script first removes the entries at or before ``now - 3600 s`` and
subtracts them from the total (every entry is added once and removed once: amortised O(1)),
so the total is exactly the spend in ``(now - 3600 s, now]``. The entry id is the ledger row's
id, which makes a charge idempotent and lets ``rebuild_from_ledger`` replay the ledger into
Redis after an outage without counting anything twice.

Breaker state machine (one shared hash; absent means closed):
- closed    -> open       a charge leaves the rolling hour >= ``breaker_threshold_usd``
                          (``until = now + breaker_cooldown_seconds``; ``tripped`` is reported
                          once, to the charger, who broadcasts it on ``quotas.breaker``)
- open      -> half_open  at the first evaluation at or after ``until`` (charges while open
                          are counted but do not extend the cool-down)
- half_open -> open       a charge leaves the rolling hour >= the threshold (new cool-down)
- half_open -> closed     an evaluation finds the rolling hour below the threshold
- any       -> closed     ``reset_breaker()`` (admin action); a later charge while the hour is
                          still over the threshold opens it again.
New sessions are admitted while closed or half_open (and the rolling hour is under the hourly
cap); an open breaker ends every running session.

Redis not configured, or down: the same semantics in process (``LocalSpend``), seeded from the
ledger when this process starts using it. Charges are always counted (money is never
ignored); ``QUOTAS_FAIL_MODE`` only decides admission while Redis is down: ``local`` uses the
in-process twin, ``open`` admits, ``closed`` refuses (reason ``breaker``). When Redis comes
back (``SharedRedis.on_recovery``), the ledger's last hour and open sessions are replayed into
Redis; the database is the source of truth for money.
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

from .conf import quota_settings
from .metrics import circuit_breaker_open, hourly_cost_usd
from .notifications import spend_notifier
from .pricing import MICRO_PER_USD, from_micro, timestamp_to_datetime, to_micro
from .redis_client import REDIS_ERRORS, shared_redis

logger = logging.getLogger("quotas.spend")

WINDOW_SECONDS = 3600
BREAKER_GROUP = "quotas.breaker"
BREAKER_EVENT = "quotas.breaker_open"
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
REBUILD_BATCH = 1000

_SPEND_COMMON_LUA = """
local function forget_expired(total_key, entries_key, floor)
  local total = tonumber(redis.call('GET', total_key) or '0')
  local expired = redis.call('ZRANGEBYSCORE', entries_key, '-inf', floor)
  if #expired > 0 then
    for _, m in ipairs(expired) do total = total - tonumber(string.match(m, '^(%d+):')) end
    redis.call('ZREMRANGEBYSCORE', entries_key, '-inf', floor)
  end
  return total
end

local function settle(total_key, entries_key, breaker_key, total, now, threshold, cooldown,
                      may_trip)
  if redis.call('ZCARD', entries_key) == 0 then total = 0 end
  redis.call('SET', total_key, total)
  local state = redis.call('HGET', breaker_key, 'state') or 'closed'
  local before = state
  local until_ms = tonumber(redis.call('HGET', breaker_key, 'until') or '0')
  local tripped = 0
  if state == 'open' and now >= until_ms then
    state = 'half_open'
    redis.call('HSET', breaker_key, 'state', state)
  end
  if may_trip and state ~= 'open' and total >= threshold then
    state = 'open'
    until_ms = now + cooldown
    tripped = 1
    redis.call('HSET', breaker_key, 'state', state, 'until', until_ms, 'opened_at', now)
  end
  if state == 'half_open' and total < threshold then
    state = 'closed'
    redis.call('DEL', breaker_key)
  end
  return total, state, tripped, until_ms, before
end
"""

# KEYS: session total, hour total, hour entries, breaker.
# ARGV: now_ms, amount, member, window_ms, threshold, cooldown_ms, session_ttl, mode, hourly_cap.
# mode: "charge" adds the amount; "read" only evaluates; "admit" also computes how long until
# the rolling hour is back under the hourly cap.
# Returns {session, hour, state, tripped, until_ms, added, hourly_retry_ms, state_before}.
CHARGE_LUA = (
    _SPEND_COMMON_LUA
    + """
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local window = tonumber(ARGV[4])
local mode = ARGV[8]
local hourly_cap = tonumber(ARGV[9])
local total = forget_expired(KEYS[2], KEYS[3], now - window)
local added = 0
if mode == 'charge' and amount > 0 then
  if redis.call('ZADD', KEYS[3], 'NX', now, ARGV[3]) == 1 then
    added = 1
    total = total + amount
    redis.call('INCRBY', KEYS[1], amount)
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
  end
end
local state, tripped, until_ms, before
total, state, tripped, until_ms, before = settle(KEYS[2], KEYS[3], KEYS[4], total, now,
  tonumber(ARGV[5]), tonumber(ARGV[6]), added == 1)
local retry = 0
if mode == 'admit' and total >= hourly_cap then
  local need = total - hourly_cap
  local gone = 0
  local start = 0
  while retry == 0 do
    local batch = redis.call('ZRANGE', KEYS[3], start, start + 127, 'WITHSCORES')
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      gone = gone + tonumber(string.match(batch[i], '^(%d+):'))
      if gone > need then
        retry = tonumber(batch[i + 1]) + window - now
        break
      end
    end
    start = start + 128
  end
end
local session = tonumber(redis.call('GET', KEYS[1]) or '0')
return {session, total, state, tripped, until_ms, added, retry, before}
"""
)

# KEYS: hour total, hour entries, breaker, then one key per open session.
# ARGV: now_ms, window_ms, threshold, cooldown_ms, session_ttl, entry count, then per entry
# (score_ms, member, session index or 0), then per session key its ledger total.
# Replays ledger entries missing from Redis (exactly once, by member) and raises each open
# session's total to at least its ledger total.
REBUILD_LUA = (
    _SPEND_COMMON_LUA
    + """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local ttl = tonumber(ARGV[5])
local count = tonumber(ARGV[6])
local floor = now - window
local total = forget_expired(KEYS[1], KEYS[2], floor)
for i = 0, count - 1 do
  local base = 7 + i * 3
  local score = tonumber(ARGV[base])
  local member = ARGV[base + 1]
  local index = tonumber(ARGV[base + 2])
  if score > floor and redis.call('ZADD', KEYS[2], 'NX', score, member) == 1 then
    local amount = tonumber(string.match(member, '^(%d+):'))
    total = total + amount
    if index > 0 then
      redis.call('INCRBY', KEYS[3 + index], amount)
      redis.call('EXPIRE', KEYS[3 + index], ttl)
    end
  end
end
local offset = 7 + count * 3
for j = 4, #KEYS do
  local ledger = tonumber(ARGV[offset + j - 4])
  local current = tonumber(redis.call('GET', KEYS[j]) or '0')
  if current < ledger then redis.call('SET', KEYS[j], ledger) end
  redis.call('EXPIRE', KEYS[j], ttl)
end
local state, tripped, until_ms
total, state, tripped, until_ms = settle(KEYS[1], KEYS[2], KEYS[3], total, now,
  tonumber(ARGV[3]), tonumber(ARGV[4]), true)
return {total, state, tripped, until_ms}
"""
)


@dataclass(frozen=True)
class SpendState:
    """Totals and breaker state after one evaluation (amounts in micro-USD)."""

    session_micro: int
    hour_micro: int
    breaker: str
    tripped: bool  # this evaluation opened the breaker
    breaker_until: float  # POSIX seconds when an open breaker turns half-open
    added: bool  # the charge was counted (False: replayed entry, or not a charge)
    hourly_retry_seconds: float  # admission only: until the hour is back under the cap
    engine: str  # "redis" | "local"
    breaker_before: str = ""  # the breaker state before this evaluation (transitions)

    @property
    def session_usd(self):
        return from_micro(self.session_micro)

    @property
    def hour_usd(self):
        return from_micro(self.hour_micro)

    @property
    def breaker_open(self):
        return self.breaker == OPEN

    def session_over(self, budget):
        """True when the session has spent its cap."""
        return self.session_micro >= to_micro(budget.session_cap_usd)

    def hour_over(self, budget):
        """True when the rolling hour has reached the hourly cap."""
        return self.hour_micro >= to_micro(budget.hourly_cap_usd)

    def breaker_retry_seconds(self, now):
        return max(0, math.ceil(self.breaker_until - now)) if self.breaker_open else 0


@dataclass(frozen=True)
class Admission:
    """Whether a new session may start; ``reason`` is ``hourly_cap`` or ``breaker`` when not."""

    allowed: bool
    reason: str | None = None
    retry_after: int = 0
    message: str = ""
    state: SpendState | None = None

    def event(self):
        """The ``quota.exceeded`` event for a refusal."""
        return {
            "type": "quota.exceeded",
            "reason": self.reason,
            "message": self.message,
            "retry_after": self.retry_after,
        }


HOURLY_CAP_MESSAGE = (
    "DUCK-E has reached its spending limit for this hour. Please try again in {minutes} min."
)
BREAKER_MESSAGE = (
    "DUCK-E is paused because spending rose unusually fast. Please try again in {minutes} min."
)


def minutes_until(seconds):
    """Whole minutes (at least 1) for a wait of ``seconds``, for messages."""
    return max(1, math.ceil(seconds / 60))


def _limits(budget):
    return (
        to_micro(budget.breaker_threshold_usd),
        int(budget.breaker_cooldown_seconds) * 1000,
        to_micro(budget.hourly_cap_usd),
        int(budget.session_max_seconds) + 2 * WINDOW_SECONDS,
    )


def _ms(timestamp):
    return round(timestamp * 1000)


class LocalSpend:
    """The in-process twin of the Redis counters (same semantics, one lock)."""

    engine = "local"

    def __init__(self):
        self._lock = threading.Lock()
        self.sessions = {}
        self._entries = []  # heap of (score_ms, member, micro)
        self._members = set()
        self.hour_micro = 0
        self.breaker = CLOSED
        self.until_ms = 0

    def _forget_expired(self, floor):
        entries = self._entries
        while entries and entries[0][0] <= floor:
            _, member, micro = heapq.heappop(entries)
            self._members.discard(member)
            self.hour_micro -= micro

    def _settle(self, now, threshold, cooldown, may_trip):
        if not self._entries:
            self.hour_micro = 0
        tripped = False
        if self.breaker == OPEN and now >= self.until_ms:
            self.breaker = HALF_OPEN
        if may_trip and self.breaker != OPEN and self.hour_micro >= threshold:
            self.breaker, self.until_ms, tripped = OPEN, now + cooldown, True
        if self.breaker == HALF_OPEN and self.hour_micro < threshold:
            self.breaker, self.until_ms = CLOSED, 0
        return tripped

    def _add(self, score, member, micro, session_id):
        if member in self._members:
            return False
        heapq.heappush(self._entries, (score, member, micro))
        self._members.add(member)
        self.hour_micro += micro
        if session_id is not None:
            self.sessions[session_id] = self.sessions.get(session_id, 0) + micro
        return True

    def evaluate(self, now, session_id, amount, member, budget, mode):
        """Mirror of ``CHARGE_LUA``."""
        threshold, cooldown, hourly_cap, _ = _limits(budget)
        with self._lock:
            before = self.breaker
            self._forget_expired(now - WINDOW_SECONDS * 1000)
            added = False
            if mode == "charge" and amount > 0:
                added = self._add(now, member, amount, session_id)
            tripped = self._settle(now, threshold, cooldown, added)
            retry = 0
            if mode == "admit" and self.hour_micro >= hourly_cap:
                need, gone = self.hour_micro - hourly_cap, 0
                for score, _, micro in sorted(self._entries):
                    gone += micro
                    if gone > need:
                        retry = score + WINDOW_SECONDS * 1000 - now
                        break
            return SpendState(
                session_micro=self.sessions.get(session_id, 0),
                hour_micro=self.hour_micro,
                breaker=self.breaker,
                tripped=tripped,
                breaker_until=self.until_ms / 1000.0,
                added=added,
                hourly_retry_seconds=retry / 1000.0,
                engine=self.engine,
                breaker_before=before,
            )

    def load(self, now, entries, sessions, budget):
        """Replay ledger ``entries`` (score_ms, member, micro, session_id) and session totals."""
        threshold, cooldown, _, _ = _limits(budget)
        with self._lock:
            self._forget_expired(now - WINDOW_SECONDS * 1000)
            for score, member, micro, session_id in entries:
                if score > now - WINDOW_SECONDS * 1000:
                    self._add(score, member, micro, session_id)
            for session_id, micro in sessions.items():
                if self.sessions.get(session_id, 0) < micro:
                    self.sessions[session_id] = micro
            self._settle(now, threshold, cooldown, True)

    def reset_breaker(self):
        with self._lock:
            self.breaker, self.until_ms = CLOSED, 0

    def forget_session(self, session_id):
        with self._lock:
            self.sessions.pop(session_id, None)


def ledger_snapshot(now, budget):
    """The ledger's spend in the last hour and its open sessions' totals (sync)."""
    from django.db.models import Q

    from .models import QuotaSession, UsageRecord

    since = timestamp_to_datetime(now - WINDOW_SECONDS)
    horizon = max(int(budget.session_max_seconds), WINDOW_SECONDS) + 60
    open_sessions = {
        str(pk): to_micro(cost)
        for pk, cost in QuotaSession.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=since),
            started_at__gt=timestamp_to_datetime(now) - timedelta(seconds=horizon),
        ).values_list("id", "cost_usd")
    }
    entries = [
        (_ms(created_at.timestamp()), entry_member(to_micro(cost), pk), to_micro(cost), str(sid))
        for pk, created_at, cost, sid in UsageRecord.objects.filter(created_at__gt=since)
        .order_by("created_at")
        .values_list("pk", "created_at", "cost_usd", "session_id")
    ]
    return entries, open_sessions


def entry_member(micro, entry_id):
    """The rolling-hour entry of one charge: its amount and a unique id (the ledger row)."""
    return f"{int(micro)}:{entry_id}"


class SpendCounters:
    """Charges, admission checks and the breaker, on Redis when up, else in process."""

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

    # -- keys and scripts ------------------------------------------------------------------

    @property
    def prefix(self):
        return self._prefix or quota_settings.KEY_PREFIX

    @property
    def fail_mode(self):
        return self._fail_mode or quota_settings.FAIL_MODE

    def _keys(self, session_id):
        base = f"{self.prefix}:spend"
        return [
            f"{base}:session:{session_id or '-'}",
            f"{base}:hour",
            f"{base}:hour:entries",
            f"{base}:breaker",
        ]

    def _script(self, client, source):
        key = (id(client), source is REBUILD_LUA)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(source)
        return script

    def _charge_args(self, now, session_id, amount, member, budget, mode):
        threshold, cooldown, hourly_cap, ttl = _limits(budget)
        keys = self._keys(session_id)
        args = [now, amount, member, WINDOW_SECONDS * 1000, threshold, cooldown, ttl, mode]
        return keys, [*args, hourly_cap]

    @staticmethod
    def _state(reply):
        session, hour, state, tripped, until_ms, added, retry, before = reply
        state = state.decode() if isinstance(state, bytes) else state
        before = before.decode() if isinstance(before, bytes) else before
        return SpendState(
            session_micro=int(session),
            hour_micro=int(hour),
            breaker=state,
            tripped=bool(int(tripped)),
            breaker_until=int(until_ms) / 1000.0,
            added=bool(int(added)),
            hourly_retry_seconds=int(retry) / 1000.0,
            engine="redis",
            breaker_before=before,
        )

    def _use_redis(self):
        return self.link is not None and self.link.available

    def _observe(self, state, budget, now_ms, mode):
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
            state, budget, now_ms / 1000.0, charged=mode == "charge" and state.added
        )
        return state

    # -- the local twin -----------------------------------------------------------------------

    def _seed_local(self, budget):
        """Load the ledger into the local twin once per stretch of local use (sync)."""
        if self.ledger and not self._local_seeded:
            now = self.timer()
            entries, sessions = ledger_snapshot(now, budget)
            self.local.load(_ms(now), entries, sessions, budget)
        self._local_seeded = True

    def _local(self, now, session_id, amount, member, budget, mode):
        return self.local.evaluate(now, session_id, amount, member, budget, mode)

    # -- evaluate: charge, read, admit ----------------------------------------------------------

    def evaluate(self, session_id, amount_micro, budget, *, member=None, at=None, mode="charge"):
        """One charge (or read) synchronously; returns the totals and breaker state."""
        now = _ms(self.timer() if at is None else at)
        member = member or entry_member(amount_micro, uuid.uuid4().hex)
        if self._use_redis():
            keys, args = self._charge_args(now, session_id, amount_micro, member, budget, mode)
            try:
                reply = self._script(self.link.client, CHARGE_LUA)(keys=keys, args=args)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
            else:
                self._local_seeded = False
                self.link.mark_up()
                return self._observe(self._state(reply), budget, now, mode)
        self._seed_local(budget)
        state = self._local(now, session_id, amount_micro, member, budget, mode)
        return self._observe(state, budget, now, mode)

    async def aevaluate(
        self, session_id, amount_micro, budget, *, member=None, at=None, mode="charge"
    ):
        """``evaluate()`` for async callers: the Redis call does not block the event loop."""
        now = _ms(self.timer() if at is None else at)
        member = member or entry_member(amount_micro, uuid.uuid4().hex)
        if self._use_redis():
            keys, args = self._charge_args(now, session_id, amount_micro, member, budget, mode)
            try:
                client = self.link.async_client
                reply = await self._script(client, CHARGE_LUA)(keys=keys, args=args)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
            else:
                self._local_seeded = False
                self.link.mark_up()
                return self._observe(self._state(reply), budget, now, mode)
        if self.ledger and not self._local_seeded:
            await database_sync_to_async(self._seed_local)(budget)
        state = self._local(now, session_id, amount_micro, member, budget, mode)
        return self._observe(state, budget, now, mode)

    def charge(self, session_id, amount_micro, budget, *, member=None, at=None):
        """Add ``amount_micro`` to the session and the rolling hour (sync)."""
        return self.evaluate(session_id, amount_micro, budget, member=member, at=at)

    async def acharge(self, session_id, amount_micro, budget, *, member=None, at=None):
        """Add ``amount_micro`` to the session and the rolling hour."""
        return await self.aevaluate(session_id, amount_micro, budget, member=member, at=at)

    def read(self, budget, session_id=None):
        """Totals and breaker state without charging (sync)."""
        return self.evaluate(session_id, 0, budget, mode="read")

    def _admission(self, state, budget, fallback):
        now = self.timer()
        if fallback == "open":
            return Admission(True, state=state)
        if fallback == "closed":
            retry = max(1, math.ceil(self.link.retry_seconds))
            message = BREAKER_MESSAGE.format(minutes=minutes_until(retry))
            return Admission(False, "breaker", retry, message, state)
        if state.breaker_open:
            retry = max(1, state.breaker_retry_seconds(now))
            message = BREAKER_MESSAGE.format(minutes=minutes_until(retry))
            return Admission(False, "breaker", retry, message, state)
        if state.hour_over(budget):
            retry = max(1, math.ceil(state.hourly_retry_seconds))
            message = HOURLY_CAP_MESSAGE.format(minutes=minutes_until(retry))
            return Admission(False, "hourly_cap", retry, message, state)
        return Admission(True, state=state)

    def _fallback_mode(self):
        if self.link is None or self._use_redis():
            return "local"
        return self.fail_mode

    def admit(self, budget):
        """May a new session start? (sync)"""
        state = self.evaluate(None, 0, budget, mode="admit")
        fallback = self._fallback_mode() if state.engine == "local" else "local"
        return self._admission(state, budget, fallback)

    async def aadmit(self, budget):
        """May a new session start? ``hourly_cap`` / ``breaker`` refusals carry retry_after."""
        state = await self.aevaluate(None, 0, budget, mode="admit")
        fallback = self._fallback_mode() if state.engine == "local" else "local"
        return self._admission(state, budget, fallback)

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
        try:
            self.link.client.delete(self._keys(None)[3])
        except REDIS_ERRORS as exc:
            self.link.mark_down(exc)
            return False
        self.link.mark_up()
        return True

    def forget_session(self, session_id):
        """Drop a closed session's in-process total (its Redis key expires by itself)."""
        self.local.forget_session(session_id)

    # -- recovery -------------------------------------------------------------------------------

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

    def rebuild_from_ledger(self, budget=None):
        """Replay the ledger's last hour and open sessions into Redis (sync); None if down."""
        if self.link is None:
            return None
        if budget is None:
            from .policies import policy_cache

            budget = policy_cache.get().budget
        now = self.timer()
        entries, sessions = ledger_snapshot(now, budget)
        threshold, cooldown, _, ttl = _limits(budget)
        base = self._keys(None)[1:]
        session_ids = list(sessions)
        index = {sid: i + 1 for i, sid in enumerate(session_ids)}
        session_keys = [self._keys(sid)[0] for sid in session_ids]
        try:
            script = self._script(self.link.client, REBUILD_LUA)
            step = REBUILD_BATCH
            batches = [entries[i : i + step] for i in range(0, len(entries), step)]
            reply = None
            for number, batch in enumerate(batches or [[]]):
                last = number == max(0, len(batches) - 1)
                # Session keys ride along with every batch so their INCRBYs have a key index;
                # the ledger floor (max with the ledger total) applies with the last batch.
                args = [_ms(now), WINDOW_SECONDS * 1000, threshold, cooldown, ttl, len(batch)]
                for score, member, _micro, sid in batch:
                    args += [score, member, index.get(sid, 0)]
                args += [sessions[sid] if last else 0 for sid in session_ids]
                reply = script(keys=[*base, *session_keys], args=args)
        except REDIS_ERRORS as exc:
            self.link.mark_down(exc)
            logger.warning("spend counters not rebuilt: Redis failed (%s)", exc.__class__.__name__)
            return None
        total, state, _tripped, _until = reply
        logger.warning(
            "spend counters rebuilt from the ledger: %d entries, %d open sessions, $%s in the hour",
            len(entries),
            len(sessions),
            from_micro(int(total)),
        )
        hourly_cost_usd.set(int(total) / MICRO_PER_USD)
        state = state.decode() if isinstance(state, bytes) else state
        circuit_breaker_open.set(1 if state == OPEN else 0)
        return int(total)


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


async def broadcast_breaker_open(state, now):
    """Tell every instance's sessions (group ``quotas.breaker``) that the breaker opened."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return False
    retry = state.breaker_retry_seconds(now)
    message = {
        "type": BREAKER_EVENT,
        "hourly_cost_usd": str(state.hour_usd),
        "retry_after": retry,
        "message": BREAKER_MESSAGE.format(minutes=minutes_until(retry)),
    }
    try:
        await layer.group_send(BREAKER_GROUP, message)
    except Exception:  # a channel layer outage must not break the charge that tripped it
        logger.exception("could not broadcast the breaker opening")
        return False
    return True
