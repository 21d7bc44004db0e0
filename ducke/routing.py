"""WebSocket routes: the browser's /session (origin-checked, quota-guarded) and the simulator."""

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.conf import settings
from django.urls import path

from ducke.consumers import SessionConsumer
from quotas.guards import ConnectionGuard


def websocket_application():
    """The ASGI app for every WebSocket connection."""
    routes = [
        # Signed-in users (the Django session cookie) are known to the guard and the meter:
        # ``user`` rate-limit rules and spend limits, and tiers by group.
        path(
            "session",
            AllowedHostsOriginValidator(
                AuthMiddlewareStack(ConnectionGuard(SessionConsumer.as_asgi()))
            ),
        ),
    ]
    if settings.DUCKE_SIMULATOR_ENABLED:
        from ducke.realtime.simulator_consumer import SimulatorConsumer

        # Upstream clients (the relay, the openai SDK) send no Origin header: no origin check.
        routes.append(path("simulator/v1/realtime", SimulatorConsumer.as_asgi()))
    return URLRouter(routes)
