"""``read_whole_text_frames``: autobahn reads what it read before, whole text frames in one step.

Two real autobahn server protocols on Twisted test transports read the same byte streams,
cut into the same TCP reads: one with autobahn's own ``processData``, one with the
workaround's. Streams mix what browsers send (whole masked text frames, small and over 125
bytes) with what must take autobahn's path (fragments, binary, ping, close, invalid UTF-8,
unmasked or RSV frames, non-minimal lengths, frames over the size limits). Both must deliver
the same messages, write the same bytes back and end in the same state.
"""

import struct

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Opcode

from ducke.server_workarounds import read_whole_text_frames, speed_up_autobahn_frames
from tests.fixtures.autobahn_protocol import Recorder, open_protocol
from tests.fixtures.frame_streams import cut, frame, non_minimal, text_message, with_rsv1

read_whole_text_frames()
speed_up_autobahn_frames()  # as under daphne (ducke.asgi installs both)
WHOLE_FRAMES = WebSocketProtocol.processData
AUTOBAHNS = WHOLE_FRAMES.autobahns


class Messages(Recorder):
    """Records each message with its kind (text or binary)."""

    def onMessage(self, payload, is_binary):
        self.factory.messages.append((payload, is_binary))


class AutobahnsOwn(Messages):
    processData = AUTOBAHNS


def masked(opcode, payload, fin=True):
    return frame(opcode, payload, fin, mask=True)


TEXT = st.text(max_size=300).map(str.encode)
FRAMES = st.one_of(
    TEXT.map(lambda payload: masked(Opcode.TEXT, payload)),  # what browsers send
    st.binary(min_size=126, max_size=3000).map(lambda b: masked(Opcode.TEXT, b.hex().encode())),
    st.binary(max_size=200).map(lambda payload: masked(Opcode.BINARY, payload)),
    st.lists(TEXT, min_size=2, max_size=3).map(lambda parts: text_message(parts, mask=True)),
    st.binary(max_size=20).map(lambda payload: masked(Opcode.PING, payload)),
    st.binary(max_size=20).map(lambda payload: masked(Opcode.PONG, payload)),
    st.just(masked(Opcode.CLOSE, struct.pack("!H", 1000))),
    st.binary(min_size=1, max_size=30).map(lambda b: masked(Opcode.TEXT, b"ok\xc3" + b)),
    TEXT.map(lambda payload: frame(Opcode.TEXT, payload)),
    TEXT.map(lambda payload: with_rsv1(masked(Opcode.TEXT, payload))),
    TEXT.filter(lambda payload: len(payload) < 126).map(
        lambda payload: non_minimal(payload, mask=True)
    ),
    st.just(masked(Opcode.CONT, b"stray")),
)


def read(protocol_class, stream, points, **options):
    protocol, transport, messages = open_protocol(protocol_class, **options)
    for piece in cut(stream, points):
        protocol.dataReceived(piece)
    return {
        "messages": messages,
        "written": transport.value(),
        "disconnecting": transport.disconnecting,
        "state": protocol.state,
        "reason": protocol.wasNotCleanReason,
        "buffered": protocol.data,
    }


@settings(max_examples=600)
@given(
    st.lists(FRAMES, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.sampled_from([{}, {"maxFramePayloadSize": 200}, {"maxMessagePayloadSize": 300}]),
)
def test_whole_frames_are_read_as_autobahn_reads_them(frames, points, limits):
    stream = b"".join(frames)
    assert read(Messages, stream, points, **limits) == read(AutobahnsOwn, stream, points, **limits)


def test_a_browsers_audio_frame_takes_the_whole_frame_path(monkeypatch):
    protocol, transport, messages = open_protocol(Messages)
    monkeypatch.setattr(
        WebSocketProtocol, "onFrameBegin", lambda self: pytest.fail("autobahn's path was taken")
    )
    frame = b'{"type": "input_audio_buffer.append", "audio": "' + b"QUJD" * 800 + b'"}'
    protocol.dataReceived(masked(Opcode.TEXT, frame) + masked(Opcode.TEXT, b"{}"))
    assert messages == [(frame, False), (b"{}", False)]
    assert protocol.data == b"" and transport.value() == b""


def test_a_frame_cut_across_reads_is_read_once_whole():
    protocol, _transport, messages = open_protocol(Messages)
    wire = masked(Opcode.TEXT, "caf\u00e9".encode() * 100)
    protocol.dataReceived(wire[:3])
    protocol.dataReceived(wire[3:200])
    assert messages == []
    protocol.dataReceived(wire[200:])
    assert messages == [("caf\u00e9".encode() * 100, False)]


def test_a_message_listener_gets_autobahns_path():
    protocol, _transport, messages = open_protocol(Messages)
    heard = []
    protocol.on("message", lambda payload, is_binary: heard.append(payload))
    protocol.dataReceived(masked(Opcode.TEXT, b"hello"))
    assert messages == [(b"hello", False)] and heard == [b"hello"]
