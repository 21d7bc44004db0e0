"""Session configuration and its validation: the session object, `session.update`, and the
checks a field gets (also used by `response.create` for the fields a response may override).
"""

import copy

from ducke.realtime.simulator.protocol import (
    check_unknown,
    invalid_value,
    require,
    typed,
)

SESSION_MAX_SECONDS = 3600.0
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


def checked_modalities(value, param: str) -> list:
    typed(value, list, param)
    if value not in (["audio"], ["text"]):
        raise invalid_value(param, "use ['audio'] or ['text'].")
    return list(value)


def checked_tools(value, param: str) -> list:
    typed(value, list, param)
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        typed(tool, dict, where)
        check_unknown(tool, {"type", "name", "description", "parameters"}, where)
        if tool.get("type", "function") != "function":
            raise invalid_value(f"{where}.type", "the simulator supports function tools.")
        name = require(tool, "name", str, f"{where}.name")
        if not name:
            raise invalid_value(f"{where}.name", "must not be empty.")
        if "description" in tool and tool["description"] is not None:
            typed(tool["description"], str, f"{where}.description")
        if "parameters" in tool and tool["parameters"] is not None:
            typed(tool["parameters"], dict, f"{where}.parameters")
    return copy.deepcopy(value)


def check_tool_choice(value, param: str) -> None:
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise invalid_value(param, "use 'auto', 'none', 'required' or a function.")
        return
    typed(value, dict, param)
    if value.get("type") != "function":
        raise invalid_value(f"{param}.type", "only 'function' can be forced.")
    require(value, "name", str, f"{param}.name")


def check_max_output_tokens(value, param: str) -> None:
    if value == "inf":
        return
    typed(value, int, param)
    if not 1 <= value <= 4096:
        raise invalid_value(param, "must be between 1 and 4096, or 'inf'.")


def checked_format(value, param: str) -> dict:
    typed(value, dict, param)
    check_unknown(value, {"type", "rate"}, param)
    if value.get("type", "audio/pcm") != "audio/pcm" or value.get("rate", 24000) != 24000:
        raise invalid_value(param, "the simulator speaks audio/pcm at 24000 Hz only.")
    return dict(PCM_FORMAT)


def checked_transcription(value):
    param = "session.audio.input.transcription"
    if value is None:
        return None
    typed(value, dict, param)
    check_unknown(value, {"model", "language", "languages", "prompt", "delay", "keywords"}, param)
    require(value, "model", str, f"{param}.model")
    return copy.deepcopy(value)


def checked_turn_detection(value):
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    typed(value, dict, param)
    kind = require(value, "type", str, f"{param}.type")
    if kind == "server_vad":
        defaults = SERVER_VAD_DEFAULTS
    elif kind == "semantic_vad":
        defaults = SEMANTIC_VAD_DEFAULTS
    else:
        raise invalid_value(f"{param}.type", "use 'server_vad' or 'semantic_vad'.")
    check_unknown(value, defaults.keys(), param)
    for key in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
        if value.get(key) is not None and typed(value[key], int, f"{param}.{key}") < 0:
            raise invalid_value(f"{param}.{key}", "must not be negative.")
    if value.get("threshold") is not None:
        threshold = typed(value["threshold"], (int, float), f"{param}.threshold")
        if not 0 <= threshold <= 1:
            raise invalid_value(f"{param}.threshold", "must be between 0 and 1.")
    for key in ("create_response", "interrupt_response"):
        if value.get(key) is not None:
            typed(value[key], bool, f"{param}.{key}")
    if value.get("eagerness") is not None and value["eagerness"] not in EAGERNESS_SILENCE_MS:
        raise invalid_value(f"{param}.eagerness", "use low, medium, high or auto.")
    return {**defaults, **{k: v for k, v in value.items() if v is not None}}


class SessionConfig:
    """The `session` of one connection and the `session.update` handler.

    Needs from the connection: `session_id`, `model`, `clock`, `max_session_seconds`,
    `_emit`, `_configure_vad` (input audio) and `_audio_output_started` (responses).
    """

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

    async def session_update(self, event: dict) -> None:
        """`session.update`: change only the fields sent, reply with the whole session."""
        patch = require(event, "session", dict, "session")
        check_unknown(patch, SESSION_FIELDS, "session")
        kind = require(patch, "type", str, "session.type")
        if kind != "realtime":
            raise invalid_value("session.type", "only 'realtime' sessions are simulated.")
        session = copy.deepcopy(self.session)
        for key, value in patch.items():
            if key in ("type", "audio"):
                continue
            session[key] = self._checked_session_field(key, value)
        if "audio" in patch:
            self._merge_audio(session, typed(patch["audio"], dict, "session.audio"))
        self.session = session
        self._configure_vad()
        await self._emit({"type": "session.updated", "session": copy.deepcopy(session)})

    def _checked_session_field(self, key: str, value):
        param = f"session.{key}"
        if key == "model":
            if typed(value, str, param) != self.model:
                raise invalid_value(param, "the model cannot be changed in a session.")
        elif key == "instructions":
            typed(value, str, param)
        elif key == "output_modalities":
            return checked_modalities(value, param)
        elif key == "tools":
            return checked_tools(value, param)
        elif key == "tool_choice":
            check_tool_choice(value, param)
        elif key == "max_output_tokens":
            check_max_output_tokens(value, param)
        return value

    def _merge_audio(self, session: dict, audio: dict) -> None:
        check_unknown(audio, {"input", "output"}, "session.audio")
        if "input" in audio:
            incoming = typed(audio["input"], dict, "session.audio.input")
            check_unknown(
                incoming,
                {"format", "transcription", "turn_detection", "noise_reduction"},
                "session.audio.input",
            )
            target = session["audio"]["input"]
            if "format" in incoming:
                target["format"] = checked_format(incoming["format"], "session.audio.input.format")
            if "transcription" in incoming:
                target["transcription"] = checked_transcription(incoming["transcription"])
            if "turn_detection" in incoming:
                target["turn_detection"] = checked_turn_detection(incoming["turn_detection"])
            if "noise_reduction" in incoming:
                value = incoming["noise_reduction"]
                if value is not None:
                    typed(value, dict, "session.audio.input.noise_reduction")
                target["noise_reduction"] = value
        if "output" in audio:
            incoming = typed(audio["output"], dict, "session.audio.output")
            check_unknown(incoming, {"format", "voice", "speed"}, "session.audio.output")
            target = session["audio"]["output"]
            if "format" in incoming:
                target["format"] = checked_format(incoming["format"], "session.audio.output.format")
            if "voice" in incoming:
                target["voice"] = self._checked_voice(incoming["voice"], target["voice"])
            if "speed" in incoming:
                speed = typed(incoming["speed"], (int, float), "session.audio.output.speed")
                if not 0.25 <= speed <= 1.5:
                    raise invalid_value("session.audio.output.speed", "must be 0.25 to 1.5.")
                target["speed"] = speed

    def _checked_voice(self, value, current):
        param = "session.audio.output.voice"
        if isinstance(value, dict):
            require(value, "id", str, f"{param}.id")
        elif typed(value, (str, dict), param) not in VOICES:
            raise invalid_value(param, "unknown voice.")
        if value != current and self._audio_output_started:
            raise invalid_value(param, "the voice cannot change after the first audio output.")
        return value
