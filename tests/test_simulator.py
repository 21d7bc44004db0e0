"""The local Realtime simulator speaks the GA protocol: driven by the official openai SDK,
by a raw `websockets` client (error cases, faults) and through the channels consumer."""

import asyncio
import base64
import json
import time

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from openai import AsyncOpenAI
from openai.types.realtime import ResponseDoneEvent
from openai.types.realtime.realtime_response_usage import RealtimeResponseUsage
from websockets.asyncio.client import connect as ws_connect

from ducke.realtime import duck_replies
from ducke.realtime.simulator import RealtimeSimulator, SimulatorRecorder
from ducke.realtime.synth import (
    EnergyVad,
    frame_rms,
    pcm_seconds,
    silence_pcm,
    speech_like_pcm,
)
from tests.fixtures.simulator import simulator  # noqa: F401

WEATHER_TOOL = {
    "type": "function",
    "name": "get_current_weather",
    "description": "Current weather for a place.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
SEARCH_TOOL = {
    "type": "function",
    "name": "web_search",
    "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
SHORT_QUESTION = "It crashes"  # its reply is about 3.7 s of audio


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode("ascii")


def check_usage_sums(usage: dict) -> None:
    """Every total in a usage block equals the sum of its parts."""
    inp, out = usage["input_token_details"], usage["output_token_details"]
    cached = inp["cached_tokens_details"]
    assert usage["input_tokens"] == inp["text_tokens"] + inp["audio_tokens"] + inp["image_tokens"]
    assert usage["output_tokens"] == out["text_tokens"] + out["audio_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert inp["cached_tokens"] == cached["text_tokens"] + cached["audio_tokens"]
    assert cached["text_tokens"] <= inp["text_tokens"]
    assert cached["audio_tokens"] <= inp["audio_tokens"]


class RawClient:
    """A plain `websockets` client that reads JSON events, for checks below the SDK."""

    def __init__(self, ws):
        self.ws = ws

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def recv(self, within: float = 5) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), within))

    async def until(self, event_type: str, within: float = 10) -> list[dict]:
        """Events received up to and including the first of `event_type`."""
        seen = []
        deadline = time.monotonic() + within
        while True:
            event = await self.recv(max(0.01, deadline - time.monotonic()))
            seen.append(event)
            if event["type"] == event_type:
                return seen


async def raw_client(server, query: str = "model=gpt-realtime"):
    ws = await ws_connect(f"{server.url}?{query}")
    client = RawClient(ws)
    created = await client.recv()
    assert created["type"] == "session.created"
    return client


# ------------------------------------------------------------------- through the official SDK


