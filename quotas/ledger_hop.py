"""The worker-thread hop to the ledger database, with connection checks at most once a second.

Channels' ``database_sync_to_async`` tidies the thread's connections (Django's
``close_old_connections``) before and after every call. With ``CONN_HEALTH_CHECKS`` on, that
makes each call pay an extra ``SELECT 1`` round trip: a session that books every response pays
it on every booking, settlement and hold, where a Django request pays it once. ``ledger_hop``
tidies at most once per ``CHECK_INTERVAL_SECONDS`` per thread, and at once when a connection
saw an error (``errors_occurred``), so a broken or obsolete connection is still replaced
within that interval (and ``CONN_MAX_AGE`` is still honoured within it).
"""

import threading
import time

from asgiref.sync import SyncToAsync
from django.db import close_old_connections, connections

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


class LedgerHop(SyncToAsync):
    """``sync_to_async`` (thread sensitive) that tidies connections as described above."""

    def thread_handler(self, loop, *args, **kwargs):
        tidy_connections()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            tidy_connections()


ledger_hop = LedgerHop
