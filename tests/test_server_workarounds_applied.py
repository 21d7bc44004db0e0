"""``apply_server_workarounds``: the one call ``ducke.asgi`` and the relay benchmark's floor
make installs every process-wide workaround, and a second call changes nothing."""

from autobahn.websocket import protocol as autobahn_protocol
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import asyncioreactor, tcp
from websockets import frames

from ducke.server_workarounds import (
    UPSTREAM_MASK_KEYS,
    FrameUnmasker,
    Utf8Check,
    apply_server_workarounds,
)


def installed():
    return {
        "close codes": WebSocketProtocol.serverClose,
        "mask keys": frames.secrets,
        "unmasker": autobahn_protocol.create_xor_masker,
        "utf-8": autobahn_protocol.Utf8Validator,
        "whole frames": autobahn_protocol.WebSocketProtocol.processData,
        "on arrival": WebSocketProtocol.onMessage,
        "log context": asyncioreactor.callWithLogger,
        "write at once": tcp.Connection.write,
    }


def test_every_workaround_is_installed_once():
    apply_server_workarounds()
    first = installed()
    assert first["close codes"].allows_server_codes
    assert first["mask keys"] is UPSTREAM_MASK_KEYS
    assert (first["unmasker"], first["utf-8"]) == (FrameUnmasker, Utf8Check)
    assert first["whole frames"].reads_whole_text_frames
    assert first["on arrival"].offers_text
    assert first["log context"].without_context
    assert first["write at once"].writes_at_once
    apply_server_workarounds()
    assert installed() == first
