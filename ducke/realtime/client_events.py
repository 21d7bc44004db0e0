"""The allowlist for browser -> upstream Realtime events.

The server owns the upstream session: a browser may stream audio, send user text, ask for or
cancel a response, truncate playback and pick a voice. Anything else — instructions, tools,
model, modalities, token limits, response overrides — is refused here and never reaches
upstream. Each allowed event is rebuilt from the fields it may carry, so unknown extra fields
are dropped too.
"""

import re

ALLOWED_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "cedar",
    "coral",
    "echo",
    "marin",
    "sage",
    "shimmer",
    "verse",
)
MAX_TEXT_CHARS = 4000
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class RefusedEvent(Exception):
    """A client event that may not go upstream; the message is safe to show the browser."""

    def __init__(self, message, code="event_not_allowed"):
        super().__init__(message)
        self.code = code


def _event_id(event, clean):
    event_id = event.get("event_id")
    if isinstance(event_id, str) and _ID.match(event_id):
        clean["event_id"] = event_id
    return clean


def _identifier(value, field):
    if not isinstance(value, str) or not _ID.match(value):
        raise RefusedEvent(f"{field} must be an id string", code="invalid_value")
    return value


def _audio_append(event):
    audio = event.get("audio")
    if not isinstance(audio, str) or not audio or len(audio) % 4:
        raise RefusedEvent("audio must be base64 pcm16 audio", code="invalid_value")
    # Only the characters are checked: the audio itself is never decoded here.
    if not _BASE64.match(audio):
        raise RefusedEvent("audio must be base64 pcm16 audio", code="invalid_value")
    return {"type": "input_audio_buffer.append", "audio": audio}


def _bare(event):
    return {"type": event["type"]}


def _item_create(event):
    item = event.get("item")
    if not isinstance(item, dict) or item.get("type") != "message" or item.get("role") != "user":
        raise RefusedEvent("only user text messages may be added to the conversation")
    content = item.get("content")
    if not isinstance(content, list) or not 1 <= len(content) <= 8:
        raise RefusedEvent("a user message needs 1 to 8 input_text parts", code="invalid_value")
    parts = []
    total = 0
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "input_text":
            raise RefusedEvent("only input_text content is allowed")
        text = part.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RefusedEvent("input_text needs a non-empty text", code="invalid_value")
        total += len(text)
        parts.append({"type": "input_text", "text": text})
    if total > MAX_TEXT_CHARS:
        raise RefusedEvent(f"text is limited to {MAX_TEXT_CHARS} characters", code="invalid_value")
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": parts},
    }


def _response_create(event):
    if event.get("response") not in (None, {}):
        raise RefusedEvent("response.create may not carry overrides")
    return {"type": "response.create"}


def _response_cancel(event):
    clean = {"type": "response.cancel"}
    if event.get("response_id") is not None:
        clean["response_id"] = _identifier(event["response_id"], "response_id")
    return clean


def _non_negative_int(value, field):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RefusedEvent(f"{field} must be a non-negative integer", code="invalid_value")
    return value


def _item_truncate(event):
    return {
        "type": "conversation.item.truncate",
        "item_id": _identifier(event.get("item_id"), "item_id"),
        "content_index": _non_negative_int(event.get("content_index", 0), "content_index"),
        "audio_end_ms": _non_negative_int(event.get("audio_end_ms"), "audio_end_ms"),
    }


def _session_update(event):
    session = event.get("session")
    if not isinstance(session, dict) or set(session) - {"type", "audio"}:
        raise RefusedEvent("session.update may only change the voice")
    if session.get("type", "realtime") != "realtime":
        raise RefusedEvent("session.update may only change the voice")
    audio = session.get("audio")
    if not isinstance(audio, dict) or set(audio) != {"output"}:
        raise RefusedEvent("session.update may only change the voice")
    output = audio["output"]
    if not isinstance(output, dict) or set(output) != {"voice"}:
        raise RefusedEvent("session.update may only change the voice")
    voice = output["voice"]
    if voice not in ALLOWED_VOICES:
        raise RefusedEvent(
            f"voice must be one of: {', '.join(ALLOWED_VOICES)}", code="invalid_value"
        )
    return {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"output": {"voice": voice}}},
    }


_RULES = {
    "input_audio_buffer.append": _audio_append,
    "input_audio_buffer.commit": _bare,
    "input_audio_buffer.clear": _bare,
    "conversation.item.create": _item_create,
    "response.create": _response_create,
    "response.cancel": _response_cancel,
    "conversation.item.truncate": _item_truncate,
    "session.update": _session_update,
}


def sanitize(event):
    """Return the upstream-safe copy of a browser event, or raise ``RefusedEvent``."""
    if not isinstance(event, dict):
        raise RefusedEvent("an event must be a JSON object", code="invalid_json")
    kind = event.get("type")
    rule = _RULES.get(kind) if isinstance(kind, str) else None
    if rule is None:
        shown = kind if isinstance(kind, str) and len(kind) <= 64 else "?"
        raise RefusedEvent(f"event type {shown!r} is not allowed")
    return _event_id(event, rule(event))
