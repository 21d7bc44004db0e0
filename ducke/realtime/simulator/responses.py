"""Responses: `response.create` / `response.cancel`, answers streamed as audio or text (or a
function call), and their `response.done` with the usage billed (see `usage`).

Audio answers are synthesised speech-like pcm16 at ~14 chars/s, streamed in 100 ms chunks
paced at `pace` x real time; the transcript runs slightly ahead of the audio.
"""

import asyncio
import base64
import contextlib
import copy
import math
from dataclasses import dataclass, field

from ducke.realtime import duck_replies
from ducke.realtime.simulator import faults, usage
from ducke.realtime.simulator.conversation import Item
from ducke.realtime.simulator.protocol import (
    CLOSE_INTERNAL_ERROR,
    SimulatorError,
    check_unknown,
    invalid_value,
    new_id,
    typed,
    word_pieces,
)
from ducke.realtime.simulator.session import (
    check_max_output_tokens,
    check_tool_choice,
    checked_modalities,
    checked_tools,
)
from ducke.realtime.simulator.usage import (
    ASSISTANT_AUDIO_TOKENS_PER_SECOND,
    SPEAKING_CHARS_PER_SECOND,
    text_tokens,
)
from ducke.realtime.synth import pcm_bytes, pcm_seconds, speech_like_pcm

AUDIO_CHUNK_SECONDS = 0.1
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


@dataclass
class Response:
    """A response in progress."""

    id: str
    params: dict
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = ""
    task: asyncio.Task | None = None


