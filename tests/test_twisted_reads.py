"""``read_without_log_context``: Twisted's asyncio reactor reads without a log context, and
still logs what escapes a read."""

import pytest
from twisted.internet import asyncioreactor
from twisted.python import log

from ducke.server_workarounds import read_without_log_context


class Selectable:
    def logPrefix(self):
        return "WebSocketProtocol,1,127.0.0.1"


@pytest.fixture
def lean_reads():
    read_without_log_context()
    read_without_log_context()  # idempotent
    return asyncioreactor.callWithLogger


def test_the_call_is_made_without_a_context(lean_reads):
    seen = []

    def read(*args, **kwargs):
        seen.append((args, kwargs, log.context.get("system")))
        return "why"

    assert lean_reads(Selectable(), read, 1, read=True) == "why"
    assert seen == [((1,), {"read": True}, None)]


def test_what_escapes_a_read_is_logged_with_the_prefix(lean_reads, monkeypatch):
    logged = []
    monkeypatch.setattr(log, "err", lambda **kwargs: logged.append(kwargs))

    def failing_read():
        raise RuntimeError("boom")

    assert lean_reads(Selectable(), failing_read) is None
    assert logged == [{"system": "WebSocketProtocol,1,127.0.0.1"}]

    def interrupted_read():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lean_reads(Selectable(), interrupted_read)
