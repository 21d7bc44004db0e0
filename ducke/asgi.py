"""ASGI entry point: Django for HTTP, Channels for WebSockets (/session and the simulator)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ducke.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

import gc  # noqa: E402
import sys  # noqa: E402

from django.core.management import call_command  # noqa: E402
from django.core.management.base import SystemCheckError  # noqa: E402

# Stop start-up on a bad environment variable with the check's message, not mid-request.
try:
    call_command("check", fail_level="ERROR", verbosity=0)
except SystemCheckError as error:
    sys.stderr.write(f"DUCK-E cannot start:\n{error}\n")
    raise SystemExit(1) from None

from quotas.realtime.text_tokens import load_o200k  # noqa: E402
from quotas.startup import prepare_process  # noqa: E402

prepare_process(load_o200k)

from ducke.server_workarounds import apply_server_workarounds  # noqa: E402

apply_server_workarounds()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from ducke.routing import websocket_application  # noqa: E402
from quotas.edge import RateLimitEdge  # noqa: E402

# HTTP rules that need no signed-in user are decided before Django runs (quotas.edge).
application = ProtocolTypeRouter(
    {"http": RateLimitEdge(django_asgi_app), "websocket": websocket_application()}
)

# What start-up loaded (Django, the apps, the o200k tokenizer) lives as long as the process:
# moved out of the garbage collector's sight, a full collection no longer walks it. Here that
# walk took ~70 ms, a pause of every session's audio whenever the oldest generation was
# collected; new objects are collected as before.
gc.freeze()
