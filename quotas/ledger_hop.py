"""The worker-thread hop to the ledger database, with connection checks at most once a second.

Channels' ``database_sync_to_async`` tidies the thread's connections (Django's
``close_old_connections``) before and after every call. With ``CONN_HEALTH_CHECKS`` on, that
makes each call pay an extra ``SELECT 1`` round trip: a session that books every response pays
it on every booking, settlement and hold, where a Django request pays it once. ``ledger_hop``
tidies at most once per ``CHECK_INTERVAL_SECONDS`` per thread, and at once when a connection
saw an error (``errors_occurred``), so a broken or obsolete connection is still replaced
within that interval (and ``CONN_MAX_AGE`` is still honoured within it).

Where the database takes concurrent writers and ``QUOTAS_LEDGER_THREADS`` is above 1, hops
run in a pool of that many threads (each keeps its own connection): one session's hold or
settlement no longer waits for every other session's commit. A session's own hops still run
one after another (its caller awaits each). Under SQLite, with one thread configured, or
below a sync caller (``async_to_sync``, as in tests, whose hops must see its transaction),
hops stay on the one thread Channels uses.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import AsyncToSync, SyncToAsync
from django.db import close_old_connections, connections

from .conf import quota_settings

CHECK_INTERVAL_SECONDS = 1.0

_last_tidy = threading.local()  # .at: (generation, time of this thread's last tidy)
_generation = 0


def tidy_connections(now=None):
    """``close_old_connections`` when this thread's last one is older than the interval or a
    connection has seen an error; answers whether it ran."""
    now = time.monotonic() if now is None else now
    generation, last = getattr(_last_tidy, "at", (None, 0.0))
    due = generation != _generation or now - last >= CHECK_INTERVAL_SECONDS
    if not due and not any(conn.errors_occurred for conn in connections.all(initialized_only=True)):
        return False
    close_old_connections()
    _last_tidy.at = (_generation, now)
    return True


def forget_tidy():
    """Make the next hop of every thread tidy its connections (tests, settings changes)."""
    global _generation
    _generation += 1


def ledger_threads():
    """How many threads hop to the ledger: ``QUOTAS_LEDGER_THREADS``, 1 under SQLite."""
    if connections["default"].vendor == "sqlite":
        return 1
    try:
        return max(1, int(quota_settings.LEDGER_THREADS))
    except (TypeError, ValueError):
        return 1


_pools = {}  # threads -> executor, made on first use
_pools_lock = threading.Lock()


def ledger_pool():
    """The executor of the pooled hops, or None when hops stay on Channels' one thread."""
    threads = ledger_threads()
    if threads == 1 or getattr(AsyncToSync.executors, "current", None) is not None:
        return None
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ledger")
        return pool


def close_pooled_connections(timeout=10.0):
    """Close the database connections of every pooled ledger thread (at the end of a test,
    or before the database goes away); each idle thread closes its own."""
    with _pools_lock:
        pools = list(_pools.items())
    for threads, pool in pools:
        everyone = threading.Barrier(threads, timeout=timeout)
        for future in [pool.submit(_close_mine, everyone) for _ in range(threads)]:
            future.result(timeout)


def _close_mine(everyone):
    everyone.wait()  # one call per thread: each waits until every thread has one
    connections.close_all()


class LedgerHop(SyncToAsync):
    """``sync_to_async`` (thread sensitive, or pooled: see above) that tidies connections as
    described above."""

    def __init__(self, func, thread_sensitive=True, executor=None, **kwargs):
        super().__init__(func, thread_sensitive=thread_sensitive, executor=executor, **kwargs)
        self._pooled = {}  # executor -> the same function hopping through it

    async def __call__(self, *args, **kwargs):
        pool = ledger_pool() if self._thread_sensitive else None
        if pool is None:
            return await super().__call__(*args, **kwargs)
        pooled = self._pooled.get(pool)
        if pooled is None:
            pooled = self._pooled[pool] = LedgerHop(
                self.func, thread_sensitive=False, executor=pool
            )
        return await pooled(*args, **kwargs)

    def thread_handler(self, loop, *args, **kwargs):
        tidy_connections()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            tidy_connections()


ledger_hop = LedgerHop
