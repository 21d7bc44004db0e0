"""``UpstreamConnection``: the relay's upstream client reads what websockets' own reads.

Two websockets client connections, the stock ``ClientConnection`` and ``UpstreamConnection``,
each on an in-memory transport, receive the same bytes (the opening handshake's response,
then a stream of server frames) cut into the same reads: what upstream sends (whole text
frames, small and over 125 or 65535 bytes) mixed with what must take websockets' own path
(fragments, a message inside a fragmented one, binary, ping, pong, close, masked or RSV
frames, invalid UTF-8, frames over the size limit, a stream cut short). Both must yield the
same messages, end the same way and write the same bytes back.
"""

import asyncio
import struct
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

from ducke.server_workarounds import UpstreamConnection
from tests.fixtures.frame_streams import cut, frame, non_minimal, text_message, with_rsv1
from tests.fixtures.upstream_connection import MAX_SIZE, open_upstream_connection

TEXT = st.text(max_size=200).map(str.encode)
FRAMES = st.one_of(
    TEXT.map(lambda payload: frame(Opcode.TEXT, payload)),  # what upstream sends
    st.integers(126, 2000).map(lambda n: frame(Opcode.TEXT, b"d" * n)),
    st.just(frame(Opcode.TEXT, b"e" * 65_536)),  # a 64-bit length
    st.just(frame(Opcode.TEXT, b"f" * (MAX_SIZE + 1))),  # over the limit
    st.binary(max_size=100).map(lambda payload: frame(Opcode.BINARY, payload)),
    st.lists(TEXT, min_size=2, max_size=3).map(lambda parts: text_message(parts, mask=False)),
    st.tuples(TEXT, TEXT).map(  # a new message inside a fragmented one: a violation
        lambda parts: frame(Opcode.TEXT, parts[0], fin=False) + frame(Opcode.TEXT, parts[1])
    ),
    st.binary(max_size=20).map(lambda payload: frame(Opcode.PING, payload)),
    st.binary(max_size=20).map(lambda payload: frame(Opcode.PONG, payload)),
    st.just(frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye")),
    st.binary(min_size=1, max_size=8).map(lambda b: frame(Opcode.TEXT, b"ok\xc3" + b)),
    TEXT.map(lambda payload: frame(Opcode.TEXT, payload, mask=True)),
    TEXT.map(lambda payload: with_rsv1(frame(Opcode.TEXT, payload))),
    TEXT.filter(lambda payload: len(payload) < 126).map(
        lambda payload: non_minimal(payload, mask=False)
    ),
    st.just(frame(Opcode.CONT, b"stray")),
)


async def read(connection_class, frames, points, truncate):
    connection, transport, response = open_upstream_connection(connection_class)
    protocol = connection.protocol
    sent = b"".join(frames)
    stream = response + sent[: len(sent) - truncate]
    for piece in cut(stream, points):
        connection.data_received(piece)
    connection.eof_received()
    connection.connection_lost(None)
    messages, ending = [], None
    while ending is None:
        try:
            messages.append(await asyncio.wait_for(connection.recv(), 1))
        except ConnectionClosed as closed:
            ending = (type(closed).__name__, closed.rcvd, closed.sent)
        except Exception as error:  # e.g. a decoding error: recorded, compared
            ending = (type(error).__name__, str(error), None)
    assert protocol.handshake_exc is None, protocol.handshake_exc  # the stream was read
    return {
        "messages": messages,
        "ending": repr(ending),
        "written": transport.written[1:],  # after the request, whose key is random
        "state": protocol.state,
    }


def fixed_masks():
    """The client masks its frames (pongs, close) with fixed keys, so writes compare."""
    from websockets import frames

    keys = type("Keys", (), {"token_bytes": staticmethod(lambda n: b"\0" * n)})
    return mock.patch.object(frames, "secrets", keys)


@settings(max_examples=300)
@given(
    st.lists(FRAMES, max_size=6),
    st.lists(st.integers(0, 200_000), max_size=6),
    st.sampled_from([0, 0, 0, 1, 3]),
)
def test_upstream_frames_are_read_as_websockets_reads_them(frames, points, cut_by):
    async def both():
        ours = await read(UpstreamConnection, frames, points, cut_by)
        theirs = await read(ClientConnection, frames, points, cut_by)
        return ours, theirs

    with fixed_masks():
        ours, theirs = asyncio.run(both())
    assert ours == theirs


async def test_plain_text_frames_skip_websockets_parser(monkeypatch):
    from websockets import protocol as websockets_protocol

    parsed = []
    original = websockets_protocol.Protocol.receive_data
    monkeypatch.setattr(
        websockets_protocol.Protocol,
        "receive_data",
        lambda self, data: (parsed.append(len(data)), original(self, data)),
    )
    delta = b'{"type": "response.output_audio.delta", "delta": "' + b"QUJD" * 1600 + b'"}'
    result = await read(UpstreamConnection, [frame(Opcode.TEXT, delta)] * 3, [10, 500], 0)
    assert result["messages"] == [delta.decode()] * 3
    assert len(parsed) == 1  # the handshake response only
