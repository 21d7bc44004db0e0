"""Where the relay's upstream is and how to open it.

Order of choice: ``DUCKE_REALTIME_URL`` (any Realtime-compatible endpoint), else OpenAI's GA
endpoint when ``OPENAI_API_KEY`` is set, else the local simulator served by this very server.
No ``OpenAI-Beta`` header: the GA endpoint refuses it.
"""

from urllib.parse import urlencode, urlsplit

from django.conf import settings
from websockets.asyncio.client import connect

from ducke.conf import ducke_settings

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
        additional_headers=upstream_headers(),
        open_timeout=open_timeout,
        close_timeout=2,
        max_size=MAX_UPSTREAM_MESSAGE_BYTES,
        compression=None,
        ping_interval=20,
        ping_timeout=20,
    )
