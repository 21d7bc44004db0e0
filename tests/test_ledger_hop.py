"""The ledger hop tidies connections at most once a second, and at once after an error."""

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection

from quotas import ledger_hop as hop_module
from quotas.ledger_hop import (
    close_pooled_connections,
    forget_tidy,
    ledger_hop,
    ledger_pool,
    ledger_threads,
    tidy_connections,
)


@pytest.fixture
def tidies(monkeypatch):
    calls = []
    monkeypatch.setattr(hop_module, "close_old_connections", lambda: calls.append(1))
    forget_tidy()
    yield calls
    forget_tidy()


def test_tidies_once_per_interval(tidies):
    assert tidy_connections(now=100.0) is True
    assert tidy_connections(now=100.5) is False
    assert tidy_connections(now=100.99) is False
    assert tidy_connections(now=101.0) is True
    assert len(tidies) == 2


@pytest.mark.django_db
def test_a_connection_error_tidies_at_once(tidies):
    connection.ensure_connection()
    assert tidy_connections(now=100.0) is True
    connection.errors_occurred = True
    try:
        assert tidy_connections(now=100.1) is True
    finally:
        connection.errors_occurred = False
    assert tidy_connections(now=100.2) is False
    assert len(tidies) == 2


@pytest.mark.django_db(transaction=True)
async def test_hops_within_a_second_check_the_connection_once(
    tidies, monkeypatch, close_worker_connections
):
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: 500.0)})
    monkeypatch.setattr(hop_module, "time", clock)

    def read():
        from django.contrib.auth.models import User

        return User.objects.count()

    for _ in range(5):
        assert await ledger_hop(read)() == 0
    # Before and after the first call would be two with channels' hop; here the interval holds.
    assert len(tidies) == 1


# The pool (QUOTAS_LEDGER_THREADS): sessions' hops overlap where the database allows it.


def thread_name():
    return threading.current_thread().name


def meeting(count):
    """A hop function for ``count`` hops started at once: each names its thread once all of
    them are running, so on fewer threads than hops they cannot all finish (the barrier
    breaks)."""
    started = threading.Barrier(count, timeout=10)

    def meet():
        from django.contrib.auth.models import User

        User.objects.exists()  # a query on this thread's own connection
        started.wait()
        return thread_name()

    return meet


@pytest.mark.django_db(transaction=True)
async def test_hops_overlap_on_a_pool_of_threads(settings):
    if connection.vendor != "postgresql":
        pytest.skip("the pool serves databases with concurrent writers (CI: PostgreSQL)")
    settings.QUOTAS_LEDGER_THREADS = 3
    meet = meeting(3)
    try:
        names = await asyncio.gather(*(ledger_hop(meet)() for _ in range(3)))
    finally:
        await sync_to_async(close_pooled_connections, thread_sensitive=False)()
    assert len(set(names)) == 3
    assert all(name.startswith("ledger") for name in names)


@pytest.mark.django_db(transaction=True)
async def test_sqlite_keeps_one_thread_whatever_the_setting(settings):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite takes one writer at a time")
    settings.QUOTAS_LEDGER_THREADS = 4
    assert ledger_threads() == 1
    names = await asyncio.gather(*(ledger_hop(thread_name)() for _ in range(4)))
    assert len(set(names)) == 1


@pytest.mark.django_db(transaction=True)
def test_below_a_sync_caller_hops_stay_on_its_thread(settings):
    settings.QUOTAS_LEDGER_THREADS = 4

    async def hop():
        assert ledger_pool() is None  # hops must see the sync caller's connection
        return await ledger_hop(thread_name)()

    assert async_to_sync(hop)() == thread_name()


@pytest.mark.parametrize(("value", "threads"), [(4, 4), ("3", 3), (0, 1), ("many", 1), (None, 1)])
def test_the_setting_is_read_safely(settings, monkeypatch, value, threads):
    monkeypatch.setattr(connection, "vendor", "postgresql")
    settings.QUOTAS_LEDGER_THREADS = value
    assert ledger_threads() == threads
