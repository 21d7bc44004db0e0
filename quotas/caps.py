"""Which spend caps a session's money counts against, and where each one is counted.

Every cost of a session counts against, in this order (the first refusing cap is the reason
given): the session's own cap (``budget``), each spend limit that applies to the session's
identity (``client_budget``, ``user_budget``, ``global_budget``), and the rolling-hour cap
(``hourly_cap``), which the circuit breaker watches too. A cap is one counter in the spend
engine (``quotas.spend``): a rolling window, or everything since a calendar period began, or
(the session) everything.

Spend limits (``SpendLimit``): ``key=client`` counts per client identity, ``key=user`` per
signed-in Django user and per client for an anonymous session, ``key=global`` everyone
together. A limit with a group is a tier: for a signed-in member of that group it replaces
the untiered limits of the same key and period (rolling windows: of the same length); of
several tiers the most generous wins. Calendar periods start at local midnight in
``QUOTAS_BUDGET_TIMEZONE`` (a week on Monday, a month on the 1st).
"""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .pricing import to_micro

HOUR_SECONDS = 3600
SESSION = "session"
HOURLY = "hourly"
REASON_BY_KEY = {"client": "client_budget", "user": "user_budget", "global": "global_budget"}


@dataclass(frozen=True)
class Identity:
    """Who a session's money is counted for: the client, and the signed-in user if any."""

    client: str
    user_id: int | None = None
    group_ids: frozenset = field(default_factory=frozenset)

    def who(self, key):
        """The counter owner for a limit ``key``."""
        if key == "global":
            return "global"
        if key == "user" and self.user_id is not None:
            return f"user:{self.user_id}"
        return f"client:{self.client}"


@dataclass(frozen=True)
class Cap:
    """One counter a spend decision touches, with its cap and lifetime."""

    name: str  # "session", "hourly" or the spend limit's name
    reason: str  # the refusal reason when this cap refuses
    key: str  # Redis key of the entries; the running total lives at ``total_key``
    cap_micro: int  # 0: counted, never refused
    window_ms: int = 0  # rolling window; 0: every entry counts until the key expires
    ttl_seconds: int = HOUR_SECONDS
    shadow: bool = False
    starts_at: float = 0.0  # calendar period start (POSIX seconds); 0: none
    resets_at: float = 0.0  # calendar period end (POSIX seconds); 0: none
    who: str = ""
    alert_at_percent: int | None = None

    @property
    def total_key(self):
        return f"{self.key}:total"

    def counts_entry_at(self, timestamp, now):
        """Whether an entry made at ``timestamp`` is still in this counter at ``now``."""
        if self.window_ms:
            return timestamp * 1000 > now * 1000 - self.window_ms
        return timestamp >= self.starts_at


@dataclass(frozen=True)
class CapSet:
    """The caps of one decision, in refusal order; the breaker watches ``hourly``."""

    caps: tuple
    _positions: dict = field(init=False, repr=False, compare=False, hash=False)
    # What an engine derives from these caps once (e.g. the spend script's arguments), so a
    # CapSet kept for many decisions (a session's) is encoded once.
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        positions = {}
        for position, cap in enumerate(self.caps):
            positions.setdefault(cap.name, position)
        object.__setattr__(self, "_positions", positions)

    def __iter__(self):
        return iter(self.caps)

    def __len__(self):
        return len(self.caps)

    def index(self, name):
        """The position of the cap called ``name`` (-1 when absent)."""
        return self._positions.get(name, -1)


def applicable_limits(limits, identity):
    """The spend limits that apply to ``identity``: untiered ones, tiers replacing them."""
    untiered = [limit for limit in limits if limit.group_id is None]
    if identity.user_id is None:
        return untiered
    best = {}
    for limit in limits:
        if limit.group_id is None or limit.group_id not in identity.group_ids:
            continue
        chosen = best.get(limit.signature)
        if chosen is None or limit.cap_usd > chosen.cap_usd:
            best[limit.signature] = limit
    return [limit for limit in untiered if limit.signature not in best] + list(best.values())


def period_bounds(period, now, tz):
    """(start, end) in POSIX seconds of the calendar ``period`` (day|week|month) at ``now``."""
    local = datetime.fromtimestamp(now, tz)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        start -= timedelta(days=start.weekday())
    elif period == "month":
        start = start.replace(day=1)
    if period == "day":
        end = start + timedelta(days=1)
    elif period == "week":
        end = start + timedelta(days=7)
    else:
        end = (start + timedelta(days=32)).replace(day=1)
    # Midnight plus whole days in wall time: re-attach the zone so a DST change is honoured.
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    end = end.replace(tzinfo=None).replace(tzinfo=tz)
    return start.timestamp(), end.timestamp()


def limit_cap(limit, identity, now, *, prefix, tz):
    """The ``Cap`` of one spend limit for ``identity`` at ``now``."""
    who = identity.who(limit.key)
    key = f"{prefix}:spend:limit:{limit.name}:{who}"
    common = {
        "name": limit.name,
        "reason": REASON_BY_KEY[limit.key],
        "cap_micro": to_micro(limit.cap_usd),
        "shadow": limit.shadow,
        "who": who,
        "alert_at_percent": limit.alert_at_percent,
    }
    if limit.period == "rolling":
        window = int(limit.window_seconds or HOUR_SECONDS)
        return Cap(key=key, window_ms=window * 1000, ttl_seconds=window + 60, **common)
    start, end = period_bounds(limit.period, now, tz)
    return Cap(
        key=f"{key}:{int(start)}",
        ttl_seconds=max(60, math.ceil(end - now) + HOUR_SECONDS),
        starts_at=start,
        resets_at=end,
        **common,
    )


def hourly_cap(budget, *, prefix):
    """The rolling-hour cap over everyone's spend (the breaker watches this counter)."""
    return Cap(
        name=HOURLY,
        reason="hourly_cap",
        key=f"{prefix}:spend:hour",
        cap_micro=to_micro(budget.hourly_cap_usd),
        window_ms=HOUR_SECONDS * 1000,
        ttl_seconds=HOUR_SECONDS + 60,
        who="global",
    )


def session_cap(budget, session_id, *, prefix):
    """One session's own cap (every entry of the session counts)."""
    return Cap(
        name=SESSION,
        reason="budget",
        key=f"{prefix}:spend:session:{session_id}",
        cap_micro=to_micro(budget.session_cap_usd),
        ttl_seconds=int(budget.session_max_seconds) + 2 * HOUR_SECONDS,
        who=f"session:{session_id}",
    )


def spend_caps(budget, limits, identity, now, *, prefix, tz, session_id=None):
    """Every cap a cost of ``identity`` (and of ``session_id``, if given) counts against."""
    caps = []
    if session_id is not None:
        caps.append(session_cap(budget, session_id, prefix=prefix))
    chosen = applicable_limits(limits, identity)
    chosen.sort(key=lambda limit: limit.key == "global")  # the client's own limits first
    caps += [limit_cap(limit, identity, now, prefix=prefix, tz=tz) for limit in chosen]
    caps.append(hourly_cap(budget, prefix=prefix))
    return CapSet(tuple(caps))
