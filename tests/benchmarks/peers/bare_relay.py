"""The floor for a relay: an ASGI app that pipes each WebSocket to the upstream and nothing else.

Run it under daphne or uvicorn (``daphne tests.benchmarks.peers.bare_relay:application``) with
``BARE_RELAY_UPSTREAM`` set to a Realtime endpoint. Per session it opens the upstream with the
same client and options as DUCK-E's relay (``websockets``, no compression) and forwards every
text frame both ways as it came: no Django, Channels, session, quota, meter or parsing. What
the relay benchmark measures for it is what the ASGI server and the upstream client cost by
themselves for the same traffic; DUCK-E's relay above that is its own work.
``BARE_RELAY_WORKAROUNDS=1`` applies DUCK-E's server and client workarounds first
(``ducke.server_workarounds``: ``speed_up_autobahn_frames``, ``write_at_once``,
``batch_mask_keys``), as DUCK-E's ASGI module does, so that the floor runs on the same server
and client code as DUCK-E.
"""

import asyncio
import contextlib
import os
from urllib.parse import urlencode

from websockets.asyncio.client import connect

UPSTREAM = os.environ.get("BARE_RELAY_UPSTREAM", "")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

if os.environ.get("BARE_RELAY_WORKAROUNDS") == "1":
    from ducke.server_workarounds import batch_mask_keys, speed_up_autobahn_frames, write_at_once

    speed_up_autobahn_frames()
    write_at_once()
    batch_mask_keys()


async def application(scope, receive, send):
    if scope["type"] == "http":  # /status answers (the harness waits for it), the rest 404
        found = scope["path"] == "/status"
        await send({"type": "http.response.start", "status": 200 if found else 404, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status": "ok"}' if found else b""})
        return
    if scope["type"] != "websocket":
        return  # lifespan: nothing to set up
    if (await receive())["type"] != "websocket.connect":
        return
    model = dict(
        pair.split("=", 1) for pair in scope.get("query_string", b"").decode().split("&") if pair
    ).get("model", "gpt-realtime")
    upstream = await connect(
        f"{UPSTREAM}?{urlencode({'model': model})}", compression=None, max_size=MAX_MESSAGE_BYTES
    )
    await send({"type": "websocket.accept"})

    async def downstream():
        async for frame in upstream:
            if isinstance(frame, str):
                await send({"type": "websocket.send", "text": frame})

    forwarding = asyncio.ensure_future(downstream())
    try:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                break
            if message.get("text") is not None:
                await upstream.send(message["text"])
    finally:
        forwarding.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await forwarding
        await upstream.close()
