"""Close the sessions of processes that are gone, keeping what they booked.

A running session refreshes ``QuotaSession.heartbeat_at`` every
``QUOTAS_SESSION_HEARTBEAT_SECONDS`` (default 30). An open session whose heartbeat is older
than three of those belongs to a process that died (``kill -9``, a lost machine): the sweep
ends it with ``end_reason`` ``server_crash`` at its last heartbeat, with totals from its
records, the provisional record of a response that was running included (upstream billed it:
the estimate stays booked), gives its concurrent-session slot back, and makes sure the spend
counters hold what the ledger holds (an idempotent replay).

It runs at start-up and every ``QUOTAS_SPEND_SWEEP_SECONDS`` (default 300) in each serving
process (``ensure_sweeper()``, started by the connection guard), and on demand with
``manage.py quotas_close_stale``.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from channels.db import database_sync_to_async

from .conf import quota_settings
from .pricing import timestamp_to_datetime

logger = logging.getLogger("quotas.sweep")

STALE_HEARTBEATS = 3


@dataclass
class SweepResult:
    """What one sweep closed."""

    closed: list = field(default_factory=list)  # (session id, client, slot)

    def __len__(self):
        return len(self.closed)


def stale_before(now):
    """Open sessions with no heartbeat since this time are stale."""
    beat = float(quota_settings.SESSION_HEARTBEAT_SECONDS)
    return timestamp_to_datetime(now) - timedelta(seconds=STALE_HEARTBEATS * beat)


def close_stale_sessions(now=None):
    """End every stale open session as ``server_crash`` (sync); returns a ``SweepResult``."""
    from django.db.models import Q

    from .models import QuotaSession
    from .realtime.meter import end_session

    now = time.time() if now is None else now
    cutoff = stale_before(now)
    stale = QuotaSession.objects.filter(ended_at__isnull=True).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    )
    result = SweepResult()
    for pk, client, slot, beat, started in stale.values_list(
        "pk", "client", "slot", "heartbeat_at", "started_at"
    ):
        if end_session(pk, beat or started, QuotaSession.EndReason.SERVER_CRASH):
            result.closed.append((str(pk), client, slot))
    if result.closed:
        logger.warning(
            "closed %d sessions of a process that is gone (server_crash)", len(result.closed)
        )
    return result


async def asweep(now=None):
    """One sweep from async code: close stale sessions, free their slots, replay the ledger."""
    from .guards import session_slots
    from .spend import spend_counters

    result = await database_sync_to_async(close_stale_sessions)(now)
    if not result.closed:
        return result
    slots = session_slots()
    for _pk, client, slot in result.closed:
        if slot:
            await slots.release(client, slot)
    counters = spend_counters()
    if counters.link is not None:
        await counters.arebuild_from_ledger()
    return result


def sweep(now=None):
    """One sweep from sync code (the management command)."""
    from asgiref.sync import async_to_sync

    return async_to_sync(asweep)(now)


_sweeper = {}


def ensure_sweeper():
    """Start this process's periodic sweep on the running event loop (once per loop)."""
    interval = float(quota_settings.SPEND_SWEEP_SECONDS)
    if interval <= 0:
        return None
    loop = asyncio.get_running_loop()
    task = _sweeper.get(loop)
    if task is None or task.done():
        task = _sweeper[loop] = loop.create_task(_run(interval))
    return task


async def _run(interval):
    while True:
        try:
            await asweep()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again; serving goes on
            logger.warning("stale-session sweep failed: %s", exc.__class__.__name__)
        await asyncio.sleep(interval)
