"""``send_backlog``: what daphne's transport still holds for a browser (0 when unknown)."""

from types import SimpleNamespace

from ducke.server_workarounds import send_backlog
from tests.fixtures.daphne_send import daphne_send


def test_counts_the_unwritten_bytes_of_the_transport():
    transport = SimpleNamespace(dataBuffer=b"x" * 1000, offset=400, _tempDataLen=250)
    send = daphne_send(SimpleNamespace(transport=transport))
    assert send_backlog(send) == 600 + 250


def test_unknown_servers_report_nothing():
    async def plain_send(message):
        pass

    assert send_backlog(plain_send) == 0
    assert send_backlog(daphne_send(object())) == 0
    assert send_backlog(daphne_send(SimpleNamespace(transport=None))) == 0


def test_sees_through_the_session_middleware_of_the_auth_stack():
    from channels.sessions import InstanceSessionWrapper

    transport = SimpleNamespace(dataBuffer=b"x" * 500, offset=0, _tempDataLen=0)
    send = daphne_send(SimpleNamespace(transport=transport))
    wrapper = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, send)
    assert send_backlog(wrapper.send) == 500


def test_a_reader_made_once_follows_the_transport():
    from ducke.server_workarounds import backlog_reader

    transport = SimpleNamespace(dataBuffer=b"", offset=0, _tempDataLen=0)
    protocol = SimpleNamespace(transport=transport)
    backlog = backlog_reader(daphne_send(protocol))
    assert backlog() == 0
    transport.dataBuffer, transport._tempDataLen = b"x" * 700, 50
    assert backlog() == 750
    protocol.transport = None  # the connection is gone
    assert backlog() == 0
