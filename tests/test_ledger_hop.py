"""The ledger hop tidies connections at most once a second, and at once after an error."""

import pytest
from django.db import connection

from quotas import ledger_hop as hop_module
from quotas.ledger_hop import forget_tidy, ledger_hop, tidy_connections


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
async def test_hops_within_a_second_check_the_connection_once(tidies, monkeypatch):
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: 500.0)})
    monkeypatch.setattr(hop_module, "time", clock)

    def read():
        from django.contrib.auth.models import User

        return User.objects.count()

    for _ in range(5):
        assert await ledger_hop(read)() == 0
    # Before and after the first call would be two with channels' hop; here the interval holds.
    assert len(tidies) == 1
