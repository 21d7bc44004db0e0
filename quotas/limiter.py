"""Moving-window rate limiting: never more than ``limit`` hits in any ``window_seconds``.

Each counter keeps the times of its admitted hits. A hit at time ``t`` is admitted when,
for every enforced limit, fewer than ``limit`` hits lie in ``(t - window, t]``; it is then
recorded on every limit (enforced and shadow), so all limits of one request are decided
together. Refused hits are not recorded.

Two engines share these semantics: ``RedisWindows`` (one Lua script, so one round trip
decides all limits of a request atomically across processes) and ``LocalWindows`` (in
process, a lock and a deque per counter). ``RateLimiter`` picks Redis when configured and
up, and falls back per ``QUOTAS_FAIL_MODE`` when it is not.
"""

import hashlib
import itertools
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import redis
from redis.exceptions import NoScriptError

from .conf import quota_settings
from .redis_client import REDIS_ERRORS, shared_redis


@dataclass(frozen=True)
class Limit:
    """One counter to check: at most ``limit`` hits per ``window_seconds`` under ``key``."""

    key: str
    limit: int
    window_seconds: float
    enforce: bool = True  # False for shadow rules: counted and reported, never refusing
    label: str = ""  # what the operator calls it (rule name); not part of the counter key


# LimitState and Decision are built on every request: plain slotted dataclasses construct
# several times faster than frozen ones. Treat them as read-only all the same.
@dataclass(slots=True)
class LimitState:
    """The outcome for one limit: hits in the window now and when a slot frees."""

    limit: Limit
    hits: int  # hits in the window, including this one when it was admitted
    reset_seconds: float  # until the window has room for one more hit
    admitted: bool  # whether the hit was recorded (on every limit of the decision)

    @property
    def remaining(self):
        return max(0, self.limit.limit - self.hits)

    @property
    def over(self):
        """True when this limit alone refuses the hit (for a shadow limit: would refuse)."""
        return self.hits > self.limit.limit if self.admitted else self.hits >= self.limit.limit


@dataclass(slots=True)
class Decision:
    """Whether a hit is admitted, with every limit's state and which engine decided."""

    allowed: bool
    states: tuple
    engine: str  # "redis" | "local" | "open" | "closed"

    @property
    def tightest(self):
        """The enforced state with the fewest hits left (ties: resets last); None if none."""
        enforced = [s for s in self.states if s.limit.enforce]
        if not enforced:
            return None
        return min(enforced, key=lambda s: (s.remaining, -s.reset_seconds))

    @property
    def refusing(self):
        """The enforced limits that refused this hit."""
        return tuple(s for s in self.states if s.over and s.limit.enforce)

    @property
    def shadow_over(self):
        """Shadow limits that would have refused this hit."""
        return tuple(s for s in self.states if s.over and not s.limit.enforce)

    @property
    def retry_after(self):
        """Seconds until the refused hit could be admitted (0 when allowed)."""
        refusing = self.refusing
        return max((s.reset_seconds for s in refusing), default=0.0)


def _state(limit, hits, reset_seconds, admitted):
    return LimitState(
        limit=limit, hits=hits, reset_seconds=max(0.0, reset_seconds), admitted=admitted
    )


