"""Strict checks of the JSON arguments a model sends with a function call."""

import json

from .common import InvalidArguments

# Far above any honest call of our tools; bounds the work of parsing what a model sent.
MAX_ARGUMENTS_CHARS = 4000


def parse_object(arguments, allowed):
    """The arguments as a dict with only ``allowed`` keys; ``null`` values count as absent."""
    if isinstance(arguments, bytes | bytearray):
        arguments = arguments.decode("utf-8", errors="replace")
    if not isinstance(arguments, str):
        raise InvalidArguments("The arguments must be a JSON object.")
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        raise InvalidArguments("The arguments are far too long; send a short JSON object.")
    try:
        value = json.loads(arguments or "{}")
    except (ValueError, RecursionError):  # deep nesting overflows the decoder's stack
        raise InvalidArguments("The arguments are not valid JSON; send a JSON object.") from None
    if not isinstance(value, dict):
        raise InvalidArguments("The arguments must be a JSON object.")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        names = ", ".join(repr(key[:40]) for key in unknown[:5])
        expected = ", ".join(allowed)
        raise InvalidArguments(f"Unknown argument(s) {names}; this tool takes {expected}.")
    return {key: item for key, item in value.items() if item is not None}


def required_text(values, key, max_chars):
    """A non-empty string of at most ``max_chars`` characters, stripped, without controls."""
    if key not in values:
        raise InvalidArguments(f"The argument {key!r} is required.")
    text = values[key]
    if not isinstance(text, str):
        raise InvalidArguments(f"The argument {key!r} must be a string.")
    text = " ".join(text.split())
    if not text:
        raise InvalidArguments(f"The argument {key!r} must not be empty.")
    if len(text) > max_chars:
        raise InvalidArguments(f"The argument {key!r} must be at most {max_chars} characters.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidArguments(f"The argument {key!r} must not contain control characters.")
    return text


def optional_choice(values, key, choices, default):
    """One of ``choices`` (exact string), or ``default`` when absent."""
    if key not in values:
        return default
    value = values[key]
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise InvalidArguments(f"The argument {key!r} must be {options}.")
    return value


def optional_integer(values, key, low, high, default):
    """A whole number from ``low`` to ``high``, or ``default`` when absent."""
    if key not in values:
        return default
    value = values[key]
    # bool is an int in Python; a JSON true is not a number of days.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArguments(f"The argument {key!r} must be a whole number from {low} to {high}.")
    return value
