"""WebSocket handshakes: the origin check on full origins, and unknown paths refused cleanly."""

import logging

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ducke.origin import WebsocketOriginValidator, parse_origin
from ducke.routing import websocket_application

SITE = "127.0.0.1:8000"


async def accepting_app(scope, receive, send):
    """Stands in for the guarded consumer: accepts every handshake that reaches it."""
    message = await receive()
    assert message["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})


def over(scheme, app):
    """``app`` reached over ``scheme`` (``ws`` or ``wss``), as daphne puts it in the scope."""

    async def with_scheme(scope, receive, send):
        return await app({**scope, "scheme": scheme}, receive, send)

    return with_scheme


async def handshake(origin, host=SITE, scheme="ws", extra=(), app=None, path="/session"):
    """True when the handshake is accepted; refusals are a close before any accept."""
    headers = [(b"host", host.encode())] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers.extend(extra)
    application = app or WebsocketOriginValidator(accepting_app)
    communicator = WebsocketCommunicator(over(scheme, application), path, headers=headers)
    accepted, _ = await communicator.connect()
    await communicator.disconnect()
    return accepted


async def test_the_page_own_origin_is_accepted():
    assert await handshake("http://127.0.0.1:8000")


async def test_another_port_of_the_same_host_is_refused():
    assert not await handshake("http://127.0.0.1:9999")
    assert not await handshake("http://127.0.0.1")  # port 80


async def test_another_scheme_of_the_same_host_and_port_is_refused():
    assert not await handshake("https://127.0.0.1:8000")
    # Over wss the page is https: the http origin is the foreign one now.
    assert await handshake("https://127.0.0.1:8000", scheme="wss")
    assert not await handshake("http://127.0.0.1:8000", scheme="wss")


async def test_a_foreign_host_is_refused():
    assert not await handshake("http://evil.example")
    assert not await handshake("http://127.0.0.1.evil.example:8000")


@override_settings(ALLOWED_HOSTS=["duck.example"])
async def test_default_ports_are_filled_in():
    assert await handshake("http://duck.example", host="duck.example")
    assert await handshake("http://duck.example:80", host="duck.example")
    assert await handshake("http://DUCK.example", host="duck.example:80")
    assert await handshake("https://duck.example", host="duck.example", scheme="wss")
    assert not await handshake("https://duck.example:8443", host="duck.example", scheme="wss")


@override_settings(ALLOWED_HOSTS=["[::1]"])
async def test_ipv6_hosts():
    assert await handshake("http://[::1]:8000", host="[::1]:8000")
    assert not await handshake("http://[::1]:8001", host="[::1]:8000")


async def test_a_host_outside_allowed_hosts_is_refused_even_for_its_own_origin():
    # DNS rebinding: evil.example now resolves to this server; the page's origin is its own.
    assert not await handshake("http://evil.example:8000", host="evil.example:8000")


async def test_missing_or_unusable_origins_are_refused():
    # As Channels' AllowedHostsOriginValidator does: browsers always send an Origin.
    assert not await handshake(None)
    for origin in ("null", "", "127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://", "http://:8000"):
        assert not await handshake(origin), origin
    assert not await handshake("http://127.0.0.1:99999")


@override_settings(ALLOWED_HOSTS=["duck.example"])
async def test_a_tls_proxy_is_believed_only_when_its_header_is_configured():
    forwarded = [(b"x-forwarded-proto", b"https")]
    public = "https://duck.example"
    assert not await handshake(public, host="duck.example", extra=forwarded)
    with override_settings(SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https")):
        assert await handshake(public, host="duck.example", extra=forwarded)
        assert not await handshake("http://duck.example", host="duck.example", extra=forwarded)
        # The proxy says http: the page is http, whatever reached daphne.
        plain = [(b"x-forwarded-proto", b"http")]
        assert await handshake("http://duck.example", host="duck.example", extra=plain)
        assert not await handshake(public, host="duck.example", scheme="wss", extra=plain)
        # No header at all: the handshake's own scheme decides.
        assert await handshake(public, host="duck.example", scheme="wss")


@override_settings(CSRF_TRUSTED_ORIGINS=["https://app.example.org", "https://*.duck.example:8443"])
async def test_trusted_origins_are_matched_on_scheme_host_and_port():
    assert await handshake("https://app.example.org")
    assert await handshake("https://app.example.org:443")
    assert not await handshake("http://app.example.org")
    assert not await handshake("https://app.example.org:8443")
    assert not await handshake("https://other.example.org")
    assert await handshake("https://a.duck.example:8443")
    assert await handshake("https://duck.example:8443")
    assert not await handshake("https://a.duck.example")
    assert not await handshake("https://evilduck.example:8443")
    # A trusted origin does not make the Host allowed.
    assert not await handshake("https://app.example.org", host="evil.example")


@override_settings(DEBUG=True, ALLOWED_HOSTS=[])
async def test_debug_without_allowed_hosts_uses_django_fallback():
    assert await handshake("http://localhost:8000", host="localhost:8000")
    assert not await handshake("http://duck.example", host="duck.example")


async def test_non_websocket_scopes_are_a_programming_error():
    validator = WebsocketOriginValidator(accepting_app)
    with pytest.raises(ValueError, match="WebSocket"):
        await validator({"type": "http"}, None, None)


def test_parse_origin():
    assert parse_origin("https://Duck.Example") == ("https", "duck.example", 443)
    assert parse_origin("http://[::1]:8000") == ("http", "::1", 8000)
    assert parse_origin("ws://127.0.0.1:8000") is None
    assert parse_origin("null") is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_session_route_checks_the_full_origin(settings, no_redis):
    settings.DUCKE_REALTIME_URL = "ws://127.0.0.1:9/v1/realtime"  # never reached
    app = websocket_application()
    assert not await handshake("http://127.0.0.1:9999", app=app)
    assert not await handshake("https://127.0.0.1:8000", app=app)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/nope", "/session/extra", "/simulator/v1/realtime"])
async def test_unknown_paths_are_refused_without_an_error(settings, caplog, path):
    settings.DUCKE_SIMULATOR_ENABLED = False
    caplog.set_level(logging.DEBUG)
    assert not await handshake("http://127.0.0.1:8000", app=websocket_application(), path=path)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []
    assert len([r for r in caplog.records if r.levelno >= logging.INFO]) <= 1


@pytest.mark.timeout(60)
async def test_unknown_paths_through_daphne_answer_403_and_log_no_traceback(
    daphne_server_factory,
):
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0")
    for path in ("/nope", "/simulator/v1/realtime"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{server.ws_url}{path}", origin=server.url, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403, path
    # A foreign port of the same host: refused at the handshake too.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            f"{server.ws_url}/session", origin="http://127.0.0.1:9999", open_timeout=10
        ):
            pass
    assert refused.value.response.status_code == 403
    log = server.log_tail(20_000)
    assert "Traceback" not in log and "ERROR" not in log, log
