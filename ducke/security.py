"""Content-Security-Policy and Permissions-Policy on every response.

The policy is what DUCK-E's own pages need, and nothing more. The page (templates/ducke/,
ducke/static/ducke/) loads one script, two audio worklets, a stylesheet and an SVG icon from
this server and opens the ``/session`` WebSocket; the admin, the quotas reports included,
loads Django's static files and embeds server-side SVG charts. Neither has inline script or
inline event handlers, so:

- ``script-src 'self'`` (no ``'unsafe-inline'``, no ``'unsafe-eval'``);
- ``style-src 'self'``, plus ``'nonce-…'`` when a response used ``request.csp_nonce`` (the
  reports' chart ``<style>``; the attribute has django-csp's name, so templates of reusable
  apps work with either);
- ``connect-src 'self'`` plus ``ws://`` and ``wss://`` of the request's own host: CSP Level 3
  lets ``'self'`` cover same-host WebSockets, older Safari did not. ``wss:`` is listed for a
  plain request too because a TLS proxy without ``DJANGO_SECURE_PROXY_SSL_HEADER`` hides the
  page's https from Django while the page connects with wss;
- ``img-src 'self'`` (the admin's icons are SVG files, not data: URIs), ``object-src 'none'``,
  ``base-uri 'self'``, ``form-action 'self'``, ``frame-ancestors 'none'`` (as
  ``X-Frame-Options: DENY``).

Django's own debug pages (``DEBUG`` on, error responses) are inline-styled and scripted;
they are left without a policy. ``Permissions-Policy`` lets only this origin ask for the
microphone. X-Frame-Options, nosniff, Referrer-Policy and COOP stay with Django's
SecurityMiddleware and XFrameOptionsMiddleware.
"""

import secrets

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.utils.deprecation import MiddlewareMixin

PERMISSIONS_POLICY = "microphone=(self), camera=(), geolocation=()"
FIXED_DIRECTIVES = (
    "default-src 'self'",
    "script-src 'self'",
    "img-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)


class CspNonce:
    """A request's nonce, made on first use: the policy names it only when a page used it."""

    __slots__ = ("_value",)

    def __init__(self):
        self._value = None

    def __str__(self):
        if self._value is None:
            self._value = secrets.token_urlsafe(16)
        return self._value

    @property
    def used(self):
        return self._value is not None


def websocket_sources(request):
    """``ws://host wss://host`` (only ``wss://`` for a secure request); none for a bad Host."""
    try:
        host = request.get_host()  # validated against ALLOWED_HOSTS: no stray characters
    except DisallowedHost:
        return ()
    if request.is_secure():
        return (f"wss://{host}",)
    return (f"ws://{host}", f"wss://{host}")


def content_security_policy(request):
    """The Content-Security-Policy header value for ``request``'s response."""
    nonce = getattr(request, "csp_nonce", None)
    style = "style-src 'self'"
    if isinstance(nonce, CspNonce) and nonce.used:
        style += f" 'nonce-{nonce}'"
    connect = " ".join(("connect-src 'self'", *websocket_sources(request)))
    return "; ".join((*FIXED_DIRECTIVES, style, connect))


class SecurityHeadersMiddleware(MiddlewareMixin):
    """Sets Content-Security-Policy and Permissions-Policy unless a view set its own."""

    def process_request(self, request):
        request.csp_nonce = CspNonce()

    def process_response(self, request, response):
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        if settings.DEBUG and response.status_code >= 400:
            return response  # Django's technical 404/500 pages: inline style and script
        response.headers.setdefault("Content-Security-Policy", content_security_policy(request))
        return response
