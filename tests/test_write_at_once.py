"""``write_at_once``: daphne's TCP connections send a write at once when nothing waits before
it, and buffer what the socket does not take, in order, as Twisted does."""

import functools
import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from ducke.server_workarounds import send_backlog, write_at_once


class Reactor:
    """Records what the connection registers for writability."""

    def __init__(self):
        self.writers = []

    def addWriter(self, writer):
        if writer not in self.writers:  # as a reactor's: registered once
            self.writers.append(writer)

    def removeWriter(self, writer):
        self.writers.remove(writer)

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass


@pytest.fixture
def connection():
    """A Twisted TCP connection on one end of a socket pair; the test reads the other end."""
    write_at_once()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reactor = Reactor()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = True
    yield conn, peer, reactor
    ours.close()
    peer.close()


def read_all(peer, size):
    peer.settimeout(5)
    data = b""
    while len(data) < size:
        data += peer.recv(size - len(data))
    return data


def test_a_write_goes_out_without_waiting_for_the_reactor(connection):
    conn, peer, reactor = connection
    conn.write(b"frame one")
    assert read_all(peer, 9) == b"frame one"
    assert reactor.writers == []  # nothing registered: no epoll_ctl, no later reactor turn


def test_what_the_socket_does_not_take_is_buffered_in_order(connection):
    conn, peer, reactor = connection
    big = bytes(range(256)) * 4096  # 1 MiB: far over the socket buffers
    conn.write(big)
    conn.write(b"after")  # must not overtake the buffered rest
    assert reactor.writers == [conn]
    waiting = len(conn.dataBuffer) - conn.offset + conn._tempDataLen
    assert 0 < waiting < len(big) + 5
    received = b""
    while reactor.writers:
        received += peer.recv(1 << 20)
        conn.doWrite()
    received += read_all(peer, len(big) + 5 - len(received))
    assert received == big + b"after"


def test_a_closing_connection_writes_as_twisted_does(connection):
    conn, _peer, reactor = connection
    conn.disconnecting = True
    conn.write(b"last words")
    assert reactor.writers == [conn]  # buffered for doWrite, which then closes
    assert conn._tempDataLen == len(b"last words")


def test_send_backlog_counts_the_buffered_rest(connection):
    conn, _peer, _reactor = connection
    conn.write(b"x" * (1 << 20))

    async def handle_reply(protocol, message):
        pass

    protocol = type("Protocol", (), {"transport": conn})()
    backlog = send_backlog(functools.partial(handle_reply, protocol))
    assert backlog == len(conn.dataBuffer) - conn.offset + conn._tempDataLen > 0
