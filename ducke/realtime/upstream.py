"""Where the relay's upstream is and how to open it.

Order of choice: ``DUCKE_REALTIME_URL`` (any Realtime-compatible endpoint), else OpenAI's GA
endpoint when ``OPENAI_API_KEY`` is set, else the local simulator served by this very server.
No ``OpenAI-Beta`` header: the GA endpoint refuses it.

``read_audio_delta`` reads what the relay needs of an output audio delta (most of what
upstream sends) from the frame text, without a full JSON parse.
"""

import re
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from websockets.asyncio.client import connect

from ducke.conf import ducke_settings
from ducke.server_workarounds import UpstreamConnection

OPENAI_REALTIME_URL = "wss://api.openai.com/v1/realtime"
SIMULATOR_PATH = "/simulator/v1/realtime"
MAX_UPSTREAM_MESSAGE_BYTES = 16 * 1024 * 1024


def realtime_backend():
    """'openai' when a key is configured, else 'simulator' (what /status reports)."""
    return "openai" if settings.OPENAI_API_KEY else "simulator"


def upstream_url(scope, model):
    """The full upstream URL for one session, with ``?model=``."""
    base = ducke_settings.REALTIME_URL
    if not base:
        if settings.OPENAI_API_KEY:
            base = OPENAI_REALTIME_URL
        else:
            host, port = (scope.get("server") or ("127.0.0.1", 8000))[:2]
            if host in ("0.0.0.0", "", None):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            if ":" in host:
                host = f"[{host}]"
            base = f"ws://{host}:{port}{SIMULATOR_PATH}"
    separator = "&" if urlsplit(base).query else "?"
    return f"{base}{separator}{urlencode({'model': model})}"


def upstream_headers():
    """Authorization for OpenAI; nothing for a keyless upstream such as the simulator."""
    key = settings.OPENAI_API_KEY
    return {"Authorization": f"Bearer {key}"} if key else {}


async def open_upstream(scope, model, *, open_timeout):
    """Open the upstream WebSocket; raises OSError/websockets errors/TimeoutError on failure."""
    return await connect(
        upstream_url(scope, model),
        create_connection=UpstreamConnection,
        additional_headers=upstream_headers(),
        open_timeout=open_timeout,
        close_timeout=2,
        max_size=MAX_UPSTREAM_MESSAGE_BYTES,
        compression=None,
        ping_interval=20,
        ping_timeout=20,
    )


# An output audio delta as the service and the simulator write it: ``type`` and ``event_id``
# first (either order), then ``response_id``, ``item_id``, ``output_index``,
# ``content_index`` and ``delta`` last, compact or with json.dumps' spaces; after the delta
# only integer members whose names start with ``x_`` (the simulator's benchmark stamps).
# String values hold no quote, backslash or control character, the delta only base64
# characters, numbers are JSON integers: a frame that matches is valid JSON whose decoded
# values are the matched text.
_STRING = r'"[^"\\\x00-\x1f]*"'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_TYPE = r'"type": ?"response\.output_audio\.delta"'
_EVENT_ID = rf'"event_id": ?{_STRING}'
_AUDIO_DELTA_HEAD = re.compile(
    rf"\{{(?:{_TYPE}, ?{_EVENT_ID}|{_EVENT_ID}, ?{_TYPE}), ?"
    rf'"response_id": ?"(?P<response_id>[^"\\\x00-\x1f]*)", ?'
    rf'"item_id": ?{_STRING}, ?"output_index": ?{_INTEGER}, ?"content_index": ?{_INTEGER}, ?'
    r'"delta": ?"'
)
_AUDIO_DELTA_TAIL = re.compile(rf'"(?:, ?"x_[a-z_]+": ?{_INTEGER})*\}}')


def read_audio_delta(text):
    """``(response_id, delta_chars)`` of a ``response.output_audio.delta`` frame in the shape
    upstream writes it, read without parsing; None for anything else (parse it).

    What ``json.loads`` would give: the frame is valid JSON, its ``type`` is the audio
    delta's, ``response_id`` is that string and ``delta`` a string of ``delta_chars``
    characters (tests/test_relay_hot_path.py checks this against the full parse)."""
    head = _AUDIO_DELTA_HEAD.match(text)
    if head is None or not text.isascii():
        return None
    start = head.end()
    end = text.find('"', start)
    if end < 0 or _AUDIO_DELTA_TAIL.fullmatch(text, end) is None:
        return None
    if not is_base64_alphabet(text.encode("ascii")[start:end]):
        return None
    return head["response_id"], end - start


def is_base64_alphabet(data):
    """Whether ``data`` is a non-empty run of base64 characters (A-Z a-z 0-9 + / =).

    The delta is the one long value of the frame: the check runs in C at memchr speed
    (``bytes.replace`` and ``bytes.isalnum``); a regex or ``bytes.translate`` pass costs
    as much as the JSON parse it replaces."""
    return data.replace(b"+", b"A").replace(b"/", b"A").replace(b"=", b"A").isalnum()
