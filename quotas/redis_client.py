"""The Redis connection shared by every quota counter, with its health.

One ``SharedRedis`` per process (``shared_redis()``) holds a sync client and one asyncio
client per event loop. When a call fails, the link is marked down and left alone for
``QUOTAS_REDIS_RETRY_SECONDS``; callers then fall back per ``QUOTAS_FAIL_MODE``. The next
call after that pause tries Redis again, so a Redis that comes back is used again without
a restart.
"""

import asyncio
import logging
import threading
import time
import weakref

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from .conf import quota_settings
from .metrics import redis_available

logger = logging.getLogger("quotas.redis")

REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


class SharedRedis:
    """Redis clients for one URL plus an up/down state that all quota code consults."""

    def __init__(self, url, *, timeout=None, retry_seconds=None, timer=time.monotonic):
        self.url = url
        self.timeout = (
            timeout if timeout is not None else float(quota_settings.REDIS_TIMEOUT_SECONDS)
        )
        self.retry_seconds = (
            retry_seconds
            if retry_seconds is not None
            else float(quota_settings.REDIS_RETRY_SECONDS)
        )
        self.timer = timer
        self._down_until = 0.0
        self._was_down = False
        self._lock = threading.Lock()
        self._sync = None
        self._async_by_loop = weakref.WeakKeyDictionary()
        self._listeners = []

    def _options(self, retry_class):
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": 0,
            # One immediate retry on a broken connection (Redis restarted, idle socket
            # closed): a fresh connection tells whether Redis is really gone. Timeouts are
            # not retried: they already cost ``timeout`` seconds.
            "retry": retry_class(
                NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)
            ),
        }

    @property
    def client(self):
        """The sync client (thread-safe connection pool)."""
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    self._sync = redis.Redis.from_url(self.url, **self._options(redis.retry.Retry))
        return self._sync

    @property
    def async_client(self):
        """The asyncio client bound to the running event loop."""
        loop = asyncio.get_running_loop()
        client = self._async_by_loop.get(loop)
        if client is None:
            client = redis.asyncio.Redis.from_url(
                self.url, **self._options(redis.asyncio.retry.Retry)
            )
            self._async_by_loop[loop] = client
        return client

    @property
    def available(self):
        """False while a recent failure says Redis is down (no call is made to find out)."""
        return self.timer() >= self._down_until

    def mark_down(self, exc):
        """Record a failed call; Redis is not tried again for ``retry_seconds``."""
        if not self._was_down:
            logger.warning(
                "Redis unavailable (%s: %s); falling back for %.1fs",
                exc.__class__.__name__,
                exc,
                self.retry_seconds,
            )
            redis_available.set(0)
        self._was_down = True
        self._down_until = self.timer() + self.retry_seconds

    def mark_up(self):
        """Record a successful call; tells listeners when Redis has just come back."""
        if self._was_down:
            self._was_down = False
            redis_available.set(1)
            logger.warning("Redis is available again")
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    logger.exception("Redis recovery listener failed")

    def on_recovery(self, listener):
        """Call ``listener()`` after the first successful call that follows an outage."""
        self._listeners.append(listener)

    def ping(self):
        """True when Redis answers now (also updates the state)."""
        try:
            self.client.ping()
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return False
        self.mark_up()
        return True


_shared = {}
_shared_lock = threading.Lock()


def reset_shared_redis():
    """Forget every ``SharedRedis`` of this process (``quotas.testing``)."""
    with _shared_lock:
        _shared.clear()


def shared_redis():
    """The process-wide ``SharedRedis`` for ``QUOTAS_REDIS_URL``, or None without Redis."""
    url = quota_settings.REDIS_URL
    if not url:
        return None
    link = _shared.get(url)
    if link is None:
        with _shared_lock:
            link = _shared.setdefault(url, SharedRedis(url))
    return link
