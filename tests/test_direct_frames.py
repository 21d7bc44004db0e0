"""Frames the relay writes itself: ``browser_text_writer`` (daphne's side) and
``send_upstream_text`` (the websockets client's side).

Each must put on the wire exactly what the library's own send path puts there, and leave
every case it does not handle to that path.
"""

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from ducke.server_workarounds import browser_text_writer, frame_header, send_upstream_text
from tests.fixtures.autobahn_protocol import open_protocol
from tests.fixtures.daphne_send import daphne_send
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(30)

TEXTS = ["", "{}", "x" * 125, "caf\u00e9 \u2603" * 30, "y" * 126, "z" * 65535, "w" * 65536]


# daphne's side


@pytest.mark.parametrize("text", TEXTS)
def test_the_browser_gets_the_frame_autobahn_would_send(text):
    protocol, transport, _ = open_protocol()
    assert browser_text_writer(daphne_send(protocol))(text) is True
    ours = transport.value()
    transport.clear()
    protocol.sendMessage(text.encode(), False)
    assert ours == transport.value()


def test_headers_use_the_shortest_length_encoding():
    assert frame_header(125, False) == b"\x81\x7d"
    assert frame_header(126, True) == b"\x81\xfe\x00\x7e"
    assert frame_header(65536, False) == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_what_autobahn_must_handle_is_left_to_it():
    protocol, transport, _ = open_protocol(autoFragmentSize=1000)
    assert browser_text_writer(daphne_send(protocol))("hello") is False
    protocol, transport, _ = open_protocol(maxMessagePayloadSize=10)
    write = browser_text_writer(daphne_send(protocol))
    assert write("short") is True
    assert write("longer than ten") is False
    protocol.sendClose(1000)
    assert write("after close") is False  # closing: autobahn's own send decides
    assert transport.value().count(b"short") == 1


def test_other_servers_get_no_direct_writes():
    async def plain_send(message):
        pass

    assert browser_text_writer(plain_send)("hello") is False


# The websockets client's side


@pytest.fixture
async def echo_server():
    received = []

    async def record(websocket):
        async for message in websocket:
            received.append(message)

    async with serve(record, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}", received


async def test_upstream_gets_every_text_whole_and_in_order(echo_server):
    url, received = echo_server
    async with connect(url, compression=None, max_size=None) as upstream:
        for index, text in enumerate(TEXTS * 2):
            if index % 3:
                await send_upstream_text(upstream, text)
            else:
                await upstream.send(text)  # interleaved with websockets' own sends
        await wait_for(lambda: len(received) == 2 * len(TEXTS), 5, "not received", interval=0.01)
    assert received == TEXTS * 2


async def test_frames_are_masked_with_fresh_keys(echo_server):
    url, _ = echo_server
    async with connect(url, compression=None) as upstream:
        written = []
        write = upstream.transport.write
        upstream.transport.write = lambda data: (written.append(data), write(data))
        for _ in range(20):
            await send_upstream_text(upstream, "same text")
        upstream.transport.write = write
    assert len(written) == 20
    assert all(frame[1] & 0x80 for frame in written)  # the mask bit
    assert len({frame[2:6] for frame in written}) >= 19  # keys from the OS's CSPRNG
    assert all(b"same text" not in frame for frame in written)


async def test_a_paused_or_compressed_connection_goes_through_websockets(echo_server):
    url, received = echo_server
    async with connect(url) as upstream:  # permessage-deflate negotiated
        assert upstream.protocol.extensions
        await send_upstream_text(upstream, "compressed")
    async with connect(url, compression=None) as upstream:
        sent = []
        original = upstream.send

        async def counting_send(message, text=None):
            sent.append(message)
            await original(message)

        upstream.send = counting_send
        await send_upstream_text(upstream, "direct")
        assert sent == []
        upstream.paused = True  # the transport's buffer is full: websockets waits for it
        paused = asyncio.ensure_future(send_upstream_text(upstream, "while paused"))
        await asyncio.sleep(0.05)
        assert sent == ["while paused"] and not paused.done()
        upstream.resume_writing()
        await paused
        fragmented = asyncio.get_running_loop().create_future()
        upstream.send_in_progress = fragmented  # as while websockets sends a fragmented message
        task = asyncio.ensure_future(send_upstream_text(upstream, "after a fragmented send"))
        await asyncio.sleep(0)
        assert not task.done()  # it waits its turn in websockets' own send
        upstream.send_in_progress = None
        fragmented.set_result(None)
        await task
        assert sent == ["while paused", "after a fragmented send"]
        await wait_for(lambda: len(received) == 4, 5, "not received", interval=0.01)
    assert received == ["compressed", "direct", "while paused", "after a fragmented send"]


async def test_a_closed_connection_raises_as_websockets_does(echo_server):
    url, _ = echo_server
    async with connect(url, compression=None) as upstream:
        pass
    with pytest.raises(ConnectionClosed):
        await send_upstream_text(upstream, "too late")