class LocalWindows:
    """In-process moving windows: a deque of hit times per counter, under one lock."""

    engine = "local"
    SWEEP_EVERY = 4096

    def __init__(self, timer=time.time):
        self.timer = timer
        self._hits = {}
        self._windows = {}
        self._lock = threading.Lock()
        self._calls = 0

    def hit(self, limits, now=None):
        now = self.timer() if now is None else now
        with self._lock:
            self._calls += 1
            if self._calls % self.SWEEP_EVERY == 0:
                self._sweep(now)
            queues = []
            admitted = True
            for limit in limits:
                queue = self._hits.get(limit.key)
                if queue is None:
                    queue = self._hits[limit.key] = deque()
                self._windows[limit.key] = max(
                    self._windows.get(limit.key, 0), limit.window_seconds
                )
                floor = now - limit.window_seconds
                while queue and queue[0] <= floor:
                    queue.popleft()
                queues.append(queue)
                if limit.enforce and len(queue) >= limit.limit:
                    admitted = False
            states = []
            for limit, queue in zip(limits, queues, strict=True):
                if admitted:
                    queue.append(now)
                states.append(_state(limit, len(queue), self._reset(queue, limit, now), admitted))
        return Decision(allowed=admitted, states=tuple(states), engine=self.engine)

    @staticmethod
    def _reset(queue, limit, now):
        # Time until the window has room again: when the hit that must expire expires.
        count = len(queue)
        if count == 0:
            return 0.0
        index = max(0, count - limit.limit)
        return queue[index] + limit.window_seconds - now

    def _sweep(self, now):
        for key in [
            k for k, q in self._hits.items() if not q or q[-1] <= now - self._windows.get(k, 0)
        ]:
            self._hits.pop(key, None)
            self._windows.pop(key, None)

    def clear(self):
        with self._lock:
            self._hits.clear()
            self._windows.clear()


# KEYS: counter keys. ARGV[1]: now (ms), ARGV[2]: unique member for this hit, then five
# per key: limit, window (ms), time to live (whole ms), enforce (1/0), and the window's
# floor (now - window, ms): hits at or before it have left the window.
# Returns "admitted hits_1 reset_us_1 hits_2 reset_us_2 ..." (integers, space-separated;
# reset -1: not computed, see RedisWindows).
# Why this shape: every Lua number passed to redis.call is formatted with %.17g and parsed
# again, which costs more than the command itself, so times travel as the client's strings;
# and one bulk string is far cheaper for redis-py's pure-Python parser than an array.
MOVING_WINDOW_LUA = """
local counts, limits = {}, {}
local admitted = 1
for i = 1, #KEYS do
  local base = (i - 1) * 5 + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[base + 5])
  local count = redis.call('ZCARD', KEYS[i])
  local limit = tonumber(ARGV[base + 1])
  counts[i], limits[i] = count, limit
  if ARGV[base + 4] == '1' and count >= limit then admitted = 0 end
end
-- Only the limits that shape the answer need their reset time: those at or over their
-- limit, and the enforced ones with the fewest hits left (the RateLimit-* headers).
local least = math.huge
for i = 1, #KEYS do
  if ARGV[(i - 1) * 5 + 6] == '1' then
    local left = limits[i] - counts[i] - admitted
    if left < least then least = left end
  end
end
local now = tonumber(ARGV[1])
local result = {admitted}
for i = 1, #KEYS do
  local base = (i - 1) * 5 + 2
  local count, limit = counts[i], limits[i]
  if admitted == 1 then
    redis.call('ZADD', KEYS[i], ARGV[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[i], ARGV[base + 3])
    count = count + 1
  end
  local reset = -1
  if count > 0 and (count >= limit or (ARGV[base + 4] == '1' and limit - count == least)) then
    -- The hit that must leave the window before another fits: the oldest while there
    -- is room, else the one 'limit' places before the newest.
    local index = count - limit
    local entry
    if index > 0 then
      entry = redis.call('ZRANGE', KEYS[i], index, index, 'WITHSCORES')
    else
      entry = redis.call('ZRANGE', KEYS[i], '0', '0', 'WITHSCORES')
    end
    reset = 0
    if entry[2] then
      reset = math.ceil((tonumber(entry[2]) + tonumber(ARGV[base + 2]) - now) * 1000)
    end
  elseif count == 0 then
    reset = 0
  end
  result[#result + 1] = count
  result[#result + 1] = reset
end
return table.concat(result, ' ')
"""
MOVING_WINDOW_SHA = hashlib.sha1(MOVING_WINDOW_LUA.encode()).hexdigest()
_ARGS_PER_LIMIT = 5

_member_counter = itertools.count()
_member_prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"


def _bulk(data):
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


