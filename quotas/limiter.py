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
from .hash_tags import limiter_key, limiter_owner
from .redis_client import LuaScript, fallback_mode, shared_redis


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


# Keys, arguments and reply of the script: quotas/lua/moving_window.lua.
MOVING_WINDOW = LuaScript("moving_window")

_member_counter = itertools.count()
_member_prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"


class RedisWindows:
    """Moving windows in Redis sorted sets; one EVALSHA decides all limits of a hit.

    ``reset_seconds`` is exact for the limits that shape the answer (those at or over their
    limit, and the enforced ones with the fewest hits left); for the others it is the
    window length, an upper bound. The script runs through ``SharedRedis.run``/``arun``
    (``quotas.redis_client``), which answers None while Redis is down.

    On a Redis Cluster the keys carry their owner's hash tag (``quotas.hash_tags``): a hit
    whose limits all count one owner is still one script; one with several owners runs the
    script once per owner, and takes the hit back from the owners that admitted it when
    another refused (the script's ``undo`` mode).
    """

    engine = "redis"

    def __init__(self, link, prefix=None, timer=time.time):
        self.link = link
        self.prefix = prefix if prefix is not None else quota_settings.KEY_PREFIX
        self.timer = timer
        self._key_prefix = f"{self.prefix}:rl:"
        self._specs = {}  # (limit, window, enforce) -> encoded limit, window, ttl, enforce

    def _spec(self, limit):
        spec_key = (limit.limit, limit.window_seconds, limit.enforce)
        spec = self._specs.get(spec_key)
        if spec is None:
            window_ms = limit.window_seconds * 1000.0
            spec = self._specs[spec_key] = (
                b"%d" % limit.limit,
                repr(window_ms).encode(),
                b"%d" % math.ceil(window_ms),
                b"1" if limit.enforce else b"0",
            )
        return spec

    def arguments(self, limits, now, member=None):
        """Keys and ARGV of the script for one hit on ``limits`` at ``now``."""
        prefix = self._key_prefix
        if self.link.cluster:
            keys = [limiter_key(prefix, limit.key, True) for limit in limits]
        else:
            keys = [f"{prefix}{limit.key}" for limit in limits]
        now_ms = now * 1000.0
        member = member or f"{_member_prefix}{next(_member_counter)}".encode()
        args = [repr(now_ms).encode(), member]
        for limit in limits:
            args += self._spec(limit)
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

    def hit(self, limits, now=None):
        """Decide synchronously; None while Redis is down."""
        now = self.timer() if now is None else now
        groups = self._owners(limits)
        if groups is not None:
            return self._hit_owners(groups, limits, now)
        reply = self.link.run(MOVING_WINDOW, *self.arguments(limits, now))
        return None if reply is None else self._decision(limits, reply)

    async def ahit(self, limits, now=None):
        """Decide on the running event loop; None while Redis is down."""
        now = self.timer() if now is None else now
        groups = self._owners(limits)
        if groups is not None:
            return await self._ahit_owners(groups, limits, now)
        reply = await self.link.arun(MOVING_WINDOW, *self.arguments(limits, now))
        return None if reply is None else self._decision(limits, reply)

    # -- a cluster hit whose limits count several owners (several hash slots) ---------------

    def _owners(self, limits):
        """Indices of ``limits`` grouped by owner when the hit spans several, else None."""
        if not self.link.cluster:
            return None
        groups = {}
        for index, limit in enumerate(limits):
            groups.setdefault(limiter_owner(limit.key), []).append(index)
        return list(groups.values()) if len(groups) > 1 else None

    def _owner_plans(self, groups, limits, now, member):
        """Per owner: the limits' indices, the limits, and the script's keys and ARGV (one
        ``member`` for the whole hit, so it can be taken back)."""
        for indices in groups:
            group = [limits[index] for index in indices]
            yield indices, group, *self.arguments(group, now, member)

    @staticmethod
    def _merged(limits, parts):
        """One decision from per-owner ``(indices, decision)`` parts."""
        states = [None] * len(limits)
        for indices, decision in parts:
            for index, state in zip(indices, decision.states, strict=True):
                states[index] = state
        allowed = all(decision.allowed for _, decision in parts)
        return Decision(allowed, tuple(states), "redis")

    def _owner_calls(self, groups, limits, now):
        """The script calls of a hit over several owners, as a generator: it yields
        ``(keys, args)``, is sent each reply, and returns the decision."""
        member = f"{_member_prefix}{next(_member_counter)}".encode()
        parts, plans = [], []
        for indices, group, keys, args in self._owner_plans(groups, limits, now, member):
            reply = yield keys, args
            parts.append((indices, self._decision(group, reply)))
            plans.append((group, keys, args))
        if not all(decision.allowed for _, decision in parts):
            for number, (group, keys, args) in enumerate(plans):
                if parts[number][1].allowed:  # another owner refused: take the hit back
                    reply = yield keys, [*args, b"undo"]
                    parts[number] = (parts[number][0], self._decision(group, reply))
        return self._merged(limits, parts)

    def _hit_owners(self, groups, limits, now):
        calls, reply = self._owner_calls(groups, limits, now), None
        try:
            while True:
                reply = self.link.run(MOVING_WINDOW, *calls.send(reply))
                if reply is None:
                    return None
        except StopIteration as done:
            return done.value

    async def _ahit_owners(self, groups, limits, now):
        calls, reply = self._owner_calls(groups, limits, now), None
        try:
            while True:
                reply = await self.link.arun(MOVING_WINDOW, *calls.send(reply))
                if reply is None:
                    return None
        except StopIteration as done:
            return done.value

    def close(self):
        """Close this thread's script connection."""
        self.link.close()


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
        return fallback_mode(self.link, self._fail_mode)

    def _fallback(self, limits, now):
        mode = fallback_mode(self.link, self._fail_mode)
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
        if self.redis is not None:
            decision = self.redis.hit(limits, now)
            if decision is not None:
                return decision
        return self._fallback(limits, now)

    async def ahit(self, limits, now=None):
        """``hit()`` for async callers: the Redis call does not block the event loop."""
        now = self.timer() if now is None else now
        if not limits:
            return Decision(allowed=True, states=(), engine="none")
        if self.redis is not None:
            decision = await self.redis.ahit(limits, now)
            if decision is not None:
                return decision
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
