"""Event recording with bounded growth: refusals, tool calls and breaker transitions.

Hot paths (the HTTP middleware, the connection guard, tool checks, charges) only add to an
in-process buffer under a lock; nothing there touches the database or waits. Counts are
aggregated per (rule, scope, endpoint, shadow, minute) and (tool, status, minute), so a flood
of 429s is one row per minute per rule and endpoint, not one INSERT per refusal.

A daemon thread writes the buffer every ``QUOTAS_EVENT_FLUSH_SECONDS`` (default 5; 0 turns the
thread off, e.g. in tests, which call ``flush()`` themselves) with one upsert per table
(``INSERT ... ON CONFLICT DO UPDATE SET count = count + excluded.count``, on PostgreSQL and
SQLite alike); the interpreter's exit flushes once more (only when the writer is on). A
failed write keeps the counts for the next attempt; past ``MAX_PENDING_KEYS`` distinct keys
new ones are dropped (and logged), so a database outage cannot grow memory without bound.

Public API::

    record_violation(rule, scope, endpoint, *, shadow=False)
    record_tool_call(tool, status)
    record_breaker_event(kind, *, hour_cost_usd=None, threshold_usd=None, actor="system",
                         engine="", at=None)
    flush() -> int   # rows written or updated
    discard()        # forget everything pending (tests)
"""

import atexit
import logging
import threading
import time
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError, connections, transaction

from .conf import quota_settings

logger = logging.getLogger("quotas.events")

MAX_PENDING_KEYS = 10_000
MAX_PENDING_BREAKER_EVENTS = 1_000
_FIELD_MAX = {"rule": 64, "scope": 16, "endpoint": 200, "tool": 64, "status": 32}


