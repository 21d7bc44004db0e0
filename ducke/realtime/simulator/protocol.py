"""What every part of the simulator shares: ids, client event types, close codes, and the
`SimulatorError` a client mistake becomes (with the checks that raise it, in the API's words).
"""

import re
import uuid
from collections.abc import Awaitable, Callable

Send = Callable[[dict], Awaitable[None]]
Disconnect = Callable[[int, str], Awaitable[None]]

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
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


class SimulatorError(Exception):
    """A client mistake, reported as an `error` event; the session stays open."""

    def __init__(self, code: str, message: str, param: str | None = None, kind=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind or "invalid_request_error"


def require(mapping: dict, key: str, kind: type | tuple, param: str):
    """`mapping[key]`, present, not null and of type `kind`; else the API's error for `param`."""
    if key not in mapping or mapping[key] is None:
        raise SimulatorError(
            "missing_required_parameter", f"Missing required parameter: '{param}'.", param
        )
    return typed(mapping[key], kind, param)


def typed(value, kind: type | tuple, param: str):
    """`value` if it is of type `kind`; else the API's `invalid_type` error for `param`."""
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


def invalid_value(param: str, detail: str) -> SimulatorError:
    """The API's `invalid_value` error for `param` (to raise)."""
    return SimulatorError("invalid_value", f"Invalid value for '{param}': {detail}", param)


def check_unknown(mapping: dict, allowed, prefix: str) -> None:
    """Refuse a key of `mapping` outside `allowed`, as the API does (`unknown_parameter`)."""
    for key in mapping:
        if key not in allowed:
            raise SimulatorError(
                "unknown_parameter", f"Unknown parameter: '{prefix}.{key}'.", f"{prefix}.{key}"
            )


def word_pieces(text: str) -> list[str]:
    """Words with their trailing spaces: their concatenation is the text again."""
    pieces = _WORD_PIECES.findall(text)
    leading = len(text) - len(text.lstrip())
    if pieces and leading:
        pieces[0] = text[:leading] + pieces[0]
    return pieces or ([text] if text else [])
