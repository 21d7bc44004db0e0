"""A local stand-in for the OpenAI Realtime API (GA protocol), independent of any transport.

One `RealtimeSimulator` serves one WebSocket connection: the transport (the channels
`SimulatorConsumer`, the `websockets` server in `server`, or a test) calls `start()`, then
`handle()` / `handle_text()` for every client frame, and `close()` when the socket goes away.
The simulator answers through the `send` coroutine it was given, with the GA event names and
shapes of the `openai` SDK's `openai.types.realtime` (see /work/shared/REALTIME.md).

The package, by job:
- `connection`: `RealtimeSimulator`: lifecycle, sending, dispatch of client frames.
- `session`: session configuration and validation (`session.update`).
- `input_audio`: the input audio buffer and server VAD on audio energy
  (`ducke.realtime.synth.EnergyVad`), honouring `turn_detection.silence_duration_ms` /
  `prefix_padding_ms` / `threshold`. It cannot recognise speech: a spoken turn is "heard" as
  one of a few canned developer questions (`duck_replies.spoken_question`), chosen by the turn
  number and its duration.
- `conversation`: the conversation items and `conversation.item.*`.
- `responses`: answers: short rubber-duck replies derived from the last user words, or a
  summary of the latest tool output; text asking for weather or a search becomes a function
  call when that tool is in the session. Audio answers are synthesised speech-like pcm16 at
  ~14 chars/s, streamed in 100 ms chunks paced at `pace` x real time.
- `usage`: `response.done` usage billed like the real service (the whole conversation is
  input on every response, the part billed before counts as cached; audio is 10 tokens/s
  from the user and 20 tokens/s from the assistant; text is chars/4) and the rate limits.
- `recorder`: the request log (`SimulatorRecorder`), what every connection received and billed.
- `faults`: `close_after_created`, `close_mid_response`, `ignore_max_output_tokens`, and
  `reject` (the transport refuses the handshake).
- `protocol`: ids, client event types, close codes, `SimulatorError` and its checks.

`stamp=True` (benchmarks only) adds `x_seq` (send order) and `x_sent_ns`
(`time.monotonic_ns()` at send) to every server event. Sessions end after
`max_session_seconds` (60 min).
"""

from ducke.realtime.simulator.connection import RealtimeSimulator
from ducke.realtime.simulator.conversation import Item
from ducke.realtime.simulator.faults import FAULTS
from ducke.realtime.simulator.input_audio import MIN_COMMIT_MS
from ducke.realtime.simulator.protocol import (
    CLIENT_EVENT_TYPES,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    Disconnect,
    Send,
    SimulatorError,
    new_id,
)
from ducke.realtime.simulator.recorder import RecordedEvent, SimulatorRecorder
from ducke.realtime.simulator.responses import AUDIO_CHUNK_SECONDS, RESPONSE_FIELDS, Response
from ducke.realtime.simulator.session import (
    DEFAULT_INSTRUCTIONS,
    EAGERNESS_SILENCE_MS,
    PCM_FORMAT,
    SEMANTIC_VAD_DEFAULTS,
    SERVER_VAD_DEFAULTS,
    SESSION_FIELDS,
    SESSION_MAX_SECONDS,
    VOICES,
)
from ducke.realtime.simulator.usage import (
    ASSISTANT_AUDIO_TOKENS_PER_SECOND,
    CHARS_PER_TEXT_TOKEN,
    SPEAKING_CHARS_PER_SECOND,
    USER_AUDIO_TOKENS_PER_SECOND,
    text_tokens,
)

__all__ = [
    "ASSISTANT_AUDIO_TOKENS_PER_SECOND",
    "AUDIO_CHUNK_SECONDS",
    "CHARS_PER_TEXT_TOKEN",
    "CLIENT_EVENT_TYPES",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_POLICY_VIOLATION",
    "DEFAULT_INSTRUCTIONS",
    "EAGERNESS_SILENCE_MS",
    "FAULTS",
    "MIN_COMMIT_MS",
    "PCM_FORMAT",
    "RESPONSE_FIELDS",
    "SEMANTIC_VAD_DEFAULTS",
    "SERVER_VAD_DEFAULTS",
    "SESSION_FIELDS",
    "SESSION_MAX_SECONDS",
    "SPEAKING_CHARS_PER_SECOND",
    "USER_AUDIO_TOKENS_PER_SECOND",
    "VOICES",
    "Disconnect",
    "Item",
    "RealtimeSimulator",
    "RecordedEvent",
    "Response",
    "Send",
    "SimulatorError",
    "SimulatorRecorder",
    "new_id",
    "text_tokens",
]
