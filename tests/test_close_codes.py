"""Close codes 1009 and 1011 reach a real browser client through daphne (autobahn)."""

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(60)


async def close_code_after(server, frames):
    origin = server.url.rstrip("/")
    async with connect(f"{server.ws_url}/session", origin=origin, open_timeout=10) as ws:
        for frame in frames:
            await ws.send(frame)
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            pass
        return ws.close_code


async def test_oversized_frame_closes_with_1009(daphne_server_factory):
    server = daphne_server_factory(DUCKE_MAX_FRAME_BYTES="2000")
    frame = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 4000})
    assert await close_code_after(server, [frame]) == 1009


async def test_unreachable_upstream_closes_with_1011(daphne_server_factory):
    server = daphne_server_factory(DUCKE_REALTIME_URL="ws://127.0.0.1:9/v1/realtime")
    assert await close_code_after(server, []) == 1011


def test_other_codes_keep_autobahns_validation():
    from daphne.ws_protocol import WebSocketProtocol

    from ducke.server_workarounds import allow_server_close_codes

    allow_server_close_codes()
    protocol = WebSocketProtocol.__new__(WebSocketProtocol)
    with pytest.raises(Exception, match="invalid close code"):
        protocol.serverClose(1005)  # reserved: never sent on the wire
