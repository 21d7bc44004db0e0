"""What a serving process does once, before it takes traffic.

- Close the sessions that a crashed process left open (``quotas.sweep``) and replay the ledger
  into the shared spend counters (idempotent: nothing is counted twice), so a restart after a
  crash or an upgrade starts from what the ledger holds.
- Load the o200k tokenizer in the background, so the first typed message does not wait ~1 s.

Both are skipped with ``QUOTAS_SPEND_SWEEP_SECONDS = 0`` (tests); a database or Redis that is
not there yet only costs a warning: the periodic sweep tries again.
"""

import logging
import threading

from .conf import quota_settings

logger = logging.getLogger("quotas.startup")


def prepare_process():
    """Sweep stale sessions, rebuild the counters, warm the tokenizer (call from asgi.py)."""
    from .text_tokens import load_o200k

    threading.Thread(target=load_o200k, name="o200k-load", daemon=True).start()
    if float(quota_settings.SPEND_SWEEP_SECONDS) <= 0 or not quota_settings.ENABLED:
        return
    from django.db import close_old_connections

    from .spend import spend_counters
    from .sweep import close_stale_sessions

    try:
        close_stale_sessions()
        counters = spend_counters()
        if counters.link is not None:
            counters.rebuild_from_ledger()
    except Exception as exc:  # serving matters more; the periodic sweep runs again
        logger.warning("start-up sweep skipped: %s", exc.__class__.__name__)
    finally:
        close_old_connections()
