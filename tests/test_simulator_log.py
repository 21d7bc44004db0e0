"""The simulator's request log (``DUCKE_SIMULATOR_LOG``): off by default, one line per event."""

import json

import pytest
from channels.testing import WebsocketCommunicator

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/simulator/v1/realtime?model=gpt-realtime"
USER_TEXT = {
    "type": "message",
    "role": "user",
    "content": [{"type": "input_text", "text": "Help me, duck."}],
}


@pytest.fixture
def channels_app(settings):
    settings.DUCKE_SIMULATOR_ENABLED = True
    settings.DUCKE_SIMULATOR_PACE = 0
    from ducke.routing import websocket_application

    return websocket_application()


async def one_response(app):
    communicator = WebsocketCommunicator(app, PATH)
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "session.created"
    await communicator.send_json_to({"type": "conversation.item.create", "item": USER_TEXT})
    await communicator.send_json_to({"type": "response.create"})
    events = []
    while not events or events[-1]["type"] != "response.done":
        events.append(await communicator.receive_json_from(timeout=5))
    await communicator.disconnect()
    return events[-1]["response"]


async def test_log_lists_client_events_and_responses(channels_app, settings, tmp_path):
    log = tmp_path / "simulator.jsonl"
    settings.DUCKE_SIMULATOR_LOG = str(log)
    response = await one_response(channels_app)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line.get("client_event") for line in lines if "client_event" in line] == [
        "conversation.item.create",
        "response.create",
    ]
    done = [line for line in lines if "response_done" in line]
    assert done == [
        {
            "connection": lines[0]["connection"],
            "response_done": response["id"],
            "status": "completed",
        }
    ]


async def test_log_is_off_by_default(channels_app, settings, tmp_path, monkeypatch):
    from ducke.realtime import simulator_consumer

    assert settings.DUCKE_SIMULATOR_LOG == ""
    opened = []
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: opened.append(args))
    response = await one_response(channels_app)
    assert response["status"] == "completed"
    assert opened == []
    assert simulator_consumer.recorder.completed >= 1
