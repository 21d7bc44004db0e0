"""How many sessions each client has open right now, across every instance.

A slot is a member of a per-client set with an expiry time; a running session refreshes
its slot (``SessionSlots.TTL_SECONDS``), so the slots of an instance that died vanish by
themselves. Redis holds the sets when configured; otherwise (or while Redis is down in
``local`` fail mode) a process-local dict does.
"""

import threading
import time

from .conf import quota_settings
from .redis_client import LuaScript, fallback_mode

SLOT_ACQUIRE = LuaScript("slot_acquire")
SLOT_RELEASE = LuaScript("slot_release")


class SessionSlots:
    """Acquire, refresh and release per-client session slots."""

    TTL_SECONDS = 90

    def __init__(self, link=None, timer=time.time):
        self.link = link
        self.timer = timer
        self._local = {}
        self._lock = threading.Lock()

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

    async def acquire(self, client, token, maximum):
        """Take a slot for ``token``; False when ``client`` already holds ``maximum``."""
        now = self.timer()
        if self.link is not None:
            args = [repr(now), repr(now + self.TTL_SECONDS), maximum, token]
            reply = await self.link.arun(SLOT_ACQUIRE, [self._key(client)], args)
            if reply is not None:
                return bool(int(reply))
        mode = fallback_mode(self.link)
        if mode == "open":
            return True
        if mode == "closed":
            return False
        return self._local_acquire(client, token, maximum, now)

    async def refresh(self, client, token, maximum):
        """Keep a running session's slot alive (call well within ``TTL_SECONDS``)."""
        await self.acquire(client, token, maximum)

    async def release(self, client, token):
        """Give the slot back (both stores, so a slot taken during an outage is freed too)."""
        self._local_release(client, token)
        if self.link is not None:
            await self.link.arun(SLOT_RELEASE, [self._key(client)], [token])

    def release_sync(self, client, token):
        """``release()`` for sync code (a process starting up, before its event loop runs)."""
        self._local_release(client, token)
        if self.link is not None:
            self.link.run(SLOT_RELEASE, [self._key(client)], [token])
