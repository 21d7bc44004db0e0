"""Let daphne send the RFC 6455 server close codes DUCK-E's contract uses (1009, 1011, 1012).

autobahn's ``sendClose`` only accepts 1000 and 3000-4999, the codes an *application* may
pick, and raises for 1009 ("message too big") or 1011 ("unexpected condition") although
RFC 6455 lets a server endpoint send them. daphne passes an ASGI ``websocket.close`` code
straight to ``sendClose``, so a consumer closing with 1011 makes autobahn raise and the
browser sees whatever daphne's error path sends. ``allow_server_close_codes()`` routes just
these codes through autobahn's own ``sendCloseFrame`` (what ``sendClose`` calls once its
check passes); every other code keeps autobahn's validation.
"""

SERVER_CLOSE_CODES = frozenset({1001, 1008, 1009, 1011, 1012, 1013})


def allow_server_close_codes():
    """Patch daphne's WebSocket protocol once; a no-op when daphne is not installed."""
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    if getattr(WebSocketProtocol.serverClose, "allows_server_codes", False):
        return
    original = WebSocketProtocol.serverClose

    def server_close(self, code=None):
        if code in SERVER_CLOSE_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            original(self, code)

    server_close.allows_server_codes = True
    WebSocketProtocol.serverClose = server_close