async def test_sdk_drives_a_text_turn_with_audio_answer(simulator):
    client = AsyncOpenAI(api_key="sk-test", websocket_base_url=simulator.base_url)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        assert created.session.model == "gpt-realtime"
        assert created.session.id.startswith("sess_")
        assert created.session.audio.input.turn_detection.type == "server_vad"
        await conn.session.update(
            session={"type": "realtime", "instructions": "Be a duck.", "tools": [WEATHER_TOOL]}
        )
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.instructions == "Be a duck."
        assert updated.session.tools[0].name == "get_current_weather"
        assert updated.session.audio.output.voice == "alloy"  # untouched fields stay
        await conn.conversation.item.create(item=user_text("My loop never ends."))
        await conn.response.create()
        audio = bytearray()
        transcript = []
        types = []
        async for event in conn:
            types.append(event.type)
            assert event.event_id
            if event.type == "response.output_audio.delta":
                audio += base64.b64decode(event.delta)
            elif event.type == "response.output_audio_transcript.delta":
                transcript.append(event.delta)
            elif event.type == "response.output_audio_transcript.done":
                final_transcript = event.transcript
            elif event.type == "response.done":
                done = event
                break
    assert isinstance(done, ResponseDoneEvent)
    for expected in (
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_audio.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert expected in types
    assert types.index("response.created") < types.index("response.output_audio.delta")
    assert "".join(transcript) == final_transcript
    assert final_transcript == duck_replies.reply_to_user("My loop never ends.")
    seconds = pcm_seconds(len(audio))
    assert seconds == pytest.approx(len(final_transcript) / 14, rel=0.05)
    assert frame_rms(bytes(audio)) > 0.03  # speech-like, not silence
    usage = done.response.usage
    assert isinstance(usage, RealtimeResponseUsage)
    assert done.response.status == "completed"
    assert done.response.output[0].content[0].transcript == final_transcript
    check_usage_sums(usage.model_dump())
    assert usage.output_token_details.audio_tokens == round(seconds * 20)
    assert usage.output_token_details.text_tokens == -(-len(final_transcript) // 4)
    assert usage.input_token_details.cached_tokens == 0  # first turn: nothing billed before
    assert usage.input_token_details.text_tokens > len("Be a duck.My loop never ends.") // 4
    assert simulator.recorder.completed == 1
    assert simulator.recorder.usages()[0] == usage.model_dump(exclude_none=True)
    assert simulator.recorder.client_event_types() == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]


async def test_spoken_turn_vad_transcription_and_answer(simulator):
    speech = speech_like_pcm(1.5, seed=7)
    audio = speech + silence_pcm(0.7)
    client = AsyncOpenAI(api_key="sk-test", websocket_base_url=simulator.base_url)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.recv()
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            }
        )
        assert (await conn.recv()).type == "session.updated"
        for start in range(0, len(audio), 4800):  # 100 ms chunks
            await conn.input_audio_buffer.append(audio=b64(audio[start : start + 4800]))
        events = {}
        answer = bytearray()
        async for event in conn:
            events.setdefault(event.type, event)
            if event.type == "response.output_audio.delta":
                answer += base64.b64decode(event.delta)
            if event.type == "response.done":
                break
    started = events["input_audio_buffer.speech_started"]
    stopped = events["input_audio_buffer.speech_stopped"]
    committed = events["input_audio_buffer.committed"]
    assert started.item_id == stopped.item_id == committed.item_id
    assert started.audio_start_ms == 0
    # Speech ends at 1.5 s; VAD waits for 500 ms of silence.
    assert 1900 <= stopped.audio_end_ms <= 2100
    completed = events["conversation.item.input_audio_transcription.completed"]
    assert completed.item_id == committed.item_id
    assert completed.transcript in duck_replies.SPOKEN_QUESTIONS
    assert completed.usage.type == "tokens"
    transcript = events["response.output_audio_transcript.done"].transcript
    assert transcript == duck_replies.reply_to_user(completed.transcript)
    assert pcm_seconds(len(answer)) == pytest.approx(len(transcript) / 14, rel=0.05)
    usage = events["response.done"].response.usage
    check_usage_sums(usage.model_dump())
    spoken_seconds = (stopped.audio_end_ms - started.audio_start_ms) / 1000
    assert usage.input_token_details.audio_tokens == round(spoken_seconds * 10)
    assert 18 <= usage.input_token_details.audio_tokens <= 22


async def test_weather_question_becomes_a_function_call_then_a_spoken_answer(simulator):
    client = await raw_client(simulator)
    await client.send(
        {"type": "session.update", "session": {"type": "realtime", "tools": [WEATHER_TOOL]}}
    )
    await client.until("session.updated")
    await client.send(
        {"type": "conversation.item.create", "item": user_text("What's the weather in Paris?")}
    )
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    types = [e["type"] for e in events]
    assert "response.output_audio.delta" not in types
    args_done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == args_done["arguments"]
    assert args_done["name"] == "get_current_weather"
    assert json.loads(args_done["arguments"]) == {"location": "Paris"}
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["type"] == "function_call"
    assert done["output"][0]["call_id"] == args_done["call_id"]
    check_usage_sums(done["usage"])
    assert done["usage"]["output_token_details"]["audio_tokens"] == 0

    tool_output = json.dumps({"location": "Paris", "temperature_c": 17, "conditions": "drizzle"})
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "function_call_output",
                "call_id": args_done["call_id"],
                "output": tool_output,
            },
        }
    )
    added = await client.until("conversation.item.done")
    assert [e["type"] for e in added][-2:] == ["conversation.item.added", "conversation.item.done"]
    # No automatic response after a tool output: the client asks for one.
    with pytest.raises(TimeoutError):
        await client.recv(within=0.2)
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    transcript = next(
        e["transcript"] for e in events if e["type"] == "response.output_audio_transcript.done"
    )
    assert tool_output in transcript
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    await client.ws.close()


async def test_cancel_mid_response_bills_only_audio_sent(simulator):
    simulator.pace = 1.0
    client = await raw_client(simulator)
    await client.send({"type": "conversation.item.create", "item": user_text(SHORT_QUESTION)})
    await client.send({"type": "response.create"})
    before = await client.until("response.output_audio.delta")
    audio_bytes = len(base64.b64decode(before[-1]["delta"]))
    await asyncio.sleep(0.3)
    await client.send({"type": "response.cancel"})
    cancel_sent = time.monotonic()
    events = await client.until("response.done")
    latency = time.monotonic() - cancel_sent
    audio_bytes += sum(
        len(base64.b64decode(e["delta"]))
        for e in events
        if e["type"] == "response.output_audio.delta"
    )
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert response["output"][0]["status"] == "incomplete"
    assert latency < 0.25
    sent_seconds = pcm_seconds(audio_bytes)
    full_seconds = len(duck_replies.reply_to_user(SHORT_QUESTION)) / 14
    assert 0.2 <= sent_seconds <= 0.8
    usage = response["usage"]
    check_usage_sums(usage)
    assert usage["output_token_details"]["audio_tokens"] == round(sent_seconds * 20)
    assert usage["output_token_details"]["audio_tokens"] < full_seconds * 20 / 3
    assert simulator.recorder.cancelled == 1
    assert simulator.recorder.completed == 0
    await client.ws.close()


async def test_second_turn_rebills_the_conversation_with_cache(simulator):
    client = await raw_client(simulator)
    usages = []
    for text in ("Why is my test flaky?", "It only fails on Mondays."):
        await client.send({"type": "conversation.item.create", "item": user_text(text)})
        await client.send({"type": "response.create"})
        usages.append((await client.until("response.done"))[-1]["response"]["usage"])
    first, second = usages
    for usage in usages:
        check_usage_sums(usage)
    assert second["input_tokens"] > first["input_tokens"]
    # Turn 1's whole input is the prefix of turn 2's: all of it is cached now.
    assert second["input_token_details"]["cached_tokens"] == first["input_tokens"]
    # The duck's spoken answer comes back as input audio at 20 tokens/s.
    assert (
        second["input_token_details"]["audio_tokens"]
        == first["output_token_details"]["audio_tokens"]
    )
    assert second["input_token_details"]["cached_tokens_details"]["audio_tokens"] == 0
    await client.ws.close()


async def test_pace_one_streams_audio_in_real_time(simulator):
    simulator.pace = 1.0
    client = await raw_client(simulator)
    await client.send({"type": "conversation.item.create", "item": user_text(SHORT_QUESTION)})
    await client.send({"type": "response.create"})
    await client.until("response.created")
    started = time.monotonic()
    events = await client.until("response.done", within=10)
    elapsed = time.monotonic() - started
    seconds = pcm_seconds(
        sum(
            len(base64.b64decode(e["delta"]))
            for e in events
            if e["type"] == "response.output_audio.delta"
        )
    )
    assert seconds > 3
    assert 0.7 * seconds <= elapsed <= 1.3 * seconds
    await client.ws.close()


async def test_speech_interrupts_the_running_response(simulator):
    simulator.pace = 1.0
    client = await raw_client(simulator)
    await client.send({"type": "conversation.item.create", "item": user_text(SHORT_QUESTION)})
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")
    await client.send({"type": "input_audio_buffer.append", "audio": b64(speech_like_pcm(0.3))})
    events = await client.until("response.done")
    types = [e["type"] for e in events]
    assert types.index("input_audio_buffer.speech_started") < types.index("response.done")
    assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"
    await client.ws.close()


async def test_text_modality_and_max_output_tokens(simulator):
    client = await raw_client(simulator)
    await client.send({"type": "conversation.item.create", "item": user_text(SHORT_QUESTION)})
    await client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    events = await client.until("response.done")
    types = [e["type"] for e in events]
    assert "response.output_audio.delta" not in types
    text = next(e["text"] for e in events if e["type"] == "response.output_text.done")
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == text == duck_replies.reply_to_user(SHORT_QUESTION)
    usage = events[-1]["response"]["usage"]
    assert usage["output_token_details"] == {"text_tokens": -(-len(text) // 4), "audio_tokens": 0}

    await client.send({"type": "response.create", "response": {"max_output_tokens": 10}})
    response = (await client.until("response.done"))[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["status_details"]["reason"] == "max_output_tokens"
    assert 10 <= response["usage"]["output_tokens"] <= 13
    await client.ws.close()


# ------------------------------------------------------------------- errors and faults


async def test_error_cases_leave_the_session_open(simulator):
    simulator.pace = 1.0  # keeps the first response active while we poke at it
    client = await raw_client(simulator)

    async def error_for(event) -> dict:
        if isinstance(event, dict):
            await client.send(event)
        else:
            await client.ws.send(event)
        events = await client.until("error")
        return events[-1]["error"]

    await client.send({"type": "conversation.item.create", "item": user_text("Hello")})
    await client.send({"type": "response.create"})
    await client.until("response.created")
    error = await error_for({"type": "response.create", "event_id": "evt_client_1"})
    assert error["code"] == "conversation_already_has_active_response"
    assert error["type"] == "invalid_request_error"
    assert error["event_id"] == "evt_client_1"
    await client.send({"type": "response.cancel"})
    await client.until("response.done")
    assert (await error_for({"type": "response.cancel"}))["code"] == "response_cancel_not_active"

    await client.send({"type": "input_audio_buffer.append", "audio": b64(silence_pcm(0.05))})
    error = await error_for({"type": "input_audio_buffer.commit"})
    assert error["code"] == "input_audio_buffer_commit_empty"
    await client.send({"type": "input_audio_buffer.clear"})
    assert (await client.recv())["type"] == "input_audio_buffer.cleared"

    error = await error_for({"type": "session.frobnicate"})
    assert (error["code"], error["param"]) == ("invalid_value", "type")
    assert (await error_for("{not json"))["code"] == "invalid_json"
    assert (await error_for(b"\x00\x01binary"))["code"] == "invalid_json"
    assert (await error_for("[1, 2]"))["code"] == "invalid_type"
    assert (await error_for({"type": "input_audio_buffer.append", "audio": "!!"}))[
        "code"
    ] == "invalid_value"
    error = await error_for({"type": "session.update", "session": {"type": "realtime", "x": 1}})
    assert (error["code"], error["param"]) == ("unknown_parameter", "session.x")
    error = await error_for(
        {"type": "session.update", "session": {"type": "realtime", "instructions": 5}}
    )
    assert (error["code"], error["param"]) == ("invalid_type", "session.instructions")
    error = await error_for(
        {
            "type": "session.update",
            "session": {"type": "realtime", "instructions": "changed", "tools": "no"},
        }
    )
    assert error["code"] == "invalid_type"
    assert (await error_for({"type": "session.update", "session": {}}))[
        "code"
    ] == "missing_required_parameter"
    # A rejected update changed nothing; the session still answers.
    await client.send({"type": "session.update", "session": {"type": "realtime"}})
    session = (await client.until("session.updated"))[-1]["session"]
    assert session["instructions"] != "changed"

    error = await error_for({"type": "conversation.item.delete", "item_id": "item_nope"})
    assert error["code"] == "invalid_value"
    await client.send({"type": "conversation.item.create", "item": user_text("Bye")})
    added = (await client.until("conversation.item.done"))[-1]["item"]
    await client.send({"type": "conversation.item.delete", "item_id": added["id"]})
    deleted = (await client.until("conversation.item.deleted"))[-1]
    assert deleted["item_id"] == added["id"]
    await client.ws.close()


async def test_truncate_shortens_assistant_audio_in_later_billing(simulator):
    client = await raw_client(simulator)
    await client.send({"type": "conversation.item.create", "item": user_text(SHORT_QUESTION)})
    await client.send({"type": "response.create"})
    first = (await client.until("response.done"))[-1]["response"]
    item_id = first["output"][0]["id"]
    await client.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 1000,
        }
    )
    truncated = (await client.until("conversation.item.truncated"))[-1]
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 1000)
    await client.send({"type": "response.create"})
    second = (await client.until("response.done"))[-1]["response"]
    assert second["usage"]["input_token_details"]["audio_tokens"] == 20  # 1 s heard
    await client.ws.close()


