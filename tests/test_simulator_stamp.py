"""The simulator's benchmark stamp: off by default, send order and monotonic time when on."""

import time

import pytest
from channels.testing import WebsocketCommunicator

from ducke.realtime.simulator import RealtimeSimulator
from tests.fixtures.relay import user_text


async def answered_events(**options):
    """Every server event of one text turn answered with audio, as the simulator sent them."""
    sent = []

    async def send(event):
        sent.append(event)

    simulator = RealtimeSimulator(send, model="gpt-realtime", pace=0, **options)
    await simulator.start()
    await simulator.handle(user_text("It crashes"))
    await simulator.handle({"type": "response.create"})
    await simulator._active.task  # the whole answer, up to `rate_limits.updated`
    await simulator.close()
    return sent


async def test_events_carry_no_stamp_by_default():
    events = await answered_events()
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    assert not any("x_seq" in e or "x_sent_ns" in e for e in events)


async def test_stamp_numbers_events_in_send_order_with_monotonic_times():
    before = time.monotonic_ns()
    events = await answered_events(stamp=True)
    after = time.monotonic_ns()
    assert events[-1]["type"] == "rate_limits.updated"
    assert [e["x_seq"] for e in events] == list(range(len(events)))
    times = [e["x_sent_ns"] for e in events]
    assert times == sorted(times)
    assert before <= times[0] and times[-1] <= after


@pytest.fixture
def stamped_app(settings):
    settings.DUCKE_SIMULATOR_ENABLED = True
    settings.DUCKE_SIMULATOR_STAMP = True
    from ducke.routing import websocket_application

    return websocket_application()


@pytest.mark.django_db(transaction=True)  # Channels closes stale connections per message
async def test_consumer_stamps_when_the_setting_is_on(stamped_app):
    communicator = WebsocketCommunicator(stamped_app, "/simulator/v1/realtime?model=gpt-realtime")
    connected, _ = await communicator.connect()
    assert connected
    created = await communicator.receive_json_from()
    assert (created["type"], created["x_seq"]) == ("session.created", 0)
    assert 0 < time.monotonic_ns() - created["x_sent_ns"] < 5 * 10**9
    await communicator.disconnect()
