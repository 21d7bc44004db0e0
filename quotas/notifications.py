"""What the spend counters tell the operator: breaker transitions, hourly-cap and limit alerts.

``SpendCounters`` hands every evaluation to ``spend_notifier.observe()``. It records breaker
transitions as ``BreakerEvent`` rows (through the event buffer, so a charge never waits for
the database) and sends one alert through ``quotas.alerts`` for:

- ``breaker_open``   the breaker tripped (dedupe key: the clock hour of the trip, so a
                     re-trip within the same hour does not page again)
- ``breaker_reset``  the breaker closed by itself (key: the clock hour) or was reset by hand
                     (key: who and the minute)
- ``hourly_80`` / ``hourly_100``  a charge left the rolling hour at or over 80 % / 100 % of the
  hourly cap (key: the clock hour, so at most one of each per hour; a process also remembers
  what it sent so it does not ask the dedupe cache on every charge).
- ``spend_limit_alert``  a charge or settlement left a spend limit that has
  ``alert_at_percent`` at or over that share of its cap, for one key (``Cap.who``: a client,
  a user or everyone). One alert per limit, key and window: for a calendar period (day,
  week, month) once per period (dedupe key: the period start); for a rolling window once
  until the total is seen back under the threshold, or a whole window has passed since the
  alert (by then every cent that made up the crossing has left the window), and at most
  once per window-long bucket of the clock across instances (dedupe key:
  ``floor(now / window_seconds)``).
- ``spend_limit_shadow_over``  a shadow limit ("count, log and alert, never refuse") is at
  or over its cap: a charge left it there, or a reservation or admission would have been
  refused by it. Logged as one WARNING line and alerted, with the same once-per-window rule.

Subjects name the limit, the kind of key (client, user #id, everyone), the share, the spend
and the cap; a client's address only travels in the details (``who``), never in a subject.

Alerts are queued off the event loop when one is running: their dedupe claim is a cache call.
"""

import asyncio
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal

from . import alerts, events
from .conf import quota_settings
from .pricing import from_micro

logger = logging.getLogger("quotas.notifications")

from .breaker import CLOSED, HALF_OPEN, OPEN  # noqa: E402

HOURLY_THRESHOLDS = ((Decimal("1.00"), "hourly_100"), (Decimal("0.80"), "hourly_80"))
LIMIT_ALERT = "spend_limit_alert"
SHADOW_OVER = "spend_limit_shadow_over"
MAX_REMEMBERED_KEYS = 10_000  # (limit, key) pairs over a threshold this process remembers


def _send(event, subject, message, *, dedupe_key, details, dedupe_seconds=None):
    options = {"dedupe_key": dedupe_key, "details": details, "dedupe_seconds": dedupe_seconds}
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        alerts.send_alert(event, subject, message, **options)
        return

    def deliver():
        alerts.send_alert(event, subject, message, **options)

    loop.run_in_executor(None, deliver)


def _hour(now):
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H")


def _usd(amount):
    return f"${Decimal(amount).quantize(Decimal('0.01'))}"


def _who_label(who):
    """The key of a limit counter as a subject may show it: never a client's address."""
    kind, _, value = who.partition(":")
    if kind == "user":
        return f"user #{value}"
    if kind == "client":
        return "a client"
    return "everyone"


def _window(cap):
    if cap.window_ms:
        return f"rolling {cap.window_ms // 1000} s window"
    tz = quota_settings.budget_timezone
    start = datetime.fromtimestamp(cap.starts_at, tz).strftime("%Y-%m-%d %H:%M %Z")
    return f"period since {start}"


