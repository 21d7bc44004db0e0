"""A local stand-in for the OpenAI Realtime API (GA protocol), independent of any transport.

One `RealtimeSimulator` serves one WebSocket connection: the transport (the channels
`SimulatorConsumer`, or the `websockets` test fixture) calls `start()`, then `handle()` /
`handle_text()` for every client frame, and `close()` when the socket goes away. The simulator
answers through the `send` coroutine it was given, with the GA event names and shapes of the
`openai` SDK's `openai.types.realtime` (see /work/shared/REALTIME.md).

What it does, and how it fakes what it cannot do:
- Server VAD on audio energy (`ducke.realtime.synth.EnergyVad`), honouring
  `turn_detection.silence_duration_ms` / `prefix_padding_ms` / `threshold`.
- It cannot recognise speech: a spoken turn is "heard" as one of a few canned developer
  questions (`duck_replies.spoken_question`), chosen by the turn number and its duration.
- Answers are short rubber-duck replies derived from the last user words, or a summary of the
  latest tool output; text asking for weather or a search becomes a function call when that
  tool is in the session. Audio answers are synthesised speech-like pcm16 at ~14 chars/s,
  streamed in 100 ms chunks paced at `pace` x real time.
- `response.done` usage is billed like the real service: the whole conversation is input on
  every response, the part billed before counts as cached; audio is 10 tokens/s from the user
  and 20 tokens/s from the assistant; text is chars/4.
- `stamp=True` (benchmarks only) adds `x_seq` (send order) and `x_sent_ns`
  (`time.monotonic_ns()` at send) to every server event.
- Faults for failure tests: `close_after_created`, `close_mid_response` (here) and `reject`
  (the transport refuses the handshake). Sessions end after `max_session_seconds` (60 min).
"""

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from ducke.realtime import duck_replies
from ducke.realtime.synth import (
    BYTES_PER_SECOND,
    EnergyVad,
    pcm_bytes,
    pcm_seconds,
    speech_like_pcm,
)

log = logging.getLogger(__name__)

Send = Callable[[dict], Awaitable[None]]
Disconnect = Callable[[int, str], Awaitable[None]]

# ``ignore_max_output_tokens``: an upstream that streams past the session's output bound (the
# relay's in-flight cutoff is the second line against it).
FAULTS = frozenset(
    {"", "reject", "close_after_created", "close_mid_response", "ignore_max_output_tokens"}
)
SESSION_MAX_SECONDS = 3600.0
AUDIO_CHUNK_SECONDS = 0.1
SPEAKING_CHARS_PER_SECOND = 14.0
USER_AUDIO_TOKENS_PER_SECOND = 10
ASSISTANT_AUDIO_TOKENS_PER_SECOND = 20
CHARS_PER_TEXT_TOKEN = 4
MIN_COMMIT_MS = 100
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
DEFAULT_INSTRUCTIONS = (
    "You are a helpful, friendly assistant. Speak clearly, keep answers short, and ask a "
    "question back when the request is unclear."
)
VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)
PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}
SERVER_VAD_DEFAULTS = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
SEMANTIC_VAD_DEFAULTS = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
# semantic_vad has no silence setting; eagerness picks one.
EAGERNESS_SILENCE_MS = {"low": 800, "medium": 500, "auto": 500, "high": 250}
SESSION_FIELDS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "audio",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "tracing",
        "truncation",
        "include",
        "prompt",
        "reasoning",
        "parallel_tool_calls",
    }
)
RESPONSE_FIELDS = frozenset(
    {
        "conversation",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "output_modalities",
        "prompt",
        "tool_choice",
        "tools",
        "audio",
    }
)
CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)
_WORD_PIECES = re.compile(r"\S+\s*")