async def test_fault_reject_refuses_the_handshake(simulator):
    with pytest.raises(websockets.exceptions.InvalidStatus) as caught:
        await ws_connect(f"{simulator.url}?model=gpt-realtime&fault=reject")
    assert caught.value.response.status_code == 403
    simulator.fault = "reject"
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await ws_connect(f"{simulator.url}?model=gpt-realtime")


async def test_fault_close_after_created(simulator):
    client = await raw_client(simulator, "model=gpt-realtime&fault=close_after_created")
    with pytest.raises(websockets.exceptions.ConnectionClosed) as caught:
        await client.recv()
    assert caught.value.rcvd.code == 1011


async def test_fault_close_mid_response(simulator):
    simulator.fault = "close_mid_response"
    client = await raw_client(simulator)
    await client.send({"type": "response.create"})
    events = await client.until("response.output_audio.delta")
    assert "response.done" not in [e["type"] for e in events]
    with pytest.raises(websockets.exceptions.ConnectionClosed) as caught:
        await client.until("response.done")
    assert caught.value.rcvd.code == 1011


async def test_session_expires_with_error_then_close_1001(simulator):
    simulator.max_session_seconds = 0.2
    client = await raw_client(simulator)
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "session_expired"
    with pytest.raises(websockets.exceptions.ConnectionClosed) as caught:
        await client.recv()
    assert caught.value.rcvd.code == 1001


async def test_missing_model_or_wrong_path(simulator):
    ws = await ws_connect(simulator.url)
    error = json.loads(await ws.recv())
    assert error["error"]["code"] == "missing_required_parameter"
    with pytest.raises(websockets.exceptions.ConnectionClosed) as caught:
        await ws.recv()
    assert caught.value.rcvd.code == 1008
    with pytest.raises(websockets.exceptions.InvalidStatus) as status:
        await ws_connect(f"ws://127.0.0.1:{simulator.port}/v1/other?model=gpt-realtime")
    assert status.value.response.status_code == 404


# ------------------------------------------------------------------- channels consumer


@pytest.fixture
def channels_app(settings):
    settings.DUCKE_SIMULATOR_ENABLED = True
    settings.DUCKE_SIMULATOR_PACE = 0
    from ducke.routing import websocket_application

    return websocket_application()


async def receive_until(communicator, event_type: str) -> list[dict]:
    events = []
    while not events or events[-1]["type"] != event_type:
        events.append(await communicator.receive_json_from(timeout=5))
    return events


@pytest.mark.django_db(transaction=True)
async def test_channels_consumer_serves_a_session(channels_app):
    from ducke.realtime import simulator_consumer

    simulator_consumer.recorder.reset()
    communicator = WebsocketCommunicator(channels_app, "/simulator/v1/realtime?model=gpt-realtime")
    connected, _ = await communicator.connect()
    assert connected
    created = await communicator.receive_json_from()
    assert created["type"] == "session.created"
    assert created["session"]["model"] == "gpt-realtime"
    await communicator.send_to(text_data="{oops")
    assert (await communicator.receive_json_from())["error"]["code"] == "invalid_json"
    await communicator.send_to(bytes_data=b"\x01\x02")
    assert (await communicator.receive_json_from())["error"]["code"] == "invalid_json"
    await communicator.send_json_to(
        {"type": "conversation.item.create", "item": user_text("Help me, duck.")}
    )
    await communicator.send_json_to({"type": "response.create"})
    events = await receive_until(communicator, "response.done")
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    assert events[-1]["response"]["status"] == "completed"
    check_usage_sums(events[-1]["response"]["usage"])
    assert simulator_consumer.recorder.completed == 1
    assert simulator_consumer.recorder.invalid_frames == 2
    await communicator.disconnect()


