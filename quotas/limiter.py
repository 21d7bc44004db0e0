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

import itertools
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Decision:
    """Whether a hit is admitted, with every limit's state and which engine decided."""

    allowed: bool
    states: tuple
    engine: str  # "redis" | "local" | "open" | "closed"

    @property
    def tightest(self):
        """The state with the fewest hits remaining (ties: the one that resets last)."""
        if not self.states:
            return None
        return min(self.states, key=lambda s: (s.remaining, -s.reset_seconds))

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
    return LimitState(limit=limit, hits=hits, reset_seconds=max(0.0, reset_seconds), admitted=admitted)


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
                self._windows[limit.key] = max(self._windows.get(limit.key, 0), limit.window_seconds)
                floor = now - limit.window_seconds
                while queue and queue[0] <= floor:
                    queue.popleft()
                queues.append(queue)
                if limit.enforce and len(queue) >= limit.limit:
                    admitted = False
            states = []
            for limit, queue in zip(limits, queues):
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
        for key in [k for k, q in self._hits.items() if not q or q[-1] <= now - self._windows.get(k, 0)]:
            self._hits.pop(key, None)
            self._windows.pop(key, None)

    def clear(self):
        with self._lock:
            self._hits.clear()
            self._windows.clear()


# KEYS: counter keys. ARGV[1]: now (ms), ARGV[2]: unique member for this hit,
# then per key: limit, window (ms), enforce (1/0).
# Returns {admitted, hits_1, reset_ms_1, hits_2, reset_ms_2, ...}.
MOVING_WINDOW_LUA = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local counts = {}
local admitted = 1
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 3
  local limit = tonumber(ARGV[base + 1])
  local window = tonumber(ARGV[base + 2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  counts[i] = count
  if ARGV[base + 3] == '1' and count >= limit then admitted = 0 end
end
local result = {admitted}
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 3
  local limit = tonumber(ARGV[base + 1])
  local window = tonumber(ARGV[base + 2])
  local count = counts[i]
  if admitted == 1 then
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], math.ceil(window))
    count = count + 1
  end
  local reset = 0
  if count > 0 then
    local index = count - limit
    if index < 0 then index = 0 end
    local entry = redis.call('ZRANGE', KEYS[i], index, index, 'WITHSCORES')
    if entry[2] then reset = tonumber(entry[2]) + window - now end
  end
  result[#result + 1] = count
  result[#result + 1] = tostring(reset)
end
return result
"""

_member_counter = itertools.count()
_member_prefix = f"{os.getpid()}-{os.urandom(4).hex()}"


class RedisWindows:
    """Moving windows in Redis sorted sets; one EVALSHA decides all limits of a hit."""

    engine = "redis"

    def __init__(self, link, prefix=None, timer=time.time):
        self.link = link
        self.prefix = prefix if prefix is not None else quota_settings.KEY_PREFIX
        self.timer = timer
        self._script = None
        self._async_scripts = {}

    def _arguments(self, limits, now):
        keys = [f"{self.prefix}:rl:{limit.key}" for limit in limits]
        args = [repr(now * 1000.0), f"{_member_prefix}-{next(_member_counter)}"]
        for limit in limits:
            args += [limit.limit, repr(limit.window_seconds * 1000.0), 1 if limit.enforce else 0]
        return keys, args

    @staticmethod
    def _decision(limits, reply):
        admitted = bool(int(reply[0]))
        states = tuple(
            _state(limit, int(reply[1 + 2 * i]), float(reply[2 + 2 * i]) / 1000.0, admitted)
            for i, limit in enumerate(limits)
        )
        return Decision(allowed=admitted, states=states, engine="redis")

    def hit(self, limits, now=None):
        """Decide synchronously; raises a Redis error when Redis does not answer."""
        now = self.timer() if now is None else now
        if self._script is None:
            self._script = self.link.client.register_script(MOVING_WINDOW_LUA)
        keys, args = self._arguments(limits, now)
        return self._decision(limits, self._script(keys=keys, args=args))

    async def ahit(self, limits, now=None):
        """Decide on the running event loop; raises a Redis error when Redis does not answer."""
        now = self.timer() if now is None else now
        client = self.link.async_client
        script = self._async_scripts.get(id(client))
        if script is None:
            script = self._async_scripts[id(client)] = client.register_script(MOVING_WINDOW_LUA)
        keys, args = self._arguments(limits, now)
        return self._decision(limits, await script(keys=keys, args=args))


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
