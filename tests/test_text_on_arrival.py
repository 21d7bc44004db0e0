"""Browser frames taken on arrival: ``offer_text_on_arrival``/``take_text_on_arrival`` (daphne)
and the relay's ``_take_audio_on_arrival``.

daphne's ``onMessage`` offers a text message to the connection's receiver only when nothing
waits in the application's queue; through a real daphne, a browser's audio chunks and other
events reach upstream in the order the browser sent them.
"""

import asyncio
import base64
import json

import pytest
from daphne.ws_protocol import WebSocketProtocol
from websockets.asyncio.client import connect

from ducke.server_workarounds import offer_text_on_arrival, take_text_on_arrival
from tests.fixtures.daphne_send import daphne_send
from tests.fixtures.waiting import wait_for

offer_text_on_arrival()


def daphne_protocol():
    """daphne's protocol object as ``onMessage`` sees it once the socket is open."""
    protocol = WebSocketProtocol.__new__(WebSocketProtocol)
    protocol.muted = False
    protocol.last_ping = 0.0
    protocol.application_queue = asyncio.Queue()
    protocol.client_addr = ("127.0.0.1", 5000)
    return protocol


def test_a_taken_message_is_not_queued():
    protocol = daphne_protocol()
    taken = []
    take_text_on_arrival(daphne_send(protocol), lambda p: taken.append(p) or True)
    protocol.onMessage(b'{"type": "x"}', False)
    assert taken == [b'{"type": "x"}']
    assert protocol.application_queue.empty()
    assert protocol.last_ping > 0  # as daphne's own onMessage keeps it


def test_declined_binary_muted_and_queued_behind_go_through_daphne():
    protocol = daphne_protocol()
    offered = []

    def receiver(payload):
        offered.append(payload)
        return payload == b"take"

    take_text_on_arrival(daphne_send(protocol), receiver)
    protocol.onMessage(b"decline", False)
    protocol.onMessage(b"take", False)  # something waits in the queue: not offered
    protocol.onMessage(b"\x00\x01", True)
    assert offered == [b"decline"]
    queued = [protocol.application_queue.get_nowait() for _ in range(3)]
    assert queued == [
        {"type": "websocket.receive", "text": "decline"},
        {"type": "websocket.receive", "text": "take"},
        {"type": "websocket.receive", "bytes": b"\x00\x01"},
    ]
    protocol.muted = True
    protocol.onMessage(b"take", False)
    assert protocol.application_queue.empty() and offered == [b"decline"]
    protocol.muted = False
    protocol.onMessage(b"take", False)
    assert protocol.application_queue.empty() and offered[-1] == b"take"


def test_other_servers_are_left_alone():
    async def plain_send(message):
        pass

    take_text_on_arrival(plain_send, lambda payload: True)  # nothing to install on: no error
    assert WebSocketProtocol.text_receiver is None


def audio_frame(index, compact):
    pcm = bytes([index % 256]) * 960  # 20 ms of pcm16 at 24 kHz
    event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    return json.dumps(event, separators=(",", ":") if compact else (", ", ": "))


@pytest.mark.timeout(90)
async def test_the_browsers_events_reach_upstream_in_order(daphne_server_factory, tmp_path):
    log = tmp_path / "simulator.jsonl"
    server = daphne_server_factory(DUCKE_SIMULATOR_LOG=str(log), DUCKE_SIMULATOR_PACE="0")
    sent = []
    async with connect(
        f"{server.ws_url}/session", origin=server.url, compression=None, max_size=None
    ) as browser:
        while json.loads(await browser.recv())["type"] != "session.updated":
            pass
        for burst in range(20):
            # A burst in one write: audio, then an event that takes the sanitizing path, then
            # audio again, read by daphne together.
            frames = [audio_frame(burst * 3 + i, compact=i % 2 == 0) for i in range(2)]
            item = {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": f"note {burst}"}],
                },
            }
            frames.insert(1, json.dumps(item))
            for frame in frames:
                await browser.send(frame)
            sent += ["input_audio_buffer.append", "item", "input_audio_buffer.append"]
        await browser.send(audio_frame(999, compact=True))
        sent.append("input_audio_buffer.append")
        # The simulator logs what it reads: wait for the last chunk.
        await wait_for(
            lambda: log.exists() and log.read_text().count("input_audio_buffer.append") >= 41,
            5,
            "the simulator logged fewer than the 41 audio chunks sent",
            interval=0.05,
        )
    seen = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        kind = entry.get("client_event")
        if kind == "input_audio_buffer.append":
            seen.append(kind)
        elif kind == "conversation.item.create":
            seen.append("item")
    assert seen == sent
