"""The Redis connection shared by every quota counter, its health, and the one script runner.

One ``SharedRedis`` per process (``shared_redis()``) holds a sync client and one asyncio
client per event loop. Every counter (the limiter, the spend engine, the session slots)
runs its Lua script (``quotas/lua/*.lua``, a ``LuaScript``) through ``SharedRedis.run`` or
``arun``: one EVALSHA, the script loaded on NOSCRIPT, one retry on a connection Redis
closed, and the up/down state kept here. When a call fails, the link is marked down, the
call answers ``None`` and Redis is left alone for ``QUOTAS_REDIS_RETRY_SECONDS``; callers
then fall back per ``fallback_mode()`` (``QUOTAS_FAIL_MODE``). The next call after that pause
tries Redis again, so a Redis that comes back is used again without a restart.

The sync path writes each command's RESP bytes itself and sends them on a connection of its
own per thread: checking a connection out of redis-py's pool and back, and its command
packer, cost more than a decision's script. That path is for one fixed server
(``redis://``, ``rediss://``, ``unix://``); a Sentinel-managed master
(``redis+sentinel://``, which moves on failover) and a Redis Cluster (``redis+cluster://``)
go through redis-py's ``Sentinel.master_for`` and ``RedisCluster`` clients
(``quotas.redis_urls``), which find the master or the slot's node themselves; on a cluster the
sync path still sends the packed command itself to the node redis-py's slot map names
(``quotas.cluster_scripts``).
"""

import asyncio
import hashlib
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from . import redis_urls
from .cluster_scripts import ClusterScripts, evalsha
from .conf import quota_settings
from .metrics import redis_available

logger = logging.getLogger("quotas.redis")

REDIS_ERRORS = (redis.exceptions.RedisError, OSError)
LUA_DIR = Path(__file__).with_name("lua")


def fallback_mode(link, override=None):
    """How a decision goes while Redis cannot be used: ``local`` (the in-process twin, also
    when no Redis is configured), ``open`` (allow) or ``closed`` (refuse); one meaning of
    ``QUOTAS_FAIL_MODE`` (or an engine's ``override``) for the limiter, the spend engine and
    the session slots."""
    if link is None:
        return "local"
    return override or quota_settings.FAIL_MODE