class Responses:
    """The running response (at most one), the responses' tasks, and what was billed last.

    Needs from the connection: `session`, `fault`, `pace`, `closed`, `recorder`, `session_id`,
    `_emit`, `_spawn`, `_close_transport`, and the conversation's `_items`, `_find`,
    `_item_from_client`.
    """

    def _init_responses(self) -> None:
        self._billed_segments: list[usage.Segment] = []
        self._active: Response | None = None
        self._responses_started = 0
        self._audio_output_started = False
        self._rate_limits = usage.RateLimits()

    async def response_create(self, event: dict) -> None:
        """`response.create`: start a response unless one is already running."""
        params = event.get("response")
        params = {} if params is None else typed(params, dict, "response")
        await self._start_response(self._checked_response_params(params))

    def _checked_response_params(self, params: dict) -> dict:
        check_unknown(params, RESPONSE_FIELDS, "response")
        checked = dict(params)
        if "output_modalities" in params:
            checked["output_modalities"] = checked_modalities(
                params["output_modalities"], "response.output_modalities"
            )
        if "tools" in params:
            checked["tools"] = checked_tools(params["tools"], "response.tools")
        if "tool_choice" in params:
            check_tool_choice(params["tool_choice"], "response.tool_choice")
        if "max_output_tokens" in params:
            check_max_output_tokens(params["max_output_tokens"], "response.max_output_tokens")
        if "instructions" in params:
            typed(params["instructions"], str, "response.instructions")
        if params.get("conversation", "auto") not in ("auto", "none"):
            raise invalid_value("response.conversation", "use 'auto' or 'none'.")
        if "input" in params:
            checked["input"] = [
                self._items[self._find(entry.get("id"))]
                if isinstance(entry, dict) and entry.get("type") == "item_reference"
                else self._item_from_client(typed(entry, dict, "response.input[]"))
                for entry in typed(params["input"], list, "response.input")
            ]
        return checked

    async def _start_response(self, params: dict) -> None:
        if self._active is not None:
            raise SimulatorError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        response = Response(id=new_id("resp"), params=params)
        self._active = response
        self._responses_started += 1
        await self._emit(
            {"type": "response.created", "response": self._response_object(response, "in_progress")}
        )
        response.task = self._spawn(self._run_response(response, self._responses_started == 1))

    def _setting(self, response: Response, key: str):
        return response.params.get(key, self.session.get(key))

    def _response_object(self, response: Response, status: str, **extra) -> dict:
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

    async def _stop_response(self, response: Response, reason: str) -> None:
        if not response.stop_reason:
            response.stop_reason = reason
        response.stop.set()
        task = response.task
        if task is not None and task is not asyncio.current_task():
            # The response task wakes at once and sends its own `response.done`.
            await asyncio.wait({task}, timeout=5)

    async def _run_response(self, response: Response, first: bool) -> None:
        try:
            context = response.params.get("input")
            if context is None:
                context = list(self._items)
            segments = usage.input_segments(
                self._setting(response, "instructions") or "",
                self._setting(response, "tools") or [],
                context,
            )
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

    def _add_output_item(self, response: Response, item: Item) -> str | None:
        """Put the response's item in the conversation (unless out-of-band); its predecessor."""
        if response.params.get("conversation") == "none":
            return None
        previous = self._items[-1].id if self._items else None
        self._items.append(item)
        return previous

    async def _run_message(
        self, response: Response, segments: list, text: str, first: bool
    ) -> None:
        audio = self._setting(response, "output_modalities") == ["audio"]
        item = Item(
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
        self, response: Response, item: Item, where: dict, text: str, first: bool
    ) -> tuple[str | None, float]:
        """Stream the spoken answer; return (transcript actually sent, seconds of audio sent)."""
        pcm = speech_like_pcm(
            len(text) / SPEAKING_CHARS_PER_SECOND, seed=duck_replies.stable_hash(text)
        )
        chunk_bytes = pcm_bytes(AUDIO_CHUNK_SECONDS)
        chunk_count = max(1, math.ceil(len(pcm) / chunk_bytes))
        pieces = word_pieces(text)
        limit = self._setting(response, "max_output_tokens")
        if self.fault == faults.IGNORE_MAX_OUTPUT_TOKENS:
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
            if first and index == 0 and self.fault == faults.CLOSE_MID_RESPONSE:
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
        self, response: Response, item: Item, where: dict, text: str
    ) -> tuple[str, float]:
        said = ""
        limit = self._setting(response, "max_output_tokens")
        for piece in word_pieces(text):
            await asyncio.sleep(0)
            if response.stop.is_set() or self.closed:
                break
            said += piece
            await self._emit({"type": "response.output_text.delta", **where, "delta": piece})
            if limit != "inf" and text_tokens(len(said)) >= limit:
                response.stop_reason = response.stop_reason or "max_output_tokens"
                break
        return said, 0.0

    async def _wait_until(self, response: Response, due: float) -> None:
        """Sleep until `due` (loop time), waking early if the response is stopped."""
        delay = due - asyncio.get_running_loop().time()
        if self.pace <= 0 or delay <= 0:
            await asyncio.sleep(0)  # let the receive loop run (a cancel may be waiting)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(response.stop.wait(), delay)

    async def _run_function_call(
        self, response: Response, segments: list, name: str, arguments: str
    ) -> None:
        call_id = new_id("call")
        item = Item(
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

    def _final_status(self, response: Response) -> str:
        if response.stop_reason in ("client_cancelled", "turn_detected"):
            return "cancelled"
        if response.stop_reason == "max_output_tokens":
            return "incomplete"
        return "completed"

    async def _finish(
        self,
        response: Response,
        segments: list,
        output: list[Item],
        output_chars: int,
        output_seconds: float,
    ) -> None:
        status = self._final_status(response)
        details = None
        if status != "completed":
            details = {"type": status, "reason": response.stop_reason}
        billed = usage.usage(segments, self._billed_segments, output_chars, output_seconds)
        final = self._response_object(
            response,
            status,
            status_details=details,
            output=[copy.deepcopy(i.data) for i in output],
            usage=billed,
        )
        self._billed_segments = segments
        if self._active is response:
            self._active = None
        await self._emit({"type": "response.done", "response": final})
        if self.recorder is not None:
            self.recorder.record_response_done(self.session_id, final)
        await self._emit(self._rate_limits.spend(billed["total_tokens"]))

    async def output_audio_buffer_clear(self, event: dict) -> None:
        """`output_audio_buffer.clear` exists for WebRTC/SIP only, as upstream says."""
        raise invalid_value("type", "output_audio_buffer.clear is only supported for WebRTC.")
