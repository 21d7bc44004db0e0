"""The WebSocket origin check on full origins (scheme, host and port).

Channels' ``AllowedHostsOriginValidator`` compares host names only, so a page on another port
or scheme of an allowed host (``http://127.0.0.1:9999`` for a site on ``127.0.0.1:8000``)
could open a session. ``WebsocketOriginValidator`` accepts an ``Origin`` only when its scheme,
host and port (default ports filled in) are

- the handshake's own origin: the ``Host`` header with the scheme the browser used (``ws`` ->
  ``http``, ``wss`` -> ``https``; ``https`` too when ``SECURE_PROXY_SSL_HEADER`` says a TLS
  proxy received the request, as ``request.is_secure()`` decides for HTTP), or
- one of ``CSRF_TRUSTED_ORIGINS``, with Django's CSRF rules (``https://*.example.com``
  matches the domain and its subdomains, on the listed port only),

and the ``Host`` is in ``ALLOWED_HOSTS`` (as Django requires of every HTTP request; a trusted
origin's own host need not be, as for Django's CSRF check). A handshake without an
``Origin`` is refused, as Channels refuses it: browsers always send one,
and the non-browser clients of ``/session`` (tests, load tools) send the page's origin.
Settings are read on every handshake, so ``override_settings`` works.
"""

from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import is_same_domain, split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(value):
    """``(scheme, host, port)`` of ``http(s)://host[:port]``, or None for anything else."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _header(scope, name):
    """The first value of header ``name`` (bytes, lower case), decoded; None when absent."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _meta_header(scope, meta_name):
    """A header by its ``request.META`` name (``HTTP_X_FORWARDED_PROTO``), as Django maps it."""
    wanted = meta_name.removeprefix("HTTP_")
    for key, value in scope.get("headers", ()):
        if key.decode("latin-1").upper().replace("-", "_") == wanted:
            return value.decode("latin-1")
    return None


def handshake_is_secure(scope):
    """``request.is_secure()`` for a handshake: the proxy's header if set, else wss."""
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        forwarded = _meta_header(scope, meta_name)
        if forwarded is not None:
            return forwarded.split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") == "wss"


def _allowed_hosts():
    hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not hosts:  # Django's own fallback in HttpRequest.get_host()
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def own_origin(scope):
    """The handshake's own origin ``(scheme, host, port)``, or None if its Host is not allowed."""
    host = _header(scope, b"host")
    if host is None:
        server_host, server_port = scope.get("server") or ("", None)
        host = f"{server_host}:{server_port}" if server_port else server_host
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, _allowed_hosts()):
        return None
    scheme = "https" if handshake_is_secure(scope) else "http"
    return parse_origin(f"{scheme}://{host}")


def _trusted(origin):
    scheme, host, port = origin
    for entry in settings.CSRF_TRUSTED_ORIGINS:
        parts = urlsplit(entry.lower())
        try:
            entry_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            continue
        if parts.scheme != scheme or entry_port != port or not parts.hostname:
            continue
        pattern = parts.hostname
        if pattern.startswith("*."):
            if is_same_domain(host, pattern[1:]):
                return True
        elif pattern == host:
            return True
    return False


def origin_allowed(scope):
    """True when the handshake's Origin is its own origin or a trusted one (see module)."""
    own = own_origin(scope)
    if own is None:
        return False
    raw = _header(scope, b"origin")
    origin = parse_origin(raw) if raw is not None else None
    if origin is None:
        return False
    return origin == own or _trusted(origin)


async def refuse_handshake(scope, receive, send):
    """Close before accepting: the server answers the handshake with HTTP 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


class WebsocketOriginValidator:
    """Refuses a WebSocket handshake whose Origin is not an allowed full origin."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("WebsocketOriginValidator guards WebSocket connections only")
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await refuse_handshake(scope, receive, send)