async def test_channels_consumer_faults(channels_app):
    path = "/simulator/v1/realtime?model=gpt-realtime&fault="
    communicator = WebsocketCommunicator(channels_app, path + "reject")
    connected, _ = await communicator.connect()
    assert not connected
    communicator = WebsocketCommunicator(channels_app, path + "close_after_created")
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "session.created"
    closed = await communicator.receive_output()
    assert (closed["type"], closed["code"]) == ("websocket.close", 1011)
    await communicator.wait()


# ------------------------------------------------------------------- building blocks


def test_energy_vad_finds_speech_and_honours_silence_duration():
    vad = EnergyVad(silence_duration_ms=500, prefix_padding_ms=300)
    assert vad.feed(silence_pcm(1.0)) == []
    speech = speech_like_pcm(1.0, seed=3)
    events = vad.feed(speech)
    assert [e.kind for e in events] == ["speech_started"]
    assert 700 <= events[0].audio_ms <= 800  # first voiced frame minus 300 ms of padding
    frames = [speech[i : i + 960] for i in range(0, len(speech), 960)]
    last_voiced_end_ms = 1000 + 20 * max(
        i + 1 for i, frame in enumerate(frames) if frame_rms(frame) >= vad.rms_threshold
    )
    stops = []
    for _ in range(50):  # 1 s of silence, 20 ms at a time
        stops += vad.feed(silence_pcm(0.02))
    assert [(e.kind, e.audio_ms) for e in stops] == [("speech_stopped", last_voiced_end_ms + 500)]


def test_tool_detection_needs_the_tool_and_extracts_arguments():
    both = {"get_current_weather", "get_weather_forecast", "web_search"}
    name, args = duck_replies.detect_tool_call("Weather forecast in New York City?", both)
    assert (name, json.loads(args)) == ("get_weather_forecast", {"location": "New York City"})
    assert duck_replies.detect_tool_call("What's the weather in Oslo?", set()) is None
    name, args = duck_replies.detect_tool_call("Please look up asyncio timeouts", both)
    assert (name, json.loads(args)) == ("web_search", {"query": "asyncio timeouts"})
    assert duck_replies.detect_tool_call("My loop never ends", both) is None


async def test_core_survives_garbage_and_records_per_connection():
    sent = []

    async def send(event):
        sent.append(event)

    recorder = SimulatorRecorder(keep_audio=False)
    sim = RealtimeSimulator(send, model="gpt-realtime", recorder=recorder, pace=0)
    await sim.start()
    for junk in (
        {},
        {"type": 5},
        {"type": "conversation.item.create", "item": "x"},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user"}},
        {"type": "response.create", "response": {"tools": [{"name": 3}]}},
        {"type": "conversation.item.truncate", "item_id": "nope"},
        {"type": "input_audio_buffer.append", "audio": b64(silence_pcm(0.1))},
    ):
        await sim.handle(junk)
    errors = [e for e in sent if e["type"] == "error"]
    assert len(errors) == 6
    assert all(e["error"]["type"] == "invalid_request_error" for e in errors)
    assert len(recorder.client_events) == 7
    assert recorder.client_events[-1].connection_id == sim.session_id
    assert recorder.client_events[-1].event["audio"] == "<4800 bytes>"
    assert recorder.audio_bytes_received == 4800
    await sim.handle({"type": "response.create"})
    await sim.close()  # cancels the running response cleanly
    assert not sim._tasks
    recorder.reset()
    assert len(recorder.client_events) == 0
    assert recorder.connections == 0
