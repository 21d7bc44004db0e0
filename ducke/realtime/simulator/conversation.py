"""The conversation: its items, and the `conversation.item.*` handlers."""

import base64
import binascii
import copy
from dataclasses import dataclass

from ducke.realtime.simulator.protocol import invalid_value, new_id, require, typed
from ducke.realtime.simulator.usage import (
    ASSISTANT_AUDIO_TOKENS_PER_SECOND,
    SPEAKING_CHARS_PER_SECOND,
    USER_AUDIO_TOKENS_PER_SECOND,
    text_tokens,
)
from ducke.realtime.synth import pcm_seconds


@dataclass
class Item:
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


class Conversation:
    """The conversation's items in order, and the handlers that add, show, cut and remove them.

    Needs from the connection: `_emit`.
    """

    def _init_conversation(self) -> None:
        self.conversation_id = new_id("conv")
        self._items: list[Item] = []

    async def _emit_item_added(self, item: Item, previous: str | None) -> None:
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self._emit(
                {"type": kind, "previous_item_id": previous, "item": copy.deepcopy(item.data)}
            )

    def _find(self, item_id) -> int:
        for index, item in enumerate(self._items):
            if item.id == item_id:
                return index
        raise invalid_value("item_id", f"no item with id '{str(item_id)[:64]}'.")

    async def conversation_item_create(self, event: dict) -> None:
        """`conversation.item.create`: add a message, function call or tool output."""
        item = self._item_from_client(require(event, "item", dict, "item"))
        if any(existing.id == item.id for existing in self._items):
            raise invalid_value("item.id", "an item with this id already exists.")
        previous_id = event.get("previous_item_id")
        if previous_id is None:
            index = len(self._items)
        elif previous_id == "root":
            index = 0
        else:
            index = self._find(typed(previous_id, str, "previous_item_id")) + 1
        self._items.insert(index, item)
        previous = self._items[index - 1].id if index > 0 else None
        await self._emit_item_added(item, previous)

    def _item_from_client(self, raw: dict) -> Item:
        kind = require(raw, "type", str, "item.type")
        item_id = raw.get("id") or new_id("item")
        typed(item_id, str, "item.id")
        base = {"id": item_id, "type": kind, "object": "realtime.item", "status": "completed"}
        if kind == "function_call_output":
            call_id = require(raw, "call_id", str, "item.call_id")
            output = require(raw, "output", str, "item.output")
            data = {**base, "call_id": call_id, "output": output}
            return Item(data=data, text_chars=len(output), words=output)
        if kind == "function_call":
            name = require(raw, "name", str, "item.name")
            arguments = require(raw, "arguments", str, "item.arguments")
            call_id = raw.get("call_id") or new_id("call")
            data = {**base, "call_id": call_id, "name": name, "arguments": arguments}
            return Item(data=data, text_chars=len(name) + len(arguments))
        if kind != "message":
            raise invalid_value(
                "item.type", "use 'message', 'function_call' or 'function_call_output'."
            )
        role = require(raw, "role", str, "item.role")
        allowed = {
            "user": {"input_text", "input_audio"},
            "system": {"input_text"},
            "assistant": {"output_text", "output_audio"},
        }
        if role not in allowed:
            raise invalid_value("item.role", "use 'user', 'assistant' or 'system'.")
        parts = require(raw, "content", list, "item.content")
        item = Item(data={**base, "role": role, "content": []})
        words = []
        for index, part in enumerate(parts):
            where = f"item.content[{index}]"
            typed(part, dict, where)
            part_type = require(part, "type", str, f"{where}.type")
            if part_type not in allowed[role]:
                raise invalid_value(f"{where}.type", f"not allowed for role '{role}'.")
            if part_type in ("input_text", "output_text"):
                text = require(part, "text", str, f"{where}.text")
                item.text_chars += len(text)
                words.append(text)
                item.typed = item.typed or role == "user"
                item.data["content"].append({"type": part_type, "text": text})
                continue
            transcript = part.get("transcript")
            if transcript is not None:
                words.append(typed(transcript, str, f"{where}.transcript"))
            if part_type == "input_audio":
                audio = typed(part.get("audio") or "", str, f"{where}.audio")
                try:
                    item.audio_seconds += pcm_seconds(len(base64.b64decode(audio, validate=True)))
                except (binascii.Error, ValueError) as exc:
                    raise invalid_value(f"{where}.audio", "not valid base64.") from exc
                item.audio_tokens_per_second = USER_AUDIO_TOKENS_PER_SECOND
            else:
                item.audio_seconds += len(transcript or "") / SPEAKING_CHARS_PER_SECOND
                item.audio_tokens_per_second = ASSISTANT_AUDIO_TOKENS_PER_SECOND
            item.data["content"].append({"type": part_type, "transcript": transcript})
        item.words = " ".join(words)
        return item

    async def conversation_item_retrieve(self, event: dict) -> None:
        """`conversation.item.retrieve`: send the server's copy of an item."""
        item = self._items[self._find(require(event, "item_id", str, "item_id"))]
        await self._emit({"type": "conversation.item.retrieved", "item": copy.deepcopy(item.data)})

    async def conversation_item_truncate(self, event: dict) -> None:
        """`conversation.item.truncate`: cut assistant audio the user did not hear."""
        item = self._items[self._find(require(event, "item_id", str, "item_id"))]
        content_index = require(event, "content_index", int, "content_index")
        audio_end_ms = require(event, "audio_end_ms", int, "audio_end_ms")
        if item.data.get("role") != "assistant" or item.audio_tokens_per_second == 0:
            raise invalid_value("item_id", "only assistant audio messages can be truncated.")
        if content_index != 0:
            raise invalid_value("content_index", "the simulator's items have one audio part.")
        if not 0 <= audio_end_ms <= round(item.audio_seconds * 1000):
            raise invalid_value(
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
        item_id = require(event, "item_id", str, "item_id")
        del self._items[self._find(item_id)]
        await self._emit({"type": "conversation.item.deleted", "item_id": item_id})
