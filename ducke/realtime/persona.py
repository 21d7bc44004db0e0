"""DUCK-E's upstream session: persona, audio formats, turn detection and tools."""

from django.utils.translation import get_language_info
from django.utils.translation.trans_real import parse_accept_lang_header

DEFAULT_VOICE = "alloy"
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
DEFAULT_MAX_OUTPUT = 1000

INSTRUCTIONS = """You are DUCK-E, a friendly rubber duck that helps developers debug by talking.
Listen to the developer explain their problem, ask one short clarifying question at a time,
and nudge them to find the bug themselves. Keep spoken answers brief: two or three sentences.
When you look something up, first say in a few words what you are searching for.
You can check the current weather and the forecast, and search the web.
Answer in {language}."""


def preferred_language(accept_language):
    """A language name for the persona from an Accept-Language header (English by default)."""
    try:
        ranked = parse_accept_lang_header(accept_language or "")
    except ValueError:
        ranked = ()
    for tag, _quality in ranked:
        if tag == "*":
            continue
        for code in (tag.lower(), tag.split("-")[0].lower()):
            try:
                return get_language_info(code)["name"]
            except KeyError:
                continue
    return "English"


def session_update(
    *, model, accept_language, tools, voice=DEFAULT_VOICE, max_output_tokens=DEFAULT_MAX_OUTPUT
):
    """The ``session.update`` the server sends first; browsers cannot change these fields.

    ``max_output_tokens`` (the budget policy's ``max_output_tokens_per_response``) bounds every
    response, so its worst-case cost is known before it starts."""
    return {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "model": model,
            "instructions": INSTRUCTIONS.format(language=preferred_language(accept_language)),
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": TRANSCRIPTION_MODEL},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.5,
                        "prefix_padding_ms": 300,
                        "silence_duration_ms": 500,
                        # The relay starts each answer itself, after a budget check.
                        "create_response": False,
                        "interrupt_response": True,
                    },
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": voice},
            },
            "tools": list(tools),
            "tool_choice": "auto",
            "max_output_tokens": int(max_output_tokens),
        },
    }