class RedisWindows:
    """Moving windows in Redis sorted sets; one EVALSHA decides all limits of a hit.

    ``reset_seconds`` is exact for the limits that shape the answer (those at or over their
    limit, and the enforced ones with the fewest hits left); for the others it is the
    window length, an upper bound.

    The sync path writes the command's RESP bytes itself (the script head and each rule's
    arguments are encoded once and cached) and sends them on a connection of its own per
    thread, so a decision costs little more than a PING. The async path uses the asyncio
    client's ``execute_command``, which handles task cancellation mid-reply.
    """

    engine = "redis"

    def __init__(self, link, prefix=None, timer=time.time):
        self.link = link
        self.prefix = prefix if prefix is not None else quota_settings.KEY_PREFIX
        self.timer = timer
        self._key_prefix = f"{self.prefix}:rl:"
        self._heads = {}  # number of limits -> packed "EVALSHA sha n"
        self._specs = {}  # (limit, window, enforce) -> packed limit, window, ttl, enforce
        self._local = threading.local()

    @staticmethod
    def _spec_values(limit):
        window_ms = limit.window_seconds * 1000.0
        return (
            b"%d" % limit.limit,
            repr(window_ms).encode(),
            b"%d" % math.ceil(window_ms),
            b"1" if limit.enforce else b"0",
        )

    def _spec(self, limit):
        spec_key = (limit.limit, limit.window_seconds, limit.enforce)
        spec = self._specs.get(spec_key)
        if spec is None:
            spec = self._specs[spec_key] = b"".join(map(_bulk, self._spec_values(limit)))
        return spec

    def pack(self, limits, now):
        """The RESP-encoded EVALSHA command deciding one hit on ``limits`` at ``now``."""
        count = len(limits)
        head = self._heads.get(count)
        if head is None:
            head = self._heads[count] = (
                b"*%d\r\n" % (5 + (1 + _ARGS_PER_LIMIT) * count)
                + _bulk(b"EVALSHA")
                + _bulk(MOVING_WINDOW_SHA.encode())
                + _bulk(b"%d" % count)
            )
        prefix = self._key_prefix
        parts = [head]
        parts += [_bulk(f"{prefix}{limit.key}".encode()) for limit in limits]
        now_ms = now * 1000.0
        parts.append(_bulk(repr(now_ms).encode()))
        parts.append(_bulk(f"{_member_prefix}{next(_member_counter)}".encode()))
        floors = {}
        for limit in limits:
            parts.append(self._spec(limit))
            window = limit.window_seconds
            floor = floors.get(window)
            if floor is None:
                floor = floors[window] = _bulk(repr(now_ms - window * 1000.0).encode())
            parts.append(floor)
        return b"".join(parts)

    def arguments(self, limits, now):
        """Keys and ARGV of the script for one hit (for clients that pack commands)."""
        keys = [f"{self._key_prefix}{limit.key}" for limit in limits]
        now_ms = now * 1000.0
        args = [repr(now_ms).encode(), f"{_member_prefix}{next(_member_counter)}".encode()]
        for limit in limits:
            args += self._spec_values(limit)
            args.append(repr(now_ms - limit.window_seconds * 1000.0).encode())
        return keys, args

    @staticmethod
    def _decision(limits, reply):
        fields = reply.split()
        admitted = fields[0] == b"1"
        states = []
        for i, limit in enumerate(limits):
            reset = int(fields[2 + 2 * i])
            # -1: a limit that neither refuses nor has the fewest hits left; its slot frees
            # within one window, and no caller looks closer (saves a Redis call per limit).
            reset = limit.window_seconds if reset < 0 else reset / 1e6
            states.append(LimitState(limit, int(fields[1 + 2 * i]), reset, admitted))
        return Decision(admitted, tuple(states), "redis")

    def _connection(self):
        # One connection per thread, made with the pool's class and options (TLS, AUTH,
        # timeouts): checking a connection out of the pool and back costs more than the
        # script itself. Only this thread uses it, and a failed call disconnects it, so it
        # never holds an unread reply; the next call reconnects.
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():
            pool = self.link.client.connection_pool
            connection = local.connection = pool.connection_class(**pool.connection_kwargs)
            local.pid = os.getpid()
        return connection

    def _execute(self, packed):
        connection = self._connection()
        connection.send_packed_command([packed], check_health=False)
        return connection.read_response()

    def close(self):
        """Close this thread's connection (others close when their thread ends)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()

    def hit(self, limits, now=None):
        """Decide synchronously; raises a Redis error when Redis does not answer."""
        now = self.timer() if now is None else now
        packed = self.pack(limits, now)
        try:
            reply = self._execute(packed)
        except NoScriptError:
            self.link.client.script_load(MOVING_WINDOW_LUA)
            reply = self._execute(packed)
        except redis.exceptions.ConnectionError:
            # A connection that Redis closed (restart, idle timeout) fails once; a fresh one
            # tells whether Redis is really gone (refused connects fail fast). Should the
            # first reply have been lost after the script ran, the hit counts twice: the
            # safe direction.
            reply = self._execute(packed)
        return self._decision(limits, reply)

    async def ahit(self, limits, now=None):
        """Decide on the running event loop; raises a Redis error when Redis does not answer."""
        now = self.timer() if now is None else now
        client = self.link.async_client
        keys, args = self.arguments(limits, now)
        try:
            reply = await client.execute_command(
                "EVALSHA", MOVING_WINDOW_SHA, len(keys), *keys, *args
            )
        except NoScriptError:
            await client.script_load(MOVING_WINDOW_LUA)
            reply = await client.execute_command(
                "EVALSHA", MOVING_WINDOW_SHA, len(keys), *keys, *args
            )
        return self._decision(limits, reply)


class RateLimiter:
    """Decides hits on Redis when configured and up, otherwise per ``QUOTAS_FAIL_MODE``."""

    def __init__(self, link=None, fail_mode=None, timer=time.time, local=None):
        self.link = link
        self._fail_mode = fail_mode
        self.timer = timer
        self.local = local or LocalWindows(timer=timer)
        self.redis = RedisWindows(link, timer=timer) if link is not None else None

    @property
    def fail_mode(self):
        return self._fail_mode or quota_settings.FAIL_MODE

    def _fallback(self, limits, now):
        mode = self.fail_mode
        if mode == "open":
            states = tuple(_state(lim, 0, 0.0, True) for lim in limits)
            return Decision(allowed=True, states=states, engine="open")
        if mode == "closed":
            retry = float(self.link.retry_seconds) if self.link else 1.0
            states = tuple(_state(lim, lim.limit, retry, False) for lim in limits)
            return Decision(allowed=False, states=states, engine="closed")
        return self.local.hit(limits, now)

    def hit(self, limits, now=None):
        """Admit or refuse one hit on all ``limits`` together."""
        now = self.timer() if now is None else now
        if not limits:
            return Decision(allowed=True, states=(), engine="none")
        if self.redis is not None and self.link.available:
            try:
                decision = self.redis.hit(limits, now)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
            else:
                self.link.mark_up()
                return decision
        if self.redis is None:
            return self.local.hit(limits, now)
        return self._fallback(limits, now)

    async def ahit(self, limits, now=None):
        """``hit()`` for async callers: the Redis call does not block the event loop."""
        now = self.timer() if now is None else now
        if not limits:
            return Decision(allowed=True, states=(), engine="none")
        if self.redis is not None and self.link.available:
            try:
                decision = await self.redis.ahit(limits, now)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
            else:
                self.link.mark_up()
                return decision
        if self.redis is None:
            return self.local.hit(limits, now)
        return self._fallback(limits, now)


_limiter = None
_limiter_lock = threading.Lock()


def reset_limiter():
    """Forget the process-wide limiter (the next ``get_limiter()`` builds a new one)."""
    global _limiter
    with _limiter_lock:
        _limiter = None


def get_limiter():
    """The process-wide limiter for the current settings (rebuilt if the Redis URL changes)."""
    global _limiter
    link = shared_redis()
    limiter = _limiter
    if limiter is None or limiter.link is not link:
        with _limiter_lock:
            if _limiter is None or _limiter.link is not link:
                _limiter = RateLimiter(link=link)
            limiter = _limiter
    return limiter


def ceil_seconds(value):
    """Whole seconds for headers: a partial second rounds up, never to 0 when waiting."""
    return max(0, math.ceil(value - 1e-9))