def minute_start(timestamp):
    """The aware UTC datetime of the minute ``timestamp`` (POSIX seconds) falls in."""
    return datetime.fromtimestamp(int(timestamp // 60) * 60, UTC)


def _clip(name, value):
    return str(value)[: _FIELD_MAX[name]]


class EventRecorder:
    """Buffers event counts in process and writes them to the database in bulk."""

    def __init__(self, *, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._violations = {}
        self._tool_calls = {}
        self._breaker = []
        self._dropped = 0
        self._thread = None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    # -- recording (never blocks on I/O) --------------------------------------------------

    def _count(self, table, key):
        with self._lock:
            if key in table:
                table[key] += 1
            elif len(table) < MAX_PENDING_KEYS:
                table[key] = 1
            else:
                self._dropped += 1
        self._ensure_thread()

    def record_violation(self, rule, scope, endpoint, *, shadow=False):
        """Count one refused (or shadow-over) hit of ``rule`` at ``endpoint``."""
        key = (
            minute_start(self.clock()),
            _clip("rule", rule),
            _clip("scope", scope),
            _clip("endpoint", endpoint),
            bool(shadow),
        )
        self._count(self._violations, key)

    def record_tool_call(self, tool, status):
        """Count one call of ``tool`` that ended in ``status`` (ok, refused, failed...)."""
        key = (minute_start(self.clock()), _clip("tool", tool), _clip("status", status))
        self._count(self._tool_calls, key)

    def record_breaker_event(
        self,
        kind,
        *,
        hour_cost_usd=None,
        threshold_usd=None,
        actor="system",
        engine="",
        at=None,
    ):
        """Remember one breaker transition (``opened``, ``half_open``, ``closed``, ``reset``)."""
        when = datetime.fromtimestamp(self.clock() if at is None else at, UTC)
        event = {
            "at": when,
            "kind": kind,
            "hour_cost_usd": hour_cost_usd,
            "threshold_usd": threshold_usd,
            "actor": str(actor or "system")[:150],
            "engine": engine,
        }
        with self._lock:
            if len(self._breaker) < MAX_PENDING_BREAKER_EVENTS:
                self._breaker.append(event)
            else:
                self._dropped += 1
        self._ensure_thread()

    # -- writing ----------------------------------------------------------------------------

    def flush(self):
        """Write everything pending (sync; not from an event loop). Returns rows touched."""
        with self._lock:
            violations, self._violations = self._violations, {}
            tool_calls, self._tool_calls = self._tool_calls, {}
            breaker, self._breaker = self._breaker, []
            dropped, self._dropped = self._dropped, 0
        if dropped:
            logger.warning("%d quota events dropped: the event buffer was full", dropped)
        if not (violations or tool_calls or breaker):
            return 0
        try:
            with transaction.atomic():
                written = self._upsert_violations(violations)
                written += self._upsert_tool_calls(tool_calls)
                written += self._insert_breaker_events(breaker)
        except Exception as exc:
            # Keep the counts for the next attempt: a database hiccup must not lose them.
            self._restore(violations, tool_calls, breaker)
            level = logging.WARNING if isinstance(exc, DatabaseError) else logging.ERROR
            logger.log(level, "quota events not written (%s); will retry", exc.__class__.__name__)
            return 0
        return written

    def _restore(self, violations, tool_calls, breaker):
        with self._lock:
            for source, target in ((violations, self._violations), (tool_calls, self._tool_calls)):
                for key, count in source.items():
                    if key in target or len(target) < MAX_PENDING_KEYS:
                        target[key] = target.get(key, 0) + count
            room = MAX_PENDING_BREAKER_EVENTS - len(self._breaker)
            self._breaker[:0] = breaker[: max(0, room)]

    @staticmethod
    def _upsert(model, key_fields, rows):
        """``INSERT ... ON CONFLICT (keys) DO UPDATE SET count = count + excluded.count``."""
        if not rows:
            return 0
        connection = connections[model.objects.db]
        quote = connection.ops.quote_name
        table = quote(model._meta.db_table)
        columns = [model._meta.get_field(name).column for name in (*key_fields, "count")]
        column_list = ", ".join(quote(c) for c in columns)
        keys = ", ".join(quote(c) for c in columns[:-1])
        count = quote(columns[-1])
        placeholders = ", ".join(["%s"] * len(columns))
        sql = (
            f"INSERT INTO {table} ({column_list}) VALUES ({placeholders}) "
            f"ON CONFLICT ({keys}) DO UPDATE SET {count} = {table}.{count} + excluded.{count}"
        )
        fields = [model._meta.get_field(name) for name in key_fields]
        params = [
            [f.get_db_prep_value(v, connection) for f, v in zip(fields, key, strict=True)] + [n]
            for key, n in rows.items()
        ]
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)
        return len(params)

    def _upsert_violations(self, violations):
        from .models import RateLimitViolation

        fields = ("minute", "rule", "scope", "endpoint", "shadow")
        return self._upsert(RateLimitViolation, fields, violations)

    def _upsert_tool_calls(self, tool_calls):
        from .models import ToolCallCount

        return self._upsert(ToolCallCount, ("minute", "tool", "status"), tool_calls)

    @staticmethod
    def _insert_breaker_events(events):
        from .models import BreakerEvent

        BreakerEvent.objects.bulk_create([BreakerEvent(**event) for event in events])
        return len(events)

    def discard(self):
        """Forget every pending event (tests)."""
        with self._lock:
            self._violations, self._tool_calls, self._breaker = {}, {}, []
            self._dropped = 0

    def pending(self):
        """How many keys and breaker events wait for the next flush."""
        with self._lock:
            return len(self._violations) + len(self._tool_calls) + len(self._breaker)

    # -- the background writer ----------------------------------------------------------------

    def _ensure_thread(self):
        if self._thread is not None and self._thread.is_alive():
            return
        if float(quota_settings.EVENT_FLUSH_SECONDS) <= 0:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="quotas-events", daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stopping.is_set():
            interval = float(quota_settings.EVENT_FLUSH_SECONDS)
            if interval <= 0:
                return
            self._wake.wait(interval)
            self._wake.clear()
            if self._stopping.is_set():
                return  # close() flushes, from the thread that asked
            try:
                self.flush()
            finally:
                # This thread's connection must not hold the database (e.g. a test DB drop).
                connections.close_all()

    def stop(self, timeout=5.0):
        """Stop the background writer (after its current flush)."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def close(self):
        """Stop the writer and flush what is left (shutdown), unless the writer is off."""
        self.stop()
        if not settings.configured or float(quota_settings.EVENT_FLUSH_SECONDS) <= 0:
            # Never configured (a script that imported quotas without Django): nothing to do.
            # Off means the owner flushes (tests): at exit the database may be a different one.
            return
        try:
            self.flush()
        except Exception:  # at exit the database may be gone; nothing to do about it
            logger.warning("quota events not written at shutdown")


recorder = EventRecorder()


def record_violation(rule, scope, endpoint, *, shadow=False):
    """Count one refused (or shadow-over) hit of ``rule`` at ``endpoint``; never blocks."""
    recorder.record_violation(rule, scope, endpoint, shadow=shadow)


def record_tool_call(tool, status):
    """Count one tool call ending in ``status`` (ok, refused, failed, invalid...)."""
    recorder.record_tool_call(tool, status)


def record_breaker_event(kind, **fields):
    """Remember one circuit-breaker transition; written with the next flush."""
    recorder.record_breaker_event(kind, **fields)


def flush():
    """Write pending events now (sync); returns rows written or updated."""
    return recorder.flush()


def discard():
    """Forget pending events (tests)."""
    recorder.discard()


atexit.register(recorder.close)
