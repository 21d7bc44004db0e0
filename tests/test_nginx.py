"""The deploy configuration under Debian's nginx: `nginx -t`, then a real TLS proxy run
(admin login, redirect, wss session and the outer ring's 429, through nginx to daphne).

The files are used as docker compose mounts them, in a main configuration shaped like the
nginx image's own (the http block includes conf.d/*.conf). Only what cannot exist here is
replaced, each replacement counted so that a changed file fails loudly instead of being
tested half: the compose service names app1/app2 (unresolvable outside compose) by loopback
addresses, the mount paths by the temp directory, and the operator's certificate by a
self-signed one. The end-to-end test also moves the listen ports to free loopback ports and
points the upstream at a daphne server. Skips when nginx is missing, unless
DUCKE_REQUIRE_DEPLOY_TOOLS=1 (CI installs Debian's nginx-light): then it fails.
"""

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.fixtures import live_server

daphne_server_factory = live_server.daphne_server_factory

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "deploy" / "nginx"
MIME_TYPES = Path("/etc/nginx/mime.types")
PLAIN_ONLY = {"nginx.conf": "default.conf"}
WITH_TLS = {"nginx.conf": "default.conf", "tls.conf": "tls.conf"}  # as compose.tls.yml mounts

pytestmark = pytest.mark.timeout(90)


def require_tool(name, package="nginx-light openssl"):
    """The tool's path; skip (or fail under DUCKE_REQUIRE_DEPLOY_TOOLS=1) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    problem = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("DUCKE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"DUCKE_REQUIRE_DEPLOY_TOOLS=1 but {problem}")
    pytest.skip(problem)


def replace(text, old, new, count):
    """``text`` with ``old`` replaced, after checking it occurs exactly ``count`` times."""
    found = text.count(old)
    assert found == count, f"expected {count} x {old!r} in the deploy config, found {found}"
    return text.replace(old, new)


def self_signed_certificate(directory):
    """A throwaway certificate for 127.0.0.1, standing in for the operator's."""
    openssl = require_tool("openssl")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=duck.example", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [openssl, *request, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def deploy_file(name, prefix, cert=None, key=None, upstream=None, ports=None):
    """A deploy/nginx file with only the compose-specific names and paths replaced.

    ``upstream`` (host:port) replaces both apps, a pair (app1, app2) each of them;
    ``ports`` = (plain, tls) moves the listens."""
    text = (NGINX_DIR / name).read_text()
    if name == "nginx.conf":
        if upstream is None:
            upstream = ("127.0.0.1:8000", "127.0.0.2:8000")
        app1, app2 = (upstream, upstream) if isinstance(upstream, str) else upstream
        text = replace(text, "server app1:8000 ", f"server {app1} ", 1)
        text = replace(text, "server app2:8000 ", f"server {app2} ", 1)
        if ports:
            text = replace(text, "listen 8080;", f"listen 127.0.0.1:{ports[0]};", 1)
    if name in ("nginx.conf", "tls.conf"):
        include = "include /etc/nginx/ducke-locations.conf;"
        text = replace(text, include, f"include {prefix / 'ducke-locations.conf'};", 1)
    if name == "tls.conf":
        text = replace(text, "/etc/nginx/tls/fullchain.pem;", f"{cert};", 1)
        text = replace(text, "/etc/nginx/tls/privkey.pem;", f"{key};", 1)
        if ports:
            text = replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{ports[1]} ssl;", 1)
    directives = re.sub(r"#.*", "", text)
    assert "/etc/nginx" not in directives, f"{name} names a path the test does not provide"
    return text


def main_config(prefix):
    """The nginx image's nginx.conf, with its root-only paths moved under ``prefix``."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / 'temp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes auto;
error_log {prefix / "error.log"} notice;
pid {prefix / "nginx.pid"};
events {{
    worker_connections 1024;
}}
http {{
    include {MIME_TYPES};
    default_type application/octet-stream;
    access_log {prefix / "access.log"};
{temp_paths}
    sendfile on;
    keepalive_timeout 65;
    include {prefix / "conf.d"}/*.conf;
}}
"""


