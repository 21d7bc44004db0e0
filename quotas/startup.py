"""What a serving process does once, before it takes traffic.

- Close the sessions that a crashed process left open (``quotas.sweep``), free their
  concurrent-session slots, and replay the ledger into the shared spend counters (idempotent:
  nothing is counted twice), so a restart after a crash or an upgrade starts from what the
  ledger holds. Skipped with ``QUOTAS_SPEND_SWEEP_SECONDS = 0`` (tests); a database or Redis
  that is not there yet only costs a warning: the periodic sweep tries again.
- Run the project's slow loads meanwhile, each in a thread (while the sweep waits on the
  database): a Realtime relay passes ``quotas.realtime.text_tokens.load_o200k``, the o200k
  tokenizer (one to two seconds). Loaded by the first typed message instead, it would stall
  the event loop, and with it every session of the process: Redis calls time out meanwhile and
  the process falls back to per-process spend counters, so sessions on several instances could
  pass the shared caps together.
"""

import logging
import threading

from .conf import quota_settings

logger = logging.getLogger("quotas.startup")


def prepare_process(*loaders):
    """Sweep stale sessions and rebuild the counters while ``loaders`` (callables without
    arguments) run in threads; returns when all are done (call from asgi.py)."""
    threads = [
        threading.Thread(target=load, name=getattr(load, "__name__", "loader"), daemon=True)
        for load in loaders
    ]
    for thread in threads:
        thread.start()
    try:
        _sweep()
    finally:
        for thread in threads:
            thread.join()


def _sweep():
    if float(quota_settings.SPEND_SWEEP_SECONDS) <= 0 or not quota_settings.ENABLED:
        return
    from django.db import close_old_connections

    from .guards import session_slots
    from .spend import spend_counters
    from .sweep import close_stale_sessions

    try:
        slots = session_slots()
        for _pk, client, slot in close_stale_sessions().closed:
            if slot:
                slots.release_sync(client, slot)
        counters = spend_counters()
        if counters.link is not None:
            counters.rebuild_from_ledger()
    except Exception as exc:  # serving matters more; the periodic sweep runs again
        logger.warning("start-up sweep skipped: %s", exc.__class__.__name__)
    finally:
        close_old_connections()
