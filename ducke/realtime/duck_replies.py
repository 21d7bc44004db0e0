"""What the simulated duck hears and says: canned transcripts, replies and tool-call detection.

Everything here is deterministic, so tests and benchmarks see the same words every run.
"""

import json
import re
import zlib

# The simulator cannot recognise speech: a spoken turn "is heard as" one of these questions,
# chosen by the turn number and the turn's duration.
SPOKEN_QUESTIONS = (
    "My unit test passes locally but fails in CI. Where should I start looking?",
    "I get a KeyError when I read the config dictionary, but the key is right there.",
    "Why would an async function return before the database write finishes?",
    "The page loads slowly only for logged-in users. What could be different for them?",
    "My regular expression matches too much. How do I make it stop at the first quote?",
    "I changed one import and now half of the tests fail with a circular import error.",
)

GREETING = "Hi, I'm DUCK-E, your rubber duck. What are you stuck on?"

# Short on purpose: a duck asks back rather than lectures (and answers stay a few seconds long).
_REPLY_TEMPLATES = (
    "So {gist}. What did you expect to happen instead?",
    "You said {gist}. Which line do you suspect first?",
    "Okay, {gist}. What changed since it last worked?",
    "Hmm, {gist}. Can you walk me through it line by line?",
)

TOOL_OUTPUT_SPOKEN_CHARS = 200

_WEATHER = re.compile(r"\b(weather|forecast|temperature)\b", re.IGNORECASE)
_FORECAST = re.compile(r"\b(forecast|tomorrow|this week|next week|weekend)\b", re.IGNORECASE)
_SEARCH = re.compile(
    r"\b(?:search(?:\s+the\s+web)?|look\s+up|google)\b(?:\s+for)?\s*", re.IGNORECASE
)
# "in Paris", "in New York City", "in São Paulo?" -> the capitalised place after "in".
_PLACE = re.compile(r"\bin\s+([A-Z][\w'.-]*(?:[ ,]+[A-Z][\w'.-]*)*)")
_PLACE_LOOSE = re.compile(r"\bin\s+([^?.!,;]+)", re.IGNORECASE)


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (unlike `hash()`)."""
    return zlib.crc32(text.encode("utf-8"))


def spoken_question(turn_number: int, seconds: float) -> str:
    """The transcript the simulator pretends to hear for a spoken turn."""
    index = (turn_number + round(seconds * 10)) % len(SPOKEN_QUESTIONS)
    return SPOKEN_QUESTIONS[index]


def _gist(text: str, max_words: int = 10) -> str:
    words = text.split()
    gist = " ".join(words[:max_words]).rstrip(" ?.!,;:")
    if gist[:1].isupper() and not gist[1:2].isupper():
        gist = gist[0].lower() + gist[1:]
    return gist


def reply_to_user(text: str | None) -> str:
    """A short rubber-duck reply: paraphrase the user's words and ask a clarifying question."""
    if not text or not text.strip():
        return GREETING
    template = _REPLY_TEMPLATES[stable_hash(text) % len(_REPLY_TEMPLATES)]
    return template.format(gist=_gist(text))


def reply_to_tool_output(output: str) -> str:
    """A spoken summary of a tool result, quoting its first characters."""
    quoted = " ".join(output.split())[:TOOL_OUTPUT_SPOKEN_CHARS]
    return f"Here is what I found: {quoted}. Does that help with what you are working on?"


def _place(text: str) -> str:
    match = _PLACE.search(text) or _PLACE_LOOSE.search(text)
    if not match:
        return ""
    return match.group(1).strip(" ,")


def detect_tool_call(text: str, tool_names: set[str]) -> tuple[str, str] | None:
    """(tool name, JSON arguments) when `text` asks for weather or a search and the tool exists."""
    if _WEATHER.search(text):
        wants_forecast = bool(_FORECAST.search(text))
        preferred = ["get_weather_forecast", "get_current_weather"]
        if not wants_forecast:
            preferred.reverse()
        for name in preferred:
            if name in tool_names:
                return name, json.dumps({"location": _place(text) or "here"}, ensure_ascii=False)
    match = _SEARCH.search(text)
    if match and "web_search" in tool_names:
        query = text[match.end() :].strip(" ?.!") or text.strip()
        return "web_search", json.dumps({"query": query}, ensure_ascii=False)
    return None
