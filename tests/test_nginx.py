"""`nginx -t` on the deploy configuration: the plain front proxy and the TLS server.

The files are tested as docker compose mounts them, in a main configuration shaped like the
nginx image's own (the http block includes conf.d/*.conf). Only what cannot exist here is
replaced, each replacement counted so that a changed file fails loudly instead of being
tested half: the compose service names app1/app2 (unresolvable outside compose) by loopback
addresses, the mount paths by the temp directory, and the operator's certificate by a
self-signed one. Skips when nginx is missing, unless DUCKE_REQUIRE_DEPLOY_TOOLS=1 (CI installs
Debian's nginx-light), which turns the skip into a failure.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "deploy" / "nginx"
MIME_TYPES = Path("/etc/nginx/mime.types")

pytestmark = pytest.mark.timeout(60)


def require_tool(name):
    """The tool's path; skip (or fail under DUCKE_REQUIRE_DEPLOY_TOOLS=1) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    problem = f"{name} is not installed (apt-get install nginx-light)"
    if os.environ.get("DUCKE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"DUCKE_REQUIRE_DEPLOY_TOOLS=1 but {problem}")
    pytest.skip(problem)


def replace(text, old, new, count):
    """``text`` with ``old`` replaced, after checking it occurs exactly ``count`` times."""
    found = text.count(old)
    assert found == count, f"expected {count} x {old!r} in the deploy config, found {found}"
    return text.replace(old, new)


def self_signed_certificate(directory):
    """A throwaway certificate and key for duck.example, standing in for the operator's."""
    openssl = require_tool("openssl")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        [openssl, *request, "-subj", "/CN=duck.example", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def deploy_file(name, prefix, cert=None, key=None):
    """A deploy/nginx file with only the compose-specific names and paths replaced."""
    text = (NGINX_DIR / name).read_text()
    if name == "nginx.conf":
        text = replace(text, "server app1:8000 ", "server 127.0.0.1:8000 ", 1)
        text = replace(text, "server app2:8000 ", "server 127.0.0.2:8000 ", 1)
    if name in ("nginx.conf", "tls.conf"):
        include = "include /etc/nginx/ducke-locations.conf;"
        text = replace(text, include, f"include {prefix / 'ducke-locations.conf'};", 1)
    if name == "tls.conf":
        text = replace(text, "/etc/nginx/tls/fullchain.pem;", f"{cert};", 1)
        text = replace(text, "/etc/nginx/tls/privkey.pem;", f"{key};", 1)
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


def nginx_test(prefix, site_files):
    """Lay out the mounts under ``prefix`` and run ``nginx -t``; returns its output."""
    nginx = require_tool("nginx")
    if not MIME_TYPES.exists():
        pytest.fail(f"nginx is installed but {MIME_TYPES} is missing")
    (prefix / "conf.d").mkdir()
    (prefix / "temp").mkdir()
    (prefix / "ducke-locations.conf").write_text(deploy_file("ducke-locations.conf", prefix))
    cert = key = None
    if "tls.conf" in site_files:
        cert, key = self_signed_certificate(prefix)
    for name, mounted_as in site_files.items():
        (prefix / "conf.d" / mounted_as).write_text(deploy_file(name, prefix, cert, key))
    (prefix / "nginx.conf").write_text(main_config(prefix))
    paths = ["-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    # As root, nginx checks its worker user exists; Debian has no "nginx" user, "nobody" it has.
    user = ["-g", "user nobody nogroup;"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [nginx, "-t", *paths, *user],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax is ok" in output and "test is successful" in output, output
    # Warnings too: a duplicate zone, an ignored directive or a conflicting server name.
    assert not re.search(r"\[(warn|emerg|alert|crit|error)\]", output), output
    return output


def test_the_front_proxy_config_passes_nginx_t(tmp_path):
    nginx_test(tmp_path, {"nginx.conf": "default.conf"})


def test_the_tls_config_passes_nginx_t(tmp_path):
    # As deploy/compose.tls.yml mounts it: next to the plain server, sharing its zones.
    nginx_test(tmp_path, {"nginx.conf": "default.conf", "tls.conf": "tls.conf"})


def test_nginx_t_would_catch_a_broken_config(tmp_path, monkeypatch):
    # The same run on a config with a limit that names no zone must fail: the test can fail.
    original = deploy_file

    def broken(name, prefix, cert=None, key=None):
        text = original(name, prefix, cert, key)
        if name == "ducke-locations.conf":
            text = text.replace("zone=ducke_session ", "zone=no_such_zone ", 1)
        return text

    monkeypatch.setitem(globals(), "deploy_file", broken)
    with pytest.raises(AssertionError, match="no_such_zone"):
        nginx_test(tmp_path, {"nginx.conf": "default.conf"})
