"""The floor for a relay: an ASGI app that pipes each WebSocket to the upstream and nothing else.

Run it under daphne or uvicorn (``daphne tests.benchmarks.peers.bare_relay:application``) with
``BARE_RELAY_UPSTREAM`` set to a Realtime endpoint. Per session it opens the upstream with the
same client and options as DUCK-E's relay (``websockets``, no compression) and forwards every
text frame both ways as it came: no Django, Channels, session, quota, meter or parsing. What
the relay benchmark measures for it is what the ASGI server and the upstream client cost by
themselves for the same traffic; DUCK-E's relay above that is its own work.
``BARE_RELAY_WORKAROUNDS=1`` applies DUCK-E's server and client workarounds first, as
DUCK-E's ASGI module does (``ducke.server_workarounds.apply_server_workarounds``), and relays
the way DUCK-E's consumer does: a browser frame is written upstream as daphne reads it while
the relay waits for its next message (``take_text_on_arrival``, ``write_upstream_text``),
upstream sends go through ``send_upstream_text`` and frames to the browser through
``browser_text_writer``. The floor then runs on the same server and client code as DUCK-E.
"""

import asyncio
import contextlib
import os
from urllib.parse import urlencode

from websockets.asyncio.client import connect

UPSTREAM = os.environ.get("BARE_RELAY_UPSTREAM", "")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

WORKAROUNDS = os.environ.get("BARE_RELAY_WORKAROUNDS") == "1"
if WORKAROUNDS:
    from ducke.server_workarounds import (
        apply_server_workarounds,
        browser_text_writer,
        send_upstream_text,
        take_text_on_arrival,
        write_upstream_text,
    )

    apply_server_workarounds()


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
    write_browser = browser_text_writer(send) if WORKAROUNDS else None
    waiting = [False]  # for the next message, nothing being forwarded: frames keep their order
    if WORKAROUNDS:
        take_text_on_arrival(
            send, lambda payload: waiting[0] and write_upstream_text(upstream, payload)
        )

    async def downstream():
        async for frame in upstream:
            if isinstance(frame, str) and not (write_browser and write_browser(frame)):
                await send({"type": "websocket.send", "text": frame})

    forwarding = asyncio.ensure_future(downstream())
    try:
        while True:
            waiting[0] = True
            message = await receive()
            waiting[0] = False
            if message["type"] != "websocket.receive":
                break
            if message.get("text") is not None:
                if WORKAROUNDS:
                    await send_upstream_text(upstream, message["text"])
                else:
                    await upstream.send(message["text"])
    finally:
        forwarding.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await forwarding
        await upstream.close()