def new_id(prefix: str) -> str:
    """An id in the API's style, e.g. `resp_8d0f...`."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def text_tokens(chars: int) -> int:
    """Text tokens billed for `chars` characters (the usual ~4 chars/token estimate)."""
    return math.ceil(chars / CHARS_PER_TEXT_TOKEN)


class SimulatorError(Exception):
    """A client mistake, reported as an `error` event; the session stays open."""

    def __init__(self, code: str, message: str, param: str | None = None, kind=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind or "invalid_request_error"


@dataclass(frozen=True)
class RecordedEvent:
    """One event seen by the recorder, with the connection (session id) it belongs to."""

    connection_id: str
    event: dict


class SimulatorRecorder:
    """What every simulator connection received and billed; shared by connections, for tests."""

    def __init__(self, *, keep_audio: bool = True, max_events: int | None = None):
        self.keep_audio = keep_audio
        self.max_events = max_events
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self.client_events: deque[RecordedEvent] = deque(maxlen=self.max_events)
            self.responses: deque[RecordedEvent] = deque(maxlen=self.max_events)
            self.statuses: Counter[str] = Counter()
            self.connections = 0
            self.audio_bytes_received = 0
            self.invalid_frames = 0

    @property
    def completed(self) -> int:
        """Responses that ended with status `completed`."""
        return self.statuses["completed"]

    @property
    def cancelled(self) -> int:
        """Responses that ended with status `cancelled`."""
        return self.statuses["cancelled"]

    def record_connection(self) -> None:
        """Count a new simulator session."""
        with self._lock:
            self.connections += 1

    def record_client_event(self, connection_id: str, event: dict, audio_bytes: int = 0) -> None:
        """Keep a client event (audio payloads are dropped unless `keep_audio`)."""
        if audio_bytes and not self.keep_audio:
            event = {**event, "audio": f"<{audio_bytes} bytes>"}
        with self._lock:
            self.client_events.append(RecordedEvent(connection_id, event))
            self.audio_bytes_received += audio_bytes

    def record_invalid_frame(self) -> None:
        """Count a frame that was not a JSON object."""
        with self._lock:
            self.invalid_frames += 1

    def record_response_done(self, connection_id: str, response: dict) -> None:
        """Keep the `response` object of a `response.done` sent, with its usage."""
        with self._lock:
            self.responses.append(RecordedEvent(connection_id, response))
            self.statuses[response.get("status") or "unknown"] += 1

    def client_event_types(self, connection_id: str | None = None) -> list[str]:
        """Types of the client events received, in order (optionally for one connection)."""
        with self._lock:
            records = list(self.client_events)
        return [
            r.event.get("type")
            for r in records
            if connection_id is None or r.connection_id == connection_id
        ]

    def usages(self) -> list[dict]:
        """The `usage` of every `response.done` sent, in order."""
        with self._lock:
            return [r.event.get("usage") or {} for r in self.responses]


@dataclass
class _Item:
    """A conversation item: what the API shows, plus what it costs as input and what it says."""

    data: dict
    text_chars: int = 0
    audio_seconds: float = 0.0
    audio_tokens_per_second: int = 0
    words: str = ""  # typed or "heard" words, or a tool output: what a reply is derived from
    typed: bool = False  # a user input_text message (may trigger a function call)

    @property
    def id(self) -> str:
        return self.data["id"]

    def input_tokens(self) -> tuple[int, int]:
        return (
            text_tokens(self.text_chars),
            round(self.audio_seconds * self.audio_tokens_per_second),
        )


@dataclass
class _Response:
    """A response in progress."""

    id: str
    params: dict
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = ""
    task: asyncio.Task | None = None


def _require(mapping: dict, key: str, kind: type | tuple, param: str):
    if key not in mapping or mapping[key] is None:
        raise SimulatorError(
            "missing_required_parameter", f"Missing required parameter: '{param}'.", param
        )
    return _typed(mapping[key], kind, param)


def _typed(value, kind: type | tuple, param: str):
    # bool is an int subclass; a number field never accepts true/false.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise SimulatorError(
            "invalid_type",
            f"Invalid type for '{param}': expected {names}, got {type(value).__name__}.",
            param,
        )
    return value


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _invalid_value(param: str, detail: str) -> SimulatorError:
    return SimulatorError("invalid_value", f"Invalid value for '{param}': {detail}", param)


def _check_unknown(mapping: dict, allowed, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise SimulatorError(
                "unknown_parameter", f"Unknown parameter: '{prefix}.{key}'.", f"{prefix}.{key}"
            )


def _word_pieces(text: str) -> list[str]:
    """Words with their trailing spaces: their concatenation is the text again."""
    pieces = _WORD_PIECES.findall(text)
    leading = len(text) - len(text.lstrip())
    if pieces and leading:
        pieces[0] = text[:leading] + pieces[0]
    return pieces or ([text] if text else [])


class RealtimeSimulator:
    """The Realtime API for one connection: feed it client events, it sends server events."""

    def __init__(
        self,
        send: Send,
        *,
        model: str,
        recorder: SimulatorRecorder | None = None,
        pace: float = 1.0,
        fault: str = "",
        disconnect: Disconnect | None = None,
        max_session_seconds: float = SESSION_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
        stamp: bool = False,
    ):
        if fault not in FAULTS:
            raise ValueError(f"unknown simulator fault {fault!r}")
        self._send = send
        self._disconnect = disconnect
        self.model = model
        self.recorder = recorder
        self.pace = max(0.0, float(pace))
        self.fault = fault
        self.max_session_seconds = max_session_seconds
        self.clock = clock
        self.stamp = stamp
        self._sent_count = 0
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.session = self._initial_session()
        self.closed = False
        self._items: list[_Item] = []
        self._billed_segments: list[tuple] = []
        self._active: _Response | None = None
        self._responses_started = 0
        self._audio_output_started = False
        self._tasks: set[asyncio.Task] = set()
        self._vad = EnergyVad()
        self._configure_vad()
        self._appended_bytes = 0
        self._buffer_start_ms = 0.0
        self._speech_start_ms = 0.0
        self._pending_item_id = ""
        self._rate_limit_requests = 5000
        self._rate_limit_tokens = 400_000

    # ---------------------------------------------------------------- lifecycle

    def _initial_session(self) -> dict:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": self.model,
            "output_modalities": ["audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "include": None,
            "expires_at": int(self.clock() + self.max_session_seconds),
            "audio": {
                "input": {
                    "format": dict(PCM_FORMAT),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": dict(SERVER_VAD_DEFAULTS),
                },
                "output": {"format": dict(PCM_FORMAT), "voice": "alloy", "speed": 1.0},
            },
        }

    async def start(self) -> None:
        """Open the session: send `session.created` (and play the selected fault)."""
        if self.recorder is not None:
            self.recorder.record_connection()
        if not self.model:
            await self._send_error(
                SimulatorError(
                    "missing_required_parameter",
                    "Missing required parameter: 'model' (query string).",
                    "model",
                )
            )
            await self._close_transport(CLOSE_POLICY_VIOLATION, "missing model")
            return
        await self._emit({"type": "session.created", "session": copy.deepcopy(self.session)})
        if self.fault == "close_after_created":
            await self._close_transport(CLOSE_INTERNAL_ERROR, "simulated upstream failure")
            return
        self._spawn(self._expire_session())

    async def close(self) -> None:
        """Stop every running task of this connection (the socket is gone)."""
        self.closed = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire_session(self) -> None:
        await asyncio.sleep(self.max_session_seconds)
        await self._send_error(
            SimulatorError(
                "session_expired",
                "Your session hit the maximum duration of 60 minutes.",
            )
        )
        await self._close_transport(CLOSE_GOING_AWAY, "session expired")

    async def _close_transport(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._disconnect is not None:
            with contextlib.suppress(Exception):
                await self._disconnect(code, reason)

    async def _emit(self, event: dict) -> None:
        """Send one server event; a failed send means the socket is gone."""
        if self.closed:
            return
        event = {"event_id": new_id("event"), **event}
        if self.stamp:
            # Benchmark only: send order and a system-wide monotonic send time, so a client
            # can check frame order and loss and time each event across processes.
            event["x_seq"] = self._sent_count
            event["x_sent_ns"] = time.monotonic_ns()
            self._sent_count += 1
        try:
            await self._send(event)
        except Exception as exc:  # the transport closed under us
            log.debug("simulator %s: send failed (%s), closing", self.session_id, exc)
            self.closed = True

    async def _send_error(self, exc: SimulatorError, client_event_id: str | None = None) -> None:
        await self._emit(
            {
                "type": "error",
                "error": {
                    "type": exc.kind,
                    "code": exc.code,
                    "message": exc.message,
                    "param": exc.param,
                    "event_id": client_event_id,
                },
            }
        )

    # ---------------------------------------------------------------- frames and dispatch

    async def handle_text(self, text: str) -> None:
        """Handle one text frame: a JSON client event, or an `error` if it is not one."""
        try:
            event = json.loads(text)
        except ValueError as exc:
            if self.recorder is not None:
                self.recorder.record_invalid_frame()
            await self._send_error(
                SimulatorError("invalid_json", f"The frame is not valid JSON: {exc}.")
            )
            return
        await self.handle(event)

    async def handle_binary(self, data: bytes) -> None:
        """Binary frames are not part of the protocol: answer with an `error`."""
        if self.recorder is not None:
            self.recorder.record_invalid_frame()
        await self._send_error(
            SimulatorError(
                "invalid_json", "Binary frames are not supported: send JSON events as text."
            )
        )

    async def handle(self, event: dict) -> None:
        """Handle one client event; mistakes become `error` events, never exceptions."""
        if self.closed:
            return
        if not isinstance(event, dict):
            if self.recorder is not None:
                self.recorder.record_invalid_frame()
            await self._send_error(
                SimulatorError("invalid_type", "A client event must be a JSON object.")
            )
            return
        client_event_id = event.get("event_id")
        if not isinstance(client_event_id, str):
            client_event_id = None
        event_type = event.get("type")
        try:
            if self.recorder is not None:
                self.recorder.record_client_event(
                    self.session_id, event, self._audio_size(event, event_type)
                )
            if not isinstance(event_type, str):
                raise SimulatorError(
                    "missing_required_parameter", "Missing required parameter: 'type'.", "type"
                )
            if event_type not in CLIENT_EVENT_TYPES:
                raise SimulatorError(
                    "invalid_value",
                    f"Invalid value: '{event_type[:100]}'. Supported values are: "
                    + ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
                    + ".",
                    "type",
                )
            await getattr(self, event_type.replace(".", "_"))(event)
        except SimulatorError as exc:
            await self._send_error(exc, client_event_id)
        except Exception:
            log.exception("simulator %s: failed on a %r event", self.session_id, event_type)
            await self._send_error(
                SimulatorError(
                    "server_error", "The simulator failed on this event.", kind="server_error"
                ),
                client_event_id,
            )

    @staticmethod
    def _audio_size(event: dict, event_type) -> int:
        if event_type == "input_audio_buffer.append" and isinstance(event.get("audio"), str):
            return len(event["audio"]) * 3 // 4
        return 0

    # ---------------------------------------------------------------- session

    async def session_update(self, event: dict) -> None:
        """`session.update`: change only the fields sent, reply with the whole session."""
        patch = _require(event, "session", dict, "session")
        _check_unknown(patch, SESSION_FIELDS, "session")
        kind = _require(patch, "type", str, "session.type")
        if kind != "realtime":
            raise _invalid_value("session.type", "only 'realtime' sessions are simulated.")
        session = copy.deepcopy(self.session)
        for key, value in patch.items():
            if key in ("type", "audio"):
                continue
            session[key] = self._checked_session_field(key, value)
        if "audio" in patch:
            self._merge_audio(session, _typed(patch["audio"], dict, "session.audio"))
        self.session = session
        self._configure_vad()
        await self._emit({"type": "session.updated", "session": copy.deepcopy(session)})

    def _checked_session_field(self, key: str, value):
        param = f"session.{key}"
        if key == "model":
            if _typed(value, str, param) != self.model:
                raise _invalid_value(param, "the model cannot be changed in a session.")
        elif key == "instructions":
            _typed(value, str, param)
        elif key == "output_modalities":
            return self._checked_modalities(value, param)
        elif key == "tools":
            return self._checked_tools(value, param)
        elif key == "tool_choice":
            self._check_tool_choice(value, param)
        elif key == "max_output_tokens":
            self._check_max_output_tokens(value, param)
        return value

    @staticmethod
    def _checked_modalities(value, param: str) -> list:
        _typed(value, list, param)
        if value not in (["audio"], ["text"]):
            raise _invalid_value(param, "use ['audio'] or ['text'].")
        return list(value)

    @staticmethod
    def _checked_tools(value, param: str) -> list:
        _typed(value, list, param)
        for index, tool in enumerate(value):
            where = f"{param}[{index}]"
            _typed(tool, dict, where)
            _check_unknown(tool, {"type", "name", "description", "parameters"}, where)
            if tool.get("type", "function") != "function":
                raise _invalid_value(f"{where}.type", "the simulator supports function tools.")
            name = _require(tool, "name", str, f"{where}.name")
            if not name:
                raise _invalid_value(f"{where}.name", "must not be empty.")
            if "description" in tool and tool["description"] is not None:
                _typed(tool["description"], str, f"{where}.description")
            if "parameters" in tool and tool["parameters"] is not None:
                _typed(tool["parameters"], dict, f"{where}.parameters")
        return copy.deepcopy(value)

    @staticmethod
    def _check_tool_choice(value, param: str) -> None:
        if isinstance(value, str):
            if value not in ("auto", "none", "required"):
                raise _invalid_value(param, "use 'auto', 'none', 'required' or a function.")
            return
        _typed(value, dict, param)
        if value.get("type") != "function":
            raise _invalid_value(f"{param}.type", "only 'function' can be forced.")
        _require(value, "name", str, f"{param}.name")

    @staticmethod
    def _check_max_output_tokens(value, param: str) -> None:
        if value == "inf":
            return
        _typed(value, int, param)
        if not 1 <= value <= 4096:
            raise _invalid_value(param, "must be between 1 and 4096, or 'inf'.")

    def _merge_audio(self, session: dict, audio: dict) -> None:
        _check_unknown(audio, {"input", "output"}, "session.audio")
        if "input" in audio:
            incoming = _typed(audio["input"], dict, "session.audio.input")
            _check_unknown(
                incoming,
                {"format", "transcription", "turn_detection", "noise_reduction"},
                "session.audio.input",
            )
            target = session["audio"]["input"]
            if "format" in incoming:
                target["format"] = self._checked_format(
                    incoming["format"], "session.audio.input.format"
                )
            if "transcription" in incoming:
                target["transcription"] = self._checked_transcription(incoming["transcription"])
            if "turn_detection" in incoming:
                target["turn_detection"] = self._checked_turn_detection(incoming["turn_detection"])
            if "noise_reduction" in incoming:
                value = incoming["noise_reduction"]
                if value is not None:
                    _typed(value, dict, "session.audio.input.noise_reduction")
                target["noise_reduction"] = value
        if "output" in audio:
            incoming = _typed(audio["output"], dict, "session.audio.output")
            _check_unknown(incoming, {"format", "voice", "speed"}, "session.audio.output")
            target = session["audio"]["output"]
            if "format" in incoming:
                target["format"] = self._checked_format(
                    incoming["format"], "session.audio.output.format"
                )
            if "voice" in incoming:
                target["voice"] = self._checked_voice(incoming["voice"], target["voice"])
            if "speed" in incoming:
                speed = _typed(incoming["speed"], (int, float), "session.audio.output.speed")
                if not 0.25 <= speed <= 1.5:
                    raise _invalid_value("session.audio.output.speed", "must be 0.25 to 1.5.")
                target["speed"] = speed

    @staticmethod
    def _checked_format(value, param: str) -> dict:
        _typed(value, dict, param)
        _check_unknown(value, {"type", "rate"}, param)
        if value.get("type", "audio/pcm") != "audio/pcm" or value.get("rate", 24000) != 24000:
            raise _invalid_value(param, "the simulator speaks audio/pcm at 24000 Hz only.")
        return dict(PCM_FORMAT)

    @staticmethod
    def _checked_transcription(value):
        param = "session.audio.input.transcription"
        if value is None:
            return None
        _typed(value, dict, param)
        _check_unknown(
            value, {"model", "language", "languages", "prompt", "delay", "keywords"}, param
        )
        _require(value, "model", str, f"{param}.model")
        return copy.deepcopy(value)

    @staticmethod
    def _checked_turn_detection(value):
        param = "session.audio.input.turn_detection"
        if value is None:
            return None
        _typed(value, dict, param)
        kind = _require(value, "type", str, f"{param}.type")
        if kind == "server_vad":
            defaults = SERVER_VAD_DEFAULTS
        elif kind == "semantic_vad":
            defaults = SEMANTIC_VAD_DEFAULTS
        else:
            raise _invalid_value(f"{param}.type", "use 'server_vad' or 'semantic_vad'.")
        _check_unknown(value, defaults.keys(), param)
        for key in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
            if value.get(key) is not None and _typed(value[key], int, f"{param}.{key}") < 0:
                raise _invalid_value(f"{param}.{key}", "must not be negative.")
        if value.get("threshold") is not None:
            threshold = _typed(value["threshold"], (int, float), f"{param}.threshold")
            if not 0 <= threshold <= 1:
                raise _invalid_value(f"{param}.threshold", "must be between 0 and 1.")
        for key in ("create_response", "interrupt_response"):
            if value.get(key) is not None:
                _typed(value[key], bool, f"{param}.{key}")
        if value.get("eagerness") is not None and value["eagerness"] not in EAGERNESS_SILENCE_MS:
            raise _invalid_value(f"{param}.eagerness", "use low, medium, high or auto.")
        return {**defaults, **{k: v for k, v in value.items() if v is not None}}

    def _checked_voice(self, value, current):
        param = "session.audio.output.voice"
        if isinstance(value, dict):
            _require(value, "id", str, f"{param}.id")
        elif _typed(value, (str, dict), param) not in VOICES:
            raise _invalid_value(param, "unknown voice.")
        if value != current and self._audio_output_started:
            raise _invalid_value(param, "the voice cannot change after the first audio output.")
        return value

    def _turn_detection(self) -> dict | None:
        return self.session["audio"]["input"]["turn_detection"]

    def _configure_vad(self) -> None:
        turn = self._turn_detection()
        if turn is None:
            self._vad.reset()
            return
        if turn["type"] == "semantic_vad":
            self._vad.rms_threshold = EnergyVad(threshold=0.5).rms_threshold
            self._vad.silence_duration_ms = EAGERNESS_SILENCE_MS[turn.get("eagerness") or "auto"]
            self._vad.prefix_padding_ms = SERVER_VAD_DEFAULTS["prefix_padding_ms"]
        else:
            self._vad.rms_threshold = EnergyVad(threshold=turn["threshold"]).rms_threshold
            self._vad.silence_duration_ms = turn["silence_duration_ms"]
            self._vad.prefix_padding_ms = turn["prefix_padding_ms"]

    # ---------------------------------------------------------------- input audio buffer

    def _now_ms(self) -> float:
        return self._appended_bytes * 1000 / BYTES_PER_SECOND

    async def input_audio_buffer_append(self, event: dict) -> None:
        """`input_audio_buffer.append`: buffer audio and run server VAD over it."""
        audio = _require(event, "audio", str, "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _invalid_value("audio", "not valid base64.") from exc
        self._appended_bytes += len(pcm)
        turn = self._turn_detection()
        if turn is None:
            return
        for boundary in self._vad.feed(pcm):
            if boundary.kind == "speech_started":
                await self._speech_started(turn, max(boundary.audio_ms, self._buffer_start_ms))
            else:
                await self._speech_stopped(turn, boundary.audio_ms)

    async def _speech_started(self, turn: dict, start_ms: float) -> None:
        self._speech_start_ms = start_ms
        self._pending_item_id = new_id("item")
        await self._emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": int(start_ms),
                "item_id": self._pending_item_id,
            }
        )
        if turn.get("interrupt_response", True) and self._active is not None:
            await self._stop_response(self._active, "turn_detected")

    async def _speech_stopped(self, turn: dict, end_ms: float) -> None:
        item_id = self._pending_item_id or new_id("item")
        self._pending_item_id = ""
        await self._emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": int(end_ms),
                "item_id": item_id,
            }
        )
        await self._commit_audio(item_id, (end_ms - self._speech_start_ms) / 1000)
        self._buffer_start_ms = end_ms
        if turn.get("create_response", True) and self._active is None:
            await self._start_response({})

    async def input_audio_buffer_commit(self, event: dict) -> None:
        """`input_audio_buffer.commit`: turn the buffered audio into a user message."""
        buffered_ms = self._now_ms() - self._buffer_start_ms
        if buffered_ms < MIN_COMMIT_MS:
            raise SimulatorError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        item_id = self._pending_item_id or new_id("item")
        self._pending_item_id = ""
        self._vad.reset()
        self._buffer_start_ms = self._now_ms()
        await self._commit_audio(item_id, buffered_ms / 1000)

    async def input_audio_buffer_clear(self, event: dict) -> None:
        """`input_audio_buffer.clear`: drop the buffered audio."""
        self._vad.reset()
        self._pending_item_id = ""
        self._buffer_start_ms = self._now_ms()
        await self._emit({"type": "input_audio_buffer.cleared"})

    async def _commit_audio(self, item_id: str, seconds: float) -> None:
        turn_number = sum(1 for i in self._items if i.audio_tokens_per_second == 10)
        heard = duck_replies.spoken_question(turn_number, seconds)
        item = _Item(
            data={
                "id": item_id,
                "type": "message",
                "object": "realtime.item",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
            audio_seconds=seconds,
            audio_tokens_per_second=USER_AUDIO_TOKENS_PER_SECOND,
            words=heard,
        )
        previous = self._items[-1].id if self._items else None
        self._items.append(item)
        await self._emit(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        await self._emit_item_added(item, previous)
        transcription = self.session["audio"]["input"]["transcription"]
        if transcription is not None:
            await self._transcribe(item, transcription, seconds)

    async def _transcribe(self, item: _Item, transcription: dict, seconds: float) -> None:
        transcript = item.words
        for piece in _word_pieces(transcript):
            await self._emit(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item.id,
                    "content_index": 0,
                    "delta": piece,
                }
            )
        if transcription.get("model") == "whisper-1":
            usage = {"type": "duration", "seconds": round(seconds, 3)}
        else:
            prompt_tokens = text_tokens(len(transcription.get("prompt") or ""))
            audio_tokens = round(seconds * USER_AUDIO_TOKENS_PER_SECOND)
            output_tokens = text_tokens(len(transcript))
            usage = {
                "type": "tokens",
                "input_tokens": prompt_tokens + audio_tokens,
                "output_tokens": output_tokens,
                "total_tokens": prompt_tokens + audio_tokens + output_tokens,
                "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
            }
        item.data["content"][0]["transcript"] = transcript
        await self._emit(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item.id,
                "content_index": 0,
                "transcript": transcript,
                "usage": usage,
            }
        )

    # ---------------------------------------------------------------- conversation items

    async def _emit_item_added(self, item: _Item, previous: str | None) -> None:
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self._emit(
                {"type": kind, "previous_item_id": previous, "item": copy.deepcopy(item.data)}
            )

    def _find(self, item_id) -> int:
        for index, item in enumerate(self._items):
            if item.id == item_id:
                return index
        raise _invalid_value("item_id", f"no item with id '{str(item_id)[:64]}'.")

    async def conversation_item_create(self, event: dict) -> None:
        """`conversation.item.create`: add a message, function call or tool output."""
        item = self._item_from_client(_require(event, "item", dict, "item"))
        if any(existing.id == item.id for existing in self._items):
            raise _invalid_value("item.id", "an item with this id already exists.")
        previous_id = event.get("previous_item_id")
        if previous_id is None:
            index = len(self._items)
        elif previous_id == "root":
            index = 0
        else:
            index = self._find(_typed(previous_id, str, "previous_item_id")) + 1
        self._items.insert(index, item)
        previous = self._items[index - 1].id if index > 0 else None
        await self._emit_item_added(item, previous)

    def _item_from_client(self, raw: dict) -> _Item:
        kind = _require(raw, "type", str, "item.type")
        item_id = raw.get("id") or new_id("item")
        _typed(item_id, str, "item.id")
        base = {"id": item_id, "type": kind, "object": "realtime.item", "status": "completed"}
        if kind == "function_call_output":
            call_id = _require(raw, "call_id", str, "item.call_id")
            output = _require(raw, "output", str, "item.output")
            data = {**base, "call_id": call_id, "output": output}
            return _Item(data=data, text_chars=len(output), words=output)
        if kind == "function_call":
            name = _require(raw, "name", str, "item.name")
            arguments = _require(raw, "arguments", str, "item.arguments")
            call_id = raw.get("call_id") or new_id("call")
            data = {**base, "call_id": call_id, "name": name, "arguments": arguments}
            return _Item(data=data, text_chars=len(name) + len(arguments))
        if kind != "message":
            raise _invalid_value(
                "item.type", "use 'message', 'function_call' or 'function_call_output'."
            )
        role = _require(raw, "role", str, "item.role")
        allowed = {
            "user": {"input_text", "input_audio"},
            "system": {"input_text"},
            "assistant": {"output_text", "output_audio"},
        }
        if role not in allowed:
            raise _invalid_value("item.role", "use 'user', 'assistant' or 'system'.")
        parts = _require(raw, "content", list, "item.content")
        item = _Item(data={**base, "role": role, "content": []})
        words = []
        for index, part in enumerate(parts):
            where = f"item.content[{index}]"
            _typed(part, dict, where)
            part_type = _require(part, "type", str, f"{where}.type")
            if part_type not in allowed[role]:
                raise _invalid_value(f"{where}.type", f"not allowed for role '{role}'.")
            if part_type in ("input_text", "output_text"):
                text = _require(part, "text", str, f"{where}.text")
                item.text_chars += len(text)
                words.append(text)
                item.typed = item.typed or role == "user"
                item.data["content"].append({"type": part_type, "text": text})
                continue
            transcript = part.get("transcript")
            if transcript is not None:
                words.append(_typed(transcript, str, f"{where}.transcript"))
            if part_type == "input_audio":
                audio = _typed(part.get("audio") or "", str, f"{where}.audio")
                try:
                    item.audio_seconds += pcm_seconds(len(base64.b64decode(audio, validate=True)))
                except (binascii.Error, ValueError) as exc:
                    raise _invalid_value(f"{where}.audio", "not valid base64.") from exc
                item.audio_tokens_per_second = USER_AUDIO_TOKENS_PER_SECOND
            else:
                item.audio_seconds += len(transcript or "") / SPEAKING_CHARS_PER_SECOND
                item.audio_tokens_per_second = ASSISTANT_AUDIO_TOKENS_PER_SECOND
            item.data["content"].append({"type": part_type, "transcript": transcript})
        item.words = " ".join(words)
        return item

    async def conversation_item_retrieve(self, event: dict) -> None:
        """`conversation.item.retrieve`: send the server's copy of an item."""
        item = self._items[self._find(_require(event, "item_id", str, "item_id"))]
        await self._emit({"type": "conversation.item.retrieved", "item": copy.deepcopy(item.data)})

    async def conversation_item_truncate(self, event: dict) -> None:
        """`conversation.item.truncate`: cut assistant audio the user did not hear."""
        item = self._items[self._find(_require(event, "item_id", str, "item_id"))]
        content_index = _require(event, "content_index", int, "content_index")
        audio_end_ms = _require(event, "audio_end_ms", int, "audio_end_ms")
        if item.data.get("role") != "assistant" or item.audio_tokens_per_second == 0:
            raise _invalid_value("item_id", "only assistant audio messages can be truncated.")
        if content_index != 0:
            raise _invalid_value("content_index", "the simulator's items have one audio part.")
        if not 0 <= audio_end_ms <= round(item.audio_seconds * 1000):
            raise _invalid_value(
                "audio_end_ms", f"must be between 0 and {round(item.audio_seconds * 1000)}."
            )
        item.audio_seconds = audio_end_ms / 1000
        # Like the real service: no text stays in the context that the user did not hear.
        for part in item.data["content"]:
            if "transcript" in part:
                part["transcript"] = ""
        item.words = ""
        await self._emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item.id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }
        )

    async def conversation_item_delete(self, event: dict) -> None:
        """`conversation.item.delete`: remove an item from the conversation."""
        item_id = _require(event, "item_id", str, "item_id")
        del self._items[self._find(item_id)]
        await self._emit({"type": "conversation.item.deleted", "item_id": item_id})

    async def output_audio_buffer_clear(self, event: dict) -> None:
        """`output_audio_buffer.clear` exists for WebRTC/SIP only, as upstream says."""
        raise _invalid_value("type", "output_audio_buffer.clear is only supported for WebRTC.")

    # ---------------------------------------------------------------- responses

    async def response_create(self, event: dict) -> None:
        """`response.create`: start a response unless one is already running."""
        params = event.get("response")
        params = {} if params is None else _typed(params, dict, "response")
        await self._start_response(self._checked_response_params(params))

    def _checked_response_params(self, params: dict) -> dict:
        _check_unknown(params, RESPONSE_FIELDS, "response")
        checked = dict(params)
        if "output_modalities" in params:
            checked["output_modalities"] = self._checked_modalities(
                params["output_modalities"], "response.output_modalities"
            )
        if "tools" in params:
            checked["tools"] = self._checked_tools(params["tools"], "response.tools")
        if "tool_choice" in params:
            self._check_tool_choice(params["tool_choice"], "response.tool_choice")
        if "max_output_tokens" in params:
            self._check_max_output_tokens(params["max_output_tokens"], "response.max_output_tokens")
        if "instructions" in params:
            _typed(params["instructions"], str, "response.instructions")
        if params.get("conversation", "auto") not in ("auto", "none"):
            raise _invalid_value("response.conversation", "use 'auto' or 'none'.")
        if "input" in params:
            checked["input"] = [
                self._items[self._find(entry.get("id"))]
                if isinstance(entry, dict) and entry.get("type") == "item_reference"
                else self._item_from_client(_typed(entry, dict, "response.input[]"))
                for entry in _typed(params["input"], list, "response.input")
            ]
        return checked

    async def _start_response(self, params: dict) -> None:
        if self._active is not None:
            raise SimulatorError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        response = _Response(id=new_id("resp"), params=params)
        self._active = response
        self._responses_started += 1
        await self._emit(
            {"type": "response.created", "response": self._response_object(response, "in_progress")}
        )
        response.task = self._spawn(self._run_response(response, self._responses_started == 1))

    def _setting(self, response: _Response, key: str):
        return response.params.get(key, self.session.get(key))

    def _response_object(self, response: _Response, status: str, **extra) -> dict:
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": None,
            "output": [],
            "conversation_id": (
                None if response.params.get("conversation") == "none" else self.conversation_id
            ),
            "output_modalities": self._setting(response, "output_modalities"),
            "max_output_tokens": self._setting(response, "max_output_tokens"),
            "audio": {"output": copy.deepcopy(self.session["audio"]["output"])},
            "metadata": response.params.get("metadata"),
            "usage": None,
            **extra,
        }

    async def response_cancel(self, event: dict) -> None:
        """`response.cancel`: stop the running response now (it ends `cancelled`)."""
        response_id = event.get("response_id")
        active = self._active
        if active is None or (response_id is not None and response_id != active.id):
            raise SimulatorError(
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
            )
        await self._stop_response(active, "client_cancelled")

    async def _stop_response(self, response: _Response, reason: str) -> None:
        if not response.stop_reason:
            response.stop_reason = reason
        response.stop.set()
        task = response.task
        if task is not None and task is not asyncio.current_task():
            # The response task wakes at once and sends its own `response.done`.
            await asyncio.wait({task}, timeout=5)

    async def _run_response(self, response: _Response, first: bool) -> None:
        try:
            context = response.params.get("input")
            if context is None:
                context = list(self._items)
            segments = self._input_segments(response, context)
            tools = self._setting(response, "tools") or []
            tool_names = {t.get("name") for t in tools}
            if self._setting(response, "tool_choice") == "none":
                tool_names = set()
            latest = context[-1] if context else None
            call = None
            if latest is not None and latest.typed:
                call = duck_replies.detect_tool_call(latest.words, tool_names)
            if call is not None:
                await self._run_function_call(response, segments, *call)
                return
            if latest is not None and latest.data.get("type") == "function_call_output":
                text = duck_replies.reply_to_tool_output(latest.words)
            else:
                users = [i for i in context if i.data.get("role") == "user"]
                text = duck_replies.reply_to_user(users[-1].words if users else None)
            await self._run_message(response, segments, text, first)
        finally:
            if self._active is response:
                self._active = None

    async def _open_output_item(self, response, item):
        """Add an output item to the response and the conversation, announcing both;
        returns the event fields that locate it and the previous conversation item's id."""
        previous = self._add_output_item(response, item)
        where = {"response_id": response.id, "item_id": item.id, "output_index": 0}
        await self._emit(
            {"type": "response.output_item.added", **where, "item": copy.deepcopy(item.data)}
        )
        await self._emit(
            {
                "type": "conversation.item.added",
                "previous_item_id": previous,
                "item": copy.deepcopy(item.data),
            }
        )
        return where, previous

    def _add_output_item(self, response: _Response, item: _Item) -> str | None:
        """Put the response's item in the conversation (unless out-of-band); its predecessor."""
        if response.params.get("conversation") == "none":
            return None
        previous = self._items[-1].id if self._items else None
        self._items.append(item)
        return previous

    async def _run_message(
        self, response: _Response, segments: list, text: str, first: bool
    ) -> None:
        audio = self._setting(response, "output_modalities") == ["audio"]
        item = _Item(
            data={
                "id": new_id("item"),
                "type": "message",
                "object": "realtime.item",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
            audio_tokens_per_second=ASSISTANT_AUDIO_TOKENS_PER_SECOND if audio else 0,
        )
        where, previous = await self._open_output_item(response, item)
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        where["content_index"] = 0
        await self._emit({"type": "response.content_part.added", **where, "part": part})
        if audio:
            said, seconds = await self._stream_audio(response, item, where, text, first)
        else:
            said, seconds = await self._stream_text(response, item, where, text)
        if said is None:  # the fault closed the connection mid-stream
            return
        if audio:
            part = {"type": "audio", "transcript": said}
            await self._emit({"type": "response.output_audio.done", **where})
            await self._emit(
                {"type": "response.output_audio_transcript.done", **where, "transcript": said}
            )
            item.data["content"] = [{"type": "output_audio", "transcript": said}]
        else:
            part = {"type": "text", "text": said}
            await self._emit({"type": "response.output_text.done", **where, "text": said})
            item.data["content"] = [{"type": "output_text", "text": said}]
            item.text_chars = len(said)
        item.words = said
        item.audio_seconds = seconds
        status = self._final_status(response)
        item.data["status"] = "completed" if status == "completed" else "incomplete"
        await self._emit({"type": "response.content_part.done", **where, "part": part})
        del where["content_index"]
        await self._emit(
            {"type": "response.output_item.done", **where, "item": copy.deepcopy(item.data)}
        )
        await self._emit(
            {
                "type": "conversation.item.done",
                "previous_item_id": previous,
                "item": copy.deepcopy(item.data),
            }
        )
        await self._finish(response, segments, [item], len(said), seconds)

    async def _stream_audio(
        self, response: _Response, item: _Item, where: dict, text: str, first: bool
    ) -> tuple[str | None, float]:
        """Stream the spoken answer; return (transcript actually sent, seconds of audio sent)."""
        pcm = speech_like_pcm(
            len(text) / SPEAKING_CHARS_PER_SECOND, seed=duck_replies.stable_hash(text)
        )
        chunk_bytes = pcm_bytes(AUDIO_CHUNK_SECONDS)
        chunk_count = max(1, math.ceil(len(pcm) / chunk_bytes))
        pieces = _word_pieces(text)
        limit = self._setting(response, "max_output_tokens")
        if self.fault == "ignore_max_output_tokens":
            limit = "inf"
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent_bytes = 0
        said = ""
        words_sent = 0
        self._audio_output_started = True
        for index in range(chunk_count):
            await self._wait_until(response, started + pcm_seconds(sent_bytes) * self.pace)
            if response.stop.is_set() or self.closed:
                break
            # Transcript runs slightly ahead of the audio, as upstream's does.
            words_due = math.ceil(len(pieces) * (index + 1) / chunk_count)
            if words_due > words_sent:
                delta = "".join(pieces[words_sent:words_due])
                words_sent = words_due
                said += delta
                await self._emit(
                    {"type": "response.output_audio_transcript.delta", **where, "delta": delta}
                )
            chunk = pcm[index * chunk_bytes : (index + 1) * chunk_bytes]
            bounded = False
            if limit != "inf":
                # As upstream does: the output never passes max_output_tokens, so the last
                # chunk is cut to the tokens left (audio and transcript count together).
                room = limit - text_tokens(len(said))
                room_bytes = pcm_bytes(room / ASSISTANT_AUDIO_TOKENS_PER_SECOND) - sent_bytes
                if room_bytes < len(chunk):
                    chunk = chunk[: max(0, room_bytes)]
                    bounded = True
                    response.stop_reason = response.stop_reason or "max_output_tokens"
                    if not chunk:
                        break
            await self._emit(
                {
                    "type": "response.output_audio.delta",
                    **where,
                    "delta": base64.b64encode(chunk).decode("ascii"),
                }
            )
            sent_bytes += len(chunk)
            item.audio_seconds = pcm_seconds(sent_bytes)
            if first and index == 0 and self.fault == "close_mid_response":
                await self._close_transport(CLOSE_INTERNAL_ERROR, "simulated upstream failure")
                return None, item.audio_seconds
            if bounded or (
                limit != "inf"
                and round(item.audio_seconds * ASSISTANT_AUDIO_TOKENS_PER_SECOND)
                + text_tokens(len(said))
                >= limit
            ):
                response.stop_reason = response.stop_reason or "max_output_tokens"
                break
        else:
            await self._wait_until(response, started + pcm_seconds(sent_bytes) * self.pace)
        return said, pcm_seconds(sent_bytes)

    async def _stream_text(
        self, response: _Response, item: _Item, where: dict, text: str
    ) -> tuple[str, float]:
        said = ""
        limit = self._setting(response, "max_output_tokens")
        for piece in _word_pieces(text):
            await asyncio.sleep(0)
            if response.stop.is_set() or self.closed:
                break
            said += piece
            await self._emit({"type": "response.output_text.delta", **where, "delta": piece})
            if limit != "inf" and text_tokens(len(said)) >= limit:
                response.stop_reason = response.stop_reason or "max_output_tokens"
                break
        return said, 0.0

    async def _wait_until(self, response: _Response, due: float) -> None:
        """Sleep until `due` (loop time), waking early if the response is stopped."""
        delay = due - asyncio.get_running_loop().time()
        if self.pace <= 0 or delay <= 0:
            await asyncio.sleep(0)  # let the receive loop run (a cancel may be waiting)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(response.stop.wait(), delay)

    async def _run_function_call(
        self, response: _Response, segments: list, name: str, arguments: str
    ) -> None:
        call_id = new_id("call")
        item = _Item(
            data={
                "id": new_id("item"),
                "type": "function_call",
                "object": "realtime.item",
                "status": "in_progress",
                "name": name,
                "call_id": call_id,
                "arguments": "",
            },
            text_chars=len(name) + len(arguments),
        )
        where, previous = await self._open_output_item(response, item)
        step = max(1, math.ceil(len(arguments) / 3))
        for start in range(0, len(arguments), step):
            await self._emit(
                {
                    "type": "response.function_call_arguments.delta",
                    **where,
                    "call_id": call_id,
                    "delta": arguments[start : start + step],
                }
            )
        await self._emit(
            {
                "type": "response.function_call_arguments.done",
                **where,
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
            }
        )
        item.data.update(status="completed", arguments=arguments)
        await self._emit(
            {"type": "response.output_item.done", **where, "item": copy.deepcopy(item.data)}
        )
        await self._emit(
            {
                "type": "conversation.item.done",
                "previous_item_id": previous,
                "item": copy.deepcopy(item.data),
            }
        )
        await self._finish(response, segments, [item], len(name) + len(arguments), 0.0)

    def _final_status(self, response: _Response) -> str:
        if response.stop_reason in ("client_cancelled", "turn_detected"):
            return "cancelled"
        if response.stop_reason == "max_output_tokens":
            return "incomplete"
        return "completed"

    async def _finish(
        self,
        response: _Response,
        segments: list,
        output: list[_Item],
        output_chars: int,
        output_seconds: float,
    ) -> None:
        status = self._final_status(response)
        details = None
        if status != "completed":
            details = {"type": status, "reason": response.stop_reason}
        usage = self._usage(segments, output_chars, output_seconds)
        final = self._response_object(
            response,
            status,
            status_details=details,
            output=[copy.deepcopy(i.data) for i in output],
            usage=usage,
        )
        self._billed_segments = segments
        if self._active is response:
            self._active = None
        await self._emit({"type": "response.done", "response": final})
        if self.recorder is not None:
            self.recorder.record_response_done(self.session_id, final)
        self._rate_limit_requests = max(0, self._rate_limit_requests - 1)
        self._rate_limit_tokens = max(0, self._rate_limit_tokens - usage["total_tokens"])
        await self._emit(
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {
                        "name": "requests",
                        "limit": 5000,
                        "remaining": self._rate_limit_requests,
                        "reset_seconds": 0.012,
                    },
                    {
                        "name": "tokens",
                        "limit": 400_000,
                        "remaining": self._rate_limit_tokens,
                        "reset_seconds": 0.6,
                    },
                ],
            }
        )

    # ---------------------------------------------------------------- billing

    def _input_segments(self, response: _Response, context: list[_Item]) -> list[tuple]:
        """The response's input as (cache key, text tokens, audio tokens) pieces, in order."""
        instructions = self._setting(response, "instructions") or ""
        tools = self._setting(response, "tools") or []
        prefix = instructions + json.dumps(tools, sort_keys=True)
        segments: list[tuple[Hashable, int, int]] = [
            (("prefix", duck_replies.stable_hash(prefix)), text_tokens(len(prefix)), 0)
        ]
        for item in context:
            text, audio = item.input_tokens()
            segments.append(((item.id, text, audio), text, audio))
        return segments

    def _usage(self, segments: list, output_chars: int, output_seconds: float) -> dict:
        text_in = sum(s[1] for s in segments)
        audio_in = sum(s[2] for s in segments)
        # Upstream caches by prefix: what matches the previous response's input is cached.
        cached_text = cached_audio = 0
        for now, before in zip(segments, self._billed_segments, strict=False):
            if now[0] != before[0]:
                break
            cached_text += now[1]
            cached_audio += now[2]
        text_out = text_tokens(output_chars)
        audio_out = round(output_seconds * ASSISTANT_AUDIO_TOKENS_PER_SECOND)
        input_tokens = text_in + audio_in
        output_tokens = text_out + audio_out
        return {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }
