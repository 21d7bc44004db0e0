"""What the spend counters tell the operator: breaker transitions and hourly-cap thresholds.

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

Alerts are queued off the event loop when one is running: their dedupe claim is a cache call.
"""

import asyncio
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal

from . import alerts, events

logger = logging.getLogger("quotas.notifications")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
HOURLY_THRESHOLDS = ((Decimal("1.00"), "hourly_100"), (Decimal("0.80"), "hourly_80"))


def _send(event, subject, message, *, dedupe_key, details):
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        alerts.send_alert(event, subject, message, dedupe_key=dedupe_key, details=details)
        return

    def deliver():
        alerts.send_alert(event, subject, message, dedupe_key=dedupe_key, details=details)

    loop.run_in_executor(None, deliver)


def _hour(now):
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H")


def _usd(amount):
    return f"${Decimal(amount).quantize(Decimal('0.01'))}"


class SpendNotifier:
    """Turns spend evaluations into breaker events and operator alerts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hourly_sent = {}  # event -> clock hour already alerted by this process

    def observe(self, state, budget, now, *, charged):
        """Record and announce what one evaluation changed; never raises."""
        try:
            self._breaker(state, budget, now)
            if charged:
                self._hourly(state, budget, now)
        except Exception:  # notifications must never break a charge
            logger.exception("spend notification failed")

    def _breaker(self, state, budget, now):
        before, after = state.breaker_before, state.breaker
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
        """Forget which hourly alerts this process sent (tests)."""
        with self._lock:
            self._hourly_sent.clear()

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