def lay_out(prefix, site_files, **replacements):
    """Write the main config and the mounted files under ``prefix``; returns nginx's path,
    the command-line paths and the certificate (None without TLS)."""
    nginx = require_tool("nginx")
    if not MIME_TYPES.exists():
        pytest.fail(f"nginx is installed but {MIME_TYPES} is missing")
    (prefix / "conf.d").mkdir()
    (prefix / "temp").mkdir()
    locations = deploy_file("ducke-locations.conf", prefix, **replacements)
    (prefix / "ducke-locations.conf").write_text(locations)
    cert = key = None
    if "tls.conf" in site_files:
        cert, key = self_signed_certificate(prefix)
    for name, mounted_as in site_files.items():
        text = deploy_file(name, prefix, cert, key, **replacements)
        (prefix / "conf.d" / mounted_as).write_text(text)
    (prefix / "nginx.conf").write_text(main_config(prefix))
    paths = ["-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    return nginx, paths, cert


def nginx_test(prefix, site_files):
    """Run ``nginx -t`` on the laid-out configuration; returns its output."""
    nginx, paths, _ = lay_out(prefix, site_files)
    # As root, nginx checks its worker user exists; Debian has no "nginx" user, "nobody" it has.
    user = ["-g", "user nobody nogroup;"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [nginx, "-t", *paths, *user], capture_output=True, text=True, timeout=30
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax is ok" in output and "test is successful" in output, output
    # Warnings too: a duplicate zone, an ignored directive or a conflicting server name.
    assert not re.search(r"\[(warn|emerg|alert|crit|error)\]", output), output
    return output


def test_the_front_proxy_config_passes_nginx_t(tmp_path):
    nginx_test(tmp_path, PLAIN_ONLY)


def test_the_tls_config_passes_nginx_t(tmp_path):
    # As deploy/compose.tls.yml mounts it: next to the plain server, sharing its zones.
    nginx_test(tmp_path, WITH_TLS)


def test_nginx_t_would_catch_a_broken_config(tmp_path, monkeypatch):
    # The same run on a config with a limit that names no zone must fail: the test can fail.
    original = deploy_file

    def broken(name, prefix, *args, **kwargs):
        text = original(name, prefix, *args, **kwargs)
        if name == "ducke-locations.conf":
            text = text.replace("zone=ducke_session ", "zone=no_such_zone ", 1)
        return text

    monkeypatch.setitem(globals(), "deploy_file", broken)
    with pytest.raises(AssertionError, match="no_such_zone"):
        nginx_test(tmp_path, PLAIN_ONLY)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tls_proxy(tmp_path, daphne_server_factory):
    """nginx with the deploy config (plain and TLS servers) in front of a daphne server that
    is configured as deploy/compose.tls.yml configures the apps."""
    server = daphne_server_factory(
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
        DJANGO_SECURE_SSL_REDIRECT="true",
        DJANGO_SECURE_HSTS_SECONDS="3600",
    )
    ports = (free_port(), free_port())
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    nginx, paths, cert = lay_out(prefix, WITH_TLS, upstream=f"127.0.0.1:{server.port}", ports=ports)
    process = start_nginx(nginx, paths, prefix, ports[1])
    try:
        yield {
            "server": server,
            "http": f"http://127.0.0.1:{ports[0]}",
            "https": f"https://127.0.0.1:{ports[1]}",
            "tls": ssl.create_default_context(cafile=str(cert)),
        }
    finally:
        stop_process(process)


def start_nginx(nginx, paths, prefix, port, timeout=10):
    """Run the laid-out nginx in the foreground; returns its process once ``port`` accepts."""
    # One process as the invoking user: no worker user needs to read the pytest temp dir.
    process = subprocess.Popen(
        [nginx, *paths, "-g", "daemon off; master_process off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                log = (prefix / "error.log").read_text(errors="replace")
                pytest.fail(f"nginx did not start:\n{log}")
            time.sleep(0.05)


def stop_process(process, timeout=10):
    """SIGTERM by PID, SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def create_operator(server, password):
    result = subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator"],
        cwd=live_server.PROJECT_ROOT,
        env={
            **server.env,
            "DJANGO_SUPERUSER_PASSWORD": password,
            "DJANGO_SUPERUSER_EMAIL": "o@x.example",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def csrf_token(page):
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)


async def test_behind_the_tls_server_admin_login_and_sessions_work(tls_proxy):
    server, public = tls_proxy["server"], tls_proxy["https"]
    create_operator(server, "duck-tls-pw-1")
    async with httpx.AsyncClient(verify=tls_proxy["tls"]) as browser:
        page = await browser.get(f"{public}/admin/login/")
        assert page.status_code == 200
        # Django saw https through X-Forwarded-Proto: HSTS, Secure cookies.
        assert page.headers["strict-transport-security"] == "max-age=3600"
        assert "secure" in page.headers["set-cookie"].lower()
        login = await browser.post(
            f"{public}/admin/login/?next=/admin/",
            data={
                "username": "operator",
                "password": "duck-tls-pw-1",
                "csrfmiddlewaretoken": csrf_token(page),
            },
            headers={"Origin": public, "Referer": f"{public}/admin/login/"},
        )
        assert login.status_code == 302 and login.headers["location"] == "/admin/", login.text
        assert (await browser.get(f"{public}/admin/")).status_code == 200

    async with httpx.AsyncClient() as plain:
        # Plain HTTP is redirected to https on the same host name; the health check is not.
        # Host without a port, as a browser sends it to port 80 (DUCKE_HTTP_PORT=80).
        redirect = await plain.get(
            f"{tls_proxy['http']}/admin/login/", headers={"Host": "127.0.0.1"}
        )
        assert redirect.status_code == 301
        assert redirect.headers["location"] == "https://127.0.0.1/admin/login/"
        status = await plain.get(f"{tls_proxy['http']}/status")
        assert status.status_code == 200 and status.json()["status"]

    # The page's WebSocket over wss, through nginx: its https origin is its own.
    session_url = public.replace("https://", "wss://") + "/session"
    async with connect(session_url, origin=public, ssl=tls_proxy["tls"], open_timeout=10) as ws:
        # The relay reached its upstream (the simulator) and configured the session.
        seen = []
        while "session.updated" not in seen and len(seen) < 20:
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
        assert "session.updated" in seen, seen
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            session_url, origin=public.replace("https", "http"), ssl=tls_proxy["tls"]
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_the_outer_ring_refuses_password_guess_floods_at_nginx(tls_proxy):
    public = tls_proxy["https"]
    async with httpx.AsyncClient(verify=tls_proxy["tls"]) as client:
        # Looking at the login page is not a guess: 20 GETs all pass.
        pages = [await client.get(f"{public}/admin/login/") for _ in range(20)]
        assert {page.status_code for page in pages} == {200}
        # POSTs are: a burst of 10 (plus one for the rate), then nginx answers 429 itself.
        # (No CSRF token: Django refuses with 403 quickly, no password hashing.)
        statuses = [
            (await client.post(f"{public}/admin/login/", data={"username": "x"})).status_code
            for _ in range(14)
        ]
        assert statuses[:10] == [403] * 10, statuses
        assert statuses[-2:] == [429, 429], statuses
        refused = await client.post(f"{public}/admin/login/", data={"username": "x"})
        assert refused.status_code == 429 and "nginx" in refused.text
        # The rest of the site is still open to this address.
        assert (await client.get(f"{public}/status")).status_code == 200