def _bulk(data):
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _encode(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    return repr(value).encode()


_SCRIPTS = []  # every LuaScript of the process (preloaded on a cluster's nodes)


class LuaScript:
    """A Lua script of ``quotas/lua/``, run by SHA through ``SharedRedis.run``/``arun``."""

    def __init__(self, name):
        _SCRIPTS.append(self)
        self.name = name
        self.source = (LUA_DIR / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._heads = {}  # (keys, args) -> packed "*n EVALSHA sha numkeys"

    def pack(self, keys, args):
        """The RESP bytes of ``EVALSHA sha len(keys) *keys *args``."""
        shape = (len(keys), len(args))
        head = self._heads.get(shape)
        if head is None:
            head = self._heads[shape] = (
                b"*%d\r\n" % (3 + len(keys) + len(args))
                + _bulk(b"EVALSHA")
                + _bulk(self.sha.encode())
                + _bulk(b"%d" % len(keys))
            )
        parts = [head]
        for item in (*keys, *args):
            data = item.encode() if type(item) is str else _encode(item)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def __repr__(self):
        return f"LuaScript({self.name!r})"


class SharedRedis:
    """Redis clients for one URL plus an up/down state that all quota code consults."""

    def __init__(self, url, *, timeout=None, retry_seconds=None, timer=time.monotonic):
        self.url = url
        self.target = redis_urls.parse_redis_url(url)
        self.cluster = self.target.is_cluster
        # The packed fast path talks to one fixed server; a Sentinel master moves and a
        # cluster spreads, so those go through redis-py's client (``_client_execute``).
        self._packed = self.target.kind == redis_urls.SINGLE
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
        self._seen_up = False
        self._lock = threading.Lock()
        self._sync = None
        self._async_by_loop = weakref.WeakKeyDictionary()
        self._cluster_ready = weakref.WeakKeyDictionary()  # loop -> asyncio.Lock, then True
        self._cluster_scripts = None
        self._listeners = []
        self._local = threading.local()

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
                    options = self._options(redis.retry.Retry)
                    self._sync = redis_urls.sync_client(self.target, **options)
        return self._sync

    @property
    def async_client(self):
        """The asyncio client bound to the running event loop."""
        loop = asyncio.get_running_loop()
        client = self._async_by_loop.get(loop)
        if client is None:
            options = self._options(redis.asyncio.retry.Retry)
            client = redis_urls.async_client(self.target, **options)
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
        if not self._seen_up:
            # The first answer of a new process: the gauge starts at 0 (unknown) until here.
            self._seen_up = True
            redis_available.set(1)
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

    # -- the script runner -----------------------------------------------------------------

    def _connection(self):
        # One connection per thread, made with the pool's class and options (TLS, AUTH,
        # timeouts). Only this thread uses it, and a failed call disconnects it, so it never
        # holds an unread reply; the next call reconnects.
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():
            pool = self.client.connection_pool
            connection = local.connection = pool.connection_class(**pool.connection_kwargs)
            local.pid = os.getpid()
        return connection

    def _send(self, packed):
        connection = self._connection()
        connection.send_packed_command([packed], check_health=False)
        return connection.read_response()

    def execute(self, script, keys, args):
        """Run ``script`` (sync); raises a Redis error when Redis does not answer."""
        if not self._packed:
            return self._client_execute(script, keys, args)
        packed = script.pack(keys, args)
        try:
            return self._send(packed)
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.source)
            return self._send(packed)
        except redis.exceptions.ConnectionError:
            # A connection that Redis closed (restart, idle timeout) fails once; a fresh one
            # tells whether Redis is really gone (refused connects fail fast). Should the first
            # reply have been lost after the script ran, it counts twice: the safe direction.
            return self._send(packed)

    def _client_execute(self, script, keys, args):
        # Cluster: the node of the keys' slot (one hash tag per script), by redis-py's slot
        # map (``quotas.cluster_scripts``). Sentinel: the client's pool asks the sentinels
        # for the master on each new connection.
        if self.cluster:
            if self._cluster_scripts is None:
                self._cluster_scripts = ClusterScripts(self.client)
            return self._cluster_scripts.execute(script, keys, args)
        return evalsha(self.client, script, keys, args)

    async def aexecute(self, script, keys, args):
        """Run ``script`` on the running event loop; raises a Redis error when Redis does not
        answer. The asyncio client handles a task cancelled mid-reply."""
        client = self.async_client
        if self.cluster and self._cluster_ready.get(asyncio.get_running_loop()) is not True:
            await self._aprepare_cluster(client)
        try:
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await client.script_load(script.source)
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _aprepare_cluster(self, client):
        # A new asyncio cluster client learns the slot map and loads every script once, before
        # the first calls of a burst: hundreds of first calls at once would each load scripts
        # and refresh the map, and redis-py's asyncio cluster client then loses replies.
        loop = asyncio.get_running_loop()
        lock = self._cluster_ready.setdefault(loop, asyncio.Lock())
        if lock is True:
            return
        async with lock:
            if self._cluster_ready.get(loop) is True:
                return
            await client.initialize()
            for script in list(_SCRIPTS):
                await client.script_load(script.source)
            self._cluster_ready[loop] = True

    def run(self, script, keys, args):
        """The script's reply (sync), or None while Redis is down (marked here)."""
        if not self.available:
            return None
        try:
            reply = self.execute(script, keys, args)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return None
        self.mark_up()
        return reply

    async def arun(self, script, keys, args):
        """The script's reply on the running event loop, or None while Redis is down."""
        if not self.available:
            return None
        try:
            reply = await self.aexecute(script, keys, args)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return None
        self.mark_up()
        return reply

    def close(self):
        """Close this thread's script connection (others close when their thread ends)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()
        if self._cluster_scripts is not None:
            self._cluster_scripts.close()

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
