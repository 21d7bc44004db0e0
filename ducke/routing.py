"""WebSocket routes: the browser's /session (origin-checked, quota-guarded) and the simulator.

Any other path is refused at the handshake (HTTP 403), where URLRouter would raise ValueError
and daphne answer HTTP 500 with three ERROR tracebacks per attempt.
"""

import functools
import json
import logging

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.urls import path, re_path

from ducke.conf import ducke_settings
from ducke.consumers import SessionConsumer
from ducke.origin import WebsocketOriginValidator, refuse_handshake
from quotas.edge import count_hit
from quotas.guards import ConnectionGuard
from quotas.realtime.meter import smallest_answer_micro
from quotas.realtime.text_tokens import text_token_bound

logger = logging.getLogger("ducke.routing")


async def refuse_unknown_path(scope, receive, send):
    """The last route: a path nothing serves (a typo, the simulator while it is off)."""
    # DEBUG, not INFO: a scan of made-up paths must not fill the log; daphne's access log
    # records each rejection anyway.
    logger.debug("WebSocket path not found: %s", scope.get("path", ""))
    try:
        await count_hit(scope)  # a scan of made-up paths spends the client's catch-all rule
    except Exception as exc:  # the refusal matters more than its count
        logger.debug("unknown path not counted: %s", exc.__class__.__name__)
    await refuse_handshake(scope, receive, send)


@functools.cache
def _session_text_tokens():
    """Tokens of the server's session.update (instructions, tools): every answer re-bills them."""
    from ducke.realtime.persona import session_update
    from ducke.tools import TOOL_SCHEMAS

    update = session_update(
        model=ducke_settings.REALTIME_MODEL, accept_language="", tools=TOOL_SCHEMAS
    )
    return text_token_bound(json.dumps(update))


def first_answer_room(budget):
    """What a new DUCK-E session needs left under every cap: its first answer's worst case."""
    return smallest_answer_micro(
        budget, input_text_tokens=_session_text_tokens(), model=ducke_settings.REALTIME_MODEL
    )


def websocket_application():
    """The ASGI app for every WebSocket connection."""
    routes = [
        # Signed-in users (the Django session cookie) are known to the guard and the meter:
        # ``user`` rate-limit rules and spend limits, and tiers by group.
        path(
            "session",
            WebsocketOriginValidator(
                AuthMiddlewareStack(
                    # A session is worth starting while its first answer fits every cap.
                    ConnectionGuard(SessionConsumer.as_asgi(), room=first_answer_room)
                )
            ),
        ),
    ]
    if ducke_settings.SIMULATOR_ENABLED:
        from ducke.realtime.simulator_consumer import SimulatorConsumer

        # Upstream clients (the relay, the openai SDK) send no Origin header: no origin check.
        routes.append(path("simulator/v1/realtime", SimulatorConsumer.as_asgi()))
    routes.append(re_path(r"", refuse_unknown_path))
    return URLRouter(routes)
