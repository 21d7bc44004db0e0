"""How many sessions each client has open right now, across every instance.

A slot is a member of a per-client set with an expiry time; a running session refreshes
its slot (``SessionSlots.TTL_SECONDS``), so the slots of an instance that died vanish by
themselves. Redis holds the sets when configured; otherwise (or while Redis is down in
``local`` fail mode) a process-local dict does.
"""

import threading
import time

from .conf import quota_settings
from .redis_client import REDIS_ERRORS

# KEYS[1]: the client's slot set. ARGV: now, expires_at, max, token. Returns 1 if acquired.
ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) - tonumber(ARGV[1])) + 1)
return 1
"""


class SessionSlots:
    """Acquire, refresh and release per-client session slots."""

    TTL_SECONDS = 90

    def __init__(self, link=None, timer=time.time):
        self.link = link
        self.timer = timer
        self._local = {}
        self._lock = threading.Lock()
        self._scripts = {}

    def _key(self, client):
        return f"{quota_settings.KEY_PREFIX}:slots:{client}"

    def _local_acquire(self, client, token, maximum, now):
        with self._lock:
            slots = self._local.setdefault(client, {})
            for other, expires in list(slots.items()):
                if expires <= now:
                    del slots[other]
            if token not in slots and len(slots) >= maximum:
                return False
            slots[token] = now + self.TTL_SECONDS
            return True

    def _local_release(self, client, token):
        with self._lock:
            slots = self._local.get(client)
            if slots is not None:
                slots.pop(token, None)
                if not slots:
                    self._local.pop(client, None)

    def _use_redis(self):
        return self.link is not None and self.link.available

    async def acquire(self, client, token, maximum):
        """Take a slot for ``token``; False when ``client`` already holds ``maximum``."""
        now = self.timer()
        if self._use_redis():
            client_redis = self.link.async_client
            script = self._scripts.get(id(client_redis))
            if script is None:
                script = self._scripts[id(client_redis)] = client_redis.register_script(ACQUIRE_LUA)
            try:
                ok = await script(
                    keys=[self._key(client)],
                    args=[repr(now), repr(now + self.TTL_SECONDS), maximum, token],
                )
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
            else:
                self.link.mark_up()
                return bool(int(ok))
        if self.link is not None and quota_settings.FAIL_MODE == "open":
            return True
        if self.link is not None and quota_settings.FAIL_MODE == "closed":
            return False
        return self._local_acquire(client, token, maximum, now)

    async def refresh(self, client, token, maximum):
        """Keep a running session's slot alive (call well within ``TTL_SECONDS``)."""
        await self.acquire(client, token, maximum)

    async def release(self, client, token):
        """Give the slot back (both stores, so a slot taken during an outage is freed too)."""
        self._local_release(client, token)
        if self._use_redis():
            try:
                await self.link.async_client.zrem(self._key(client), token)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)

    def release_sync(self, client, token):
        """``release()`` for sync code (a process starting up, before its event loop runs)."""
        self._local_release(client, token)
        if self._use_redis():
            try:
                self.link.client.zrem(self._key(client), token)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
