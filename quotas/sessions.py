"""The ledger's sessions: whether a new one may start, and closing one with its totals.

Any metered session uses these, whatever it meters: the connection guard admits a session
before its consumer runs, a meter (``quotas.realtime.meter.SessionMeter``) closes its own, and
the stale-session sweep closes those of a process that is gone.
"""

from decimal import Decimal

from django.db.models import Sum

from .metrics import budget_exceeded_total
from .pricing import TOKEN_KINDS
from .spend import spend_counters


def count_refusal(reason):
    """Count a budget refusal in ``budget_exceeded_total``."""
    budget_exceeded_total.labels(reason=reason).inc()


async def admit_new_session(budget, counters=None, caps=None, room_micro=0):
    """Whether a new session may start now: ``room_micro`` left (with 0: anything at all)
    under every spend limit and the rolling-hour cap, and the breaker not open."""
    counters = counters or spend_counters()
    admission = await counters.aadmit(budget, caps, room_micro=room_micro)
    if not admission.allowed:
        count_refusal(admission.reason)
    return admission


def end_session(session_id, ended_at, end_reason):
    """Close a ledger session: ``ended_at``, ``end_reason`` and totals from its records (sync).

    Returns 1 when it was open, 0 when it had been closed already."""
    from .models import QuotaSession, UsageRecord

    sums = UsageRecord.objects.filter(session_id=session_id).aggregate(
        cost=Sum("cost_usd"), **{kind: Sum(kind) for kind in TOKEN_KINDS}
    )
    totals = {kind: sums[kind] or 0 for kind in TOKEN_KINDS}
    return QuotaSession.objects.filter(pk=session_id, ended_at__isnull=True).update(
        ended_at=ended_at, end_reason=end_reason, cost_usd=sums["cost"] or Decimal(0), **totals
    )
