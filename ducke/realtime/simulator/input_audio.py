"""Input audio: the buffer, server VAD over it (turn detection), commits and transcription."""

import base64
import binascii

from ducke.realtime import duck_replies
from ducke.realtime.simulator.conversation import Item
from ducke.realtime.simulator.protocol import (
    SimulatorError,
    invalid_value,
    new_id,
    require,
    word_pieces,
)
from ducke.realtime.simulator.session import EAGERNESS_SILENCE_MS, SERVER_VAD_DEFAULTS
from ducke.realtime.simulator.usage import USER_AUDIO_TOKENS_PER_SECOND, text_tokens
from ducke.realtime.synth import BYTES_PER_SECOND, EnergyVad

MIN_COMMIT_MS = 100


class InputAudio:
    """The `input_audio_buffer.*` handlers, the VAD and the buffer's position in the stream.

    Needs from the connection: `session`, `_emit`, the conversation's `_items` and
    `_emit_item_added`, the responses' `_active`, `_start_response` and `_stop_response`.
    """

    def _init_input_audio(self) -> None:
        self._vad = EnergyVad()
        self._configure_vad()
        self._appended_bytes = 0
        self._buffer_start_ms = 0.0
        self._speech_start_ms = 0.0
        self._pending_item_id = ""

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

    def _now_ms(self) -> float:
        return self._appended_bytes * 1000 / BYTES_PER_SECOND

    async def input_audio_buffer_append(self, event: dict) -> None:
        """`input_audio_buffer.append`: buffer audio and run server VAD over it."""
        audio = require(event, "audio", str, "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid_value("audio", "not valid base64.") from exc
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
        spoken = USER_AUDIO_TOKENS_PER_SECOND  # user audio messages: the turns spoken so far
        turn_number = sum(1 for i in self._items if i.audio_tokens_per_second == spoken)
        heard = duck_replies.spoken_question(turn_number, seconds)
        item = Item(
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

    async def _transcribe(self, item: Item, transcription: dict, seconds: float) -> None:
        transcript = item.words
        for piece in word_pieces(transcript):
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
