"""``speed_up_autobahn_frames``: autobahn reads and writes frames as it did, with C helpers.

The helpers are held to autobahn's own (``autobahn.websocket.xormasker`` and
``utf8validator``, which the workaround leaves untouched), then a real autobahn server
protocol on a Twisted test transport reads masked, fragmented frames with them installed.
"""

import os

import pytest
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given, settings
from hypothesis import strategies as st

from ducke.server_workarounds import FrameUnmasker, Utf8Check, speed_up_autobahn_frames
from tests.fixtures.autobahn_protocol import open_protocol
from tests.fixtures.frame_streams import split, text_message


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=4), st.binary(max_size=600), st.lists(st.integers(0, 600)))
def test_unmasking_in_pieces_matches_autobahns_masker(mask, payload, cuts):
    ours, theirs = FrameUnmasker(mask, len(payload)), create_xor_masker(mask, len(payload))
    for piece in split(payload, cuts):
        assert ours.process(piece) == theirs.process(piece)
        assert ours.pointer() == theirs.pointer()
    ours.reset()
    assert ours.pointer() == 0
    assert FrameUnmasker(mask).process(ours.process(payload)) == payload  # XOR undoes itself


UTF8_PIECES = st.lists(
    st.one_of(
        st.text(max_size=8).map(lambda text: text.encode("utf-8")),
        st.binary(max_size=4),  # arbitrary bytes: often invalid or cut code points
    ),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(UTF8_PIECES, st.lists(st.integers(0, 80)))
def test_utf8_check_agrees_with_autobahns_validator(pieces, cuts):
    ours, theirs = Utf8Check(), Utf8Validator()
    for chunk in split(b"".join(pieces), cuts):
        mine, reference = ours.validate(chunk), theirs.validate(chunk)
        assert mine[:2] == reference[:2]
        if not reference[0]:
            # autobahn points at the octet that broke the sequence, CPython at where the
            # sequence began: at most three octets earlier.
            assert reference[3] - 3 <= mine[3] <= reference[3]
            break
        assert mine[2:] == reference[2:]


def test_a_reset_starts_a_new_message():
    check = Utf8Check()
    assert check.validate(b"caf\xc3") == (True, False, 4, 4)
    check.reset()
    assert check.validate(b"(") == (True, True, 1, 1)  # the cut code point is forgotten


@pytest.fixture
def autobahn_sped_up():
    speed_up_autobahn_frames()
    assert autobahn_protocol.create_xor_masker is FrameUnmasker
    assert autobahn_protocol.Utf8Validator is Utf8Check


def test_autobahn_reads_fragmented_masked_messages_whole(autobahn_sped_up):
    protocol, transport, messages = open_protocol()
    text = (
        '{"type": "conversation.item.create", "text": "caf\u00e9 \u2603 ' + "x" * 5000 + '"}'
    ).encode()
    cut = text.index("\u2603".encode()) + 1  # a fragment ends inside a code point
    hex_text = os.urandom(2000).hex().encode()
    wire = text_message([text[:cut], text[cut:]], mask=True) + text_message([hex_text], mask=True)
    for piece in split(wire, range(0, len(wire), 1400)):  # TCP reads of any size
        protocol.dataReceived(piece)
    assert messages[0] == text
    assert len(messages) == 2 and len(messages[1]) == 4000
    assert transport.value() == b""  # nothing failed, nothing to answer


def test_autobahn_fails_a_connection_that_sends_invalid_utf8(autobahn_sped_up):
    protocol, transport, messages = open_protocol()
    protocol.dataReceived(text_message([b'{"type": "x", "text": "ok\xc3(" }'], mask=True))
    assert messages == []
    assert transport.disconnecting  # dropped (autobahn's failByDrop), as without the helpers
    assert "invalid UTF-8" in protocol.wasNotCleanReason
    assert "octet index 25" in protocol.wasNotCleanReason  # where the bad sequence begins


def test_autobahn_colours_no_debug_arguments_per_frame(autobahn_sped_up, monkeypatch):
    import autobahn.util

    def no_colouring(*args, **kwargs):
        raise AssertionError("autobahn formatted a debug argument")

    monkeypatch.setattr(autobahn.util, "hl", no_colouring)
    protocol, transport, messages = open_protocol()
    protocol.dataReceived(text_message([b'{"type": "input_audio_buffer.append"}'], mask=True))
    protocol.sendMessage(b'{"type": "response.output_audio.delta"}', False)
    assert messages == [b'{"type": "input_audio_buffer.append"}']
    assert transport.value().endswith(b'{"type": "response.output_audio.delta"}')
