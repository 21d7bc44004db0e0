"""Deployments behind TLS: the DJANGO_SECURE_* / CSRF variables, `check --deploy`, and an
admin login through a TLS-terminating proxy (X-Forwarded-Proto, an https:// Origin)."""

import os
import re
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = "https://duck.example"
PASSWORD = "duck-tls-pw-1"
PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "DJANGO_ALLOWED_HOSTS": "duck.example",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
    "DJANGO_CSRF_TRUSTED_ORIGINS": PUBLIC,
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
}
# Variables of the developer's shell that would change the settings under test.
REMOVED = {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "OPENAI_API_KEY"}


def random_secret_key(length=60):
    alphabet = string.ascii_letters + string.digits + "!@#%^&*(-_=+)"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def manage(tmp_path, *args, **env):
    """``manage.py <args>`` in a fresh process with only ``env`` over a clean environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in REMOVED and not k.startswith(("DJANGO_", "DUCKE_", "QUOTAS_"))
    }
    clean.update(
        DJANGO_SETTINGS_MODULE="ducke.settings",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        PYTHONWARNINGS="ignore",
        **env,
    )
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, result.stdout + result.stderr


def test_check_deploy_is_clean_with_a_production_environment(tmp_path):
    result, output = manage(
        tmp_path, "check", "--deploy", DJANGO_SECRET_KEY=random_secret_key(), **PRODUCTION
    )
    assert result.returncode == 0, output
    assert "System check identified no issues" in result.stdout, output
    assert not re.search(r"\b[\w.]+\.W\d{3}\b", output), output


def test_check_deploy_warns_without_the_https_settings(tmp_path):
    # The same run without the HTTPS variables: the warnings issue 11 measured come back.
    plain = {k: PRODUCTION[k] for k in ("DJANGO_DEBUG", "DJANGO_ALLOWED_HOSTS")}
    _, output = manage(
        tmp_path, "check", "--deploy", DJANGO_SECRET_KEY=random_secret_key(), **plain
    )
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in output, output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "HTTP_X_FORWARDED_PROTO"),
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto,https"),
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "HTTP_X_FORWARDED_PROTO,https,http"),
        ("DJANGO_CSRF_TRUSTED_ORIGINS", "duck.example"),
        ("DJANGO_CSRF_TRUSTED_ORIGINS", "https://duck.example/admin/"),
        ("DJANGO_CSRF_TRUSTED_ORIGINS", "https://duck.example:https"),
        ("DJANGO_SECURE_HSTS_SECONDS", "a year"),
        ("DJANGO_SECURE_HSTS_SECONDS", "-1"),
        ("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", "sometimes"),
        ("DJANGO_SECURE_HSTS_PRELOAD", "2"),
        ("DJANGO_SECURE_SSL_REDIRECT", "always"),
    ],
)
def test_a_malformed_tls_variable_stops_start_up_naming_it(tmp_path, variable, value):
    result, output = manage(tmp_path, "check", **{variable: value})
    assert result.returncode != 0
    assert "ducke.E001" in output and variable in output, output
    assert "Traceback" not in output, output


def test_the_variables_reach_django_settings(tmp_path):
    script = (
        "from django.conf import settings as s; print(repr((s.SECURE_PROXY_SSL_HEADER, "
        "s.CSRF_TRUSTED_ORIGINS, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS, "
        "s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD, s.SESSION_COOKIE_SECURE, "
        "s.CSRF_COOKIE_SECURE)))"
    )
    env = {**PRODUCTION, "DJANGO_CSRF_TRUSTED_ORIGINS": f"{PUBLIC}, https://*.duck.example"}
    result, output = manage(tmp_path, "shell", "--no-imports", "-c", script, **env)
    assert result.returncode == 0, output
    assert result.stdout.strip() == repr(
        (
            ("HTTP_X_FORWARDED_PROTO", "https"),
            [PUBLIC, "https://*.duck.example"],
            True,
            31536000,
            True,
            True,
            True,
            True,
        )
    )
    # Neither variable set: plain HTTP, cookies not restricted to HTTPS.
    result, output = manage(tmp_path, "shell", "--no-imports", "-c", script)
    assert result.stdout.strip() == repr((None, [], False, 0, False, False, False, False)), output


def test_the_proxy_header_alone_makes_cookies_secure(tmp_path):
    script = "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE)"
    header = {"DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https"}
    result, output = manage(tmp_path, "shell", "--no-imports", "-c", script, **header)
    assert result.stdout.strip() == "True", output


def login_through_the_proxy():
    """GET the login page for the CSRF cookie, then POST as a browser behind TLS would."""
    browser = Client(enforce_csrf_checks=True)
    proxied = {"HTTP_HOST": "duck.example", "HTTP_X_FORWARDED_PROTO": "https"}
    page = browser.get("/admin/login/", **proxied)
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert token
    return browser.post(
        "/admin/login/?next=/admin/",
        {"username": "operator", "password": PASSWORD, "csrfmiddlewaretoken": token.group(1)},
        HTTP_ORIGIN=PUBLIC,
        HTTP_REFERER=f"{PUBLIC}/admin/login/",
        **proxied,
    )


@pytest.fixture
def operator(db):
    return get_user_model().objects.create_superuser("operator", "ops@example.com", PASSWORD)


@override_settings(
    ALLOWED_HOSTS=["duck.example"],
    SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"),
    CSRF_TRUSTED_ORIGINS=[PUBLIC],
    SESSION_COOKIE_SECURE=True,
    CSRF_COOKIE_SECURE=True,
)
def test_admin_login_behind_a_tls_proxy_succeeds(operator):
    response = login_through_the_proxy()
    assert response.status_code == 302, response.content[:500]
    assert response["Location"] == "/admin/"
    assert response.cookies["sessionid"]["secure"] is True


@override_settings(ALLOWED_HOSTS=["duck.example"])
def test_admin_login_behind_a_tls_proxy_is_refused_without_the_settings(operator, caplog):
    response = login_through_the_proxy()
    assert response.status_code == 403
    reasons = [r.getMessage() for r in caplog.records if r.name == "django.security.csrf"]
    assert any("Origin checking failed" in reason for reason in reasons), reasons


@pytest.mark.django_db
@override_settings(
    SECURE_SSL_REDIRECT=True, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https")
)
def test_ssl_redirect_spares_the_health_check_and_metrics():
    plain = Client()
    page = plain.get("/")
    assert page.status_code == 301 and page["Location"] == "https://testserver/"
    assert plain.get("/admin/login/").status_code == 301
    # Docker's health check and Prometheus talk plain HTTP to each instance.
    assert plain.get("/status").status_code == 200
    assert plain.get("/metrics").status_code == 200
    assert plain.get("/", HTTP_X_FORWARDED_PROTO="https").status_code == 200