def _window_key(cap, now):
    """(dedupe key suffix, seconds the claim must last) of the window ``cap`` is in at ``now``."""
    if cap.window_ms:
        seconds = cap.window_ms / 1000
        return int(now // seconds), seconds
    return int(cap.starts_at), max(60.0, cap.resets_at - now)


class SpendNotifier:
    """Turns spend evaluations into breaker events and operator alerts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hourly_sent = {}  # event -> clock hour already alerted by this process
        # (event, limit, who) -> (period start or None, until): over a threshold, told.
        self._limits_over = {}

    def observe(self, state, budget, now, *, charged):
        """Record and announce what one evaluation changed; never raises."""
        try:
            self._breaker(state, budget, now)
            if charged:
                self._hourly(state, budget, now)
            self._limits(state, now, charged=charged)
        except Exception:  # notifications must never break a charge
            logger.exception("spend notification failed")

    def _breaker(self, state, budget, now):
        before, after = state.breaker_before, state.breaker
        if before == after and not state.tripped:
            return  # the common case: no transition to record
        common = {
            "hour_cost_usd": state.hour_usd,
            "threshold_usd": budget.breaker_threshold_usd,
            "engine": state.engine,
            "at": now,
        }
        hour = _hour(now)
        if state.tripped:
            events.record_breaker_event("opened", **common)
            minutes = max(1, round(int(budget.breaker_cooldown_seconds) / 60))
            _send(
                "breaker_open",
                "Circuit breaker opened",
                f"Spend in the rolling hour reached {_usd(state.hour_usd)}, at or over the "
                f"breaker threshold of {_usd(budget.breaker_threshold_usd)}. Every session was "
                f"ended and new ones are refused for about {minutes} min.",
                dedupe_key=f"opened:{hour}",
                details=self._details(state, budget, now),
            )
        elif before == OPEN and after == HALF_OPEN:
            events.record_breaker_event("half_open", **common)
        elif before in (OPEN, HALF_OPEN) and after == CLOSED:
            events.record_breaker_event("closed", **common)
            _send(
                "breaker_reset",
                "Circuit breaker closed",
                f"The cool-down is over and spend in the rolling hour ({_usd(state.hour_usd)}) "
                "is under the threshold; new sessions are admitted again.",
                dedupe_key=f"closed:{hour}",
                details={**self._details(state, budget, now), "reset_by": "automatic"},
            )

    def _hourly(self, state, budget, now):
        cap = Decimal(budget.hourly_cap_usd)
        if cap <= 0:
            return
        hour = _hour(now)
        for share, event in HOURLY_THRESHOLDS:
            if state.hour_usd < cap * share:
                continue
            with self._lock:
                if self._hourly_sent.get(event) == hour:
                    return
                self._hourly_sent[event] = hour
            percent = int(share * 100)
            _send(
                event,
                f"Hourly spend at {percent} % of the cap",
                f"Spend in the rolling hour is {_usd(state.hour_usd)}, {percent} % or more of "
                f"the hourly cap of {_usd(cap)}."
                + (" New sessions are refused until it drops." if percent >= 100 else ""),
                dedupe_key=f"{event}:{hour}",
                details=self._details(state, budget, now),
            )
            return  # the highest threshold passed is the one worth telling

    def _limits(self, state, now, *, charged):
        would_refuse = {cap for cap in state.over if cap.shadow}
        for cap, micro in state.totals:
            if cap.cap_micro <= 0:
                continue
            if cap.alert_at_percent:
                passed = micro * 100 >= cap.cap_micro * cap.alert_at_percent
                if not passed:
                    self._forget(LIMIT_ALERT, cap)
                elif charged and self._first(LIMIT_ALERT, cap, now):
                    self._limit_alert(state, cap, micro, now)
            if cap.shadow:
                over = micro >= cap.cap_micro
                if not over and cap not in would_refuse:
                    self._forget(SHADOW_OVER, cap)
                elif ((charged and over) or cap in would_refuse) and self._first(
                    SHADOW_OVER, cap, now
                ):
                    self._shadow_over(state, cap, micro, now)

    def _first(self, event, cap, now):
        """True the first time ``event`` fires for this limit, key and window in this process."""
        if cap.window_ms:
            period, until = None, now + cap.window_ms / 1000
        else:
            period, until = int(cap.starts_at), cap.resets_at
        key = (event, cap.name, cap.who)
        with self._lock:
            told = self._limits_over.get(key)
            if told is not None and told[0] == period and now < told[1]:
                return False
            if key not in self._limits_over and len(self._limits_over) >= MAX_REMEMBERED_KEYS:
                self._prune(now)
            self._limits_over[key] = (period, until)
            return True

    def _forget(self, event, cap):
        key = (event, cap.name, cap.who)
        if key in self._limits_over:  # the common case (never told) takes no lock
            with self._lock:
                self._limits_over.pop(key, None)

    def _prune(self, now):
        for key in [k for k, (_, until) in self._limits_over.items() if until <= now]:
            del self._limits_over[key]
        if len(self._limits_over) >= MAX_REMEMBERED_KEYS:  # still full: drop the oldest half
            for key in list(self._limits_over)[: MAX_REMEMBERED_KEYS // 2]:
                del self._limits_over[key]

    def _limit_alert(self, state, cap, micro, now):
        percent = micro * 100 // cap.cap_micro
        spent, limit = from_micro(micro), from_micro(cap.cap_micro)
        bucket, seconds = _window_key(cap, now)
        shadow = " (shadow: never refuses)" if cap.shadow else ""
        _send(
            LIMIT_ALERT,
            f"Spend limit {cap.name}: {_who_label(cap.who)} at {percent} % "
            f"({_usd(spent)} of {_usd(limit)})",
            f"Spend of {_who_label(cap.who)} against limit {cap.name}{shadow} is {_usd(spent)} "
            f"in its {_window(cap)}, {percent} % of the {_usd(limit)} cap (alert at "
            f"{cap.alert_at_percent} %).",
            dedupe_key=f"limit:{cap.name}:{cap.who}:{bucket}",
            details=self._limit_details(state, cap, micro, now),
            dedupe_seconds=seconds,
        )

    def _shadow_over(self, state, cap, micro, now):
        spent, limit = from_micro(micro), from_micro(cap.cap_micro)
        logger.warning(
            "shadow spend limit %s over its cap for %s: $%s of $%s in its %s (not refused)",
            cap.name,
            cap.who,
            spent,
            limit,
            _window(cap),
        )
        bucket, seconds = _window_key(cap, now)
        _send(
            SHADOW_OVER,
            f"Shadow spend limit {cap.name} over its cap for {_who_label(cap.who)} "
            f"({_usd(spent)} of {_usd(limit)})",
            f"Spend of {_who_label(cap.who)} against shadow limit {cap.name} is {_usd(spent)} in "
            f"its {_window(cap)}, at or over the {_usd(limit)} cap. A shadow limit only counts: "
            "nothing was refused. Turn shadow off to enforce it.",
            dedupe_key=f"shadow:{cap.name}:{cap.who}:{bucket}",
            details=self._limit_details(state, cap, micro, now),
            dedupe_seconds=seconds,
        )

    @staticmethod
    def _limit_details(state, cap, micro, now):
        details = {
            "limit": cap.name,
            "key": cap.who.partition(":")[0],
            "who": cap.who,
            "spent_usd": str(from_micro(micro)),
            "cap_usd": str(from_micro(cap.cap_micro)),
            "percent": micro * 100 // cap.cap_micro,
            "alert_at_percent": cap.alert_at_percent,
            "window": _window(cap),
            "shadow": cap.shadow,
            "engine": state.engine,
            "at": datetime.fromtimestamp(now, UTC).isoformat(),
        }
        if cap.resets_at:
            details["resets_at"] = datetime.fromtimestamp(cap.resets_at, UTC).isoformat()
        return details

    def manual_reset(self, actor, state, budget, now):
        """Record and announce a reset by hand (the admin action)."""
        events.record_breaker_event(
            "reset",
            hour_cost_usd=state.hour_usd if state else None,
            threshold_usd=budget.breaker_threshold_usd if budget else None,
            actor=actor,
            engine=state.engine if state else "",
            at=now,
        )
        details = {"reset_by": actor}
        if state is not None and budget is not None:
            details.update(self._details(state, budget, now))
        _send(
            "breaker_reset",
            "Circuit breaker reset by hand",
            f"{actor} reset the circuit breaker; new sessions are admitted again.",
            dedupe_key=f"manual:{actor}:{int(now // 60)}",
            details=details,
        )

    def forget(self):
        """Forget which hourly and limit alerts this process sent (tests)."""
        with self._lock:
            self._hourly_sent.clear()
            self._limits_over.clear()

    @staticmethod
    def _details(state, budget, now):
        return {
            "rolling_hour_usd": str(state.hour_usd),
            "hourly_cap_usd": str(budget.hourly_cap_usd),
            "breaker_threshold_usd": str(budget.breaker_threshold_usd),
            "breaker": state.breaker,
            "engine": state.engine,
            "at": datetime.fromtimestamp(now, UTC).isoformat(),
        }


spend_notifier = SpendNotifier()
