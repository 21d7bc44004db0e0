"""Admin login lockout (django-axes): 5 failures lock a username, 20 lock an address.

Time moves by shifting the recorded attempt times back in the database, so the cool-off is
tested without sleeping.
"""

import io
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core.management import call_command
from django.db.models import F, Sum
from django.test import Client

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
COOL_OFF = timedelta(minutes=15)


@pytest.fixture
def duck(db):
    """The account under attack."""
    return get_user_model().objects.create_superuser("duck", "duck@example.com", PASSWORD)


@pytest.fixture
def hasher_runs(monkeypatch):
    """How often a password was hashed: every check of a password (``verify``) and the dummy
    hash ModelBackend computes for an unknown username go through the hasher's ``encode``."""
    runs = []
    encode = MD5PasswordHasher.encode

    def counted_encode(self, password, salt):
        runs.append(password)
        return encode(self, password, salt)

    monkeypatch.setattr(MD5PasswordHasher, "encode", counted_encode)
    return runs


def login(username, password, address="198.51.100.1", **headers):
    """POST the admin login form as a fresh browser at ``address``."""
    return Client().post(
        "/admin/login/?next=/admin/",
        {"username": username, "password": password},
        REMOTE_ADDR=address,
        **headers,
    )


def logged_in(response):
    return response.status_code == 302 and response["Location"] == "/admin/"


def locked_out(response):
    return response.status_code == 429 and "Too many failed logins" in response.text


def refused_form(response):
    """The login form again, with Django's wrong-password message: counted, not locked."""
    return response.status_code == 200 and "Please enter the correct" in response.text


def cool_off_passes(by=COOL_OFF + timedelta(seconds=1), **only):
    """Move the recorded failures (those matching ``only``) ``by`` into the past."""
    AccessAttempt.objects.filter(**only).update(attempt_time=F("attempt_time") - by)


def test_the_sixth_wrong_password_for_a_username_is_locked_out_from_any_address(duck, hasher_runs):
    answers = [login("duck", "wrong", f"198.51.100.{n}") for n in range(1, 6)]
    assert all(refused_form(answer) for answer in answers[:4])
    # The fifth failure reaches the limit: its answer already says so.
    assert locked_out(answers[4])
    assert len(hasher_runs) == 5

    sixth = login("duck", "wrong", "198.51.100.6")
    assert locked_out(sixth)
    assert 899 <= int(sixth["Retry-After"]) <= 900
    assert "this username" in sixth.text and "Try again in 15 minutes" in sixth.text
    assert len(hasher_runs) == 5, "a locked-out attempt ran the password hasher"

    # The right password is refused too, from a fresh address, until the cool-off ends.
    right = login("duck", PASSWORD, "192.0.2.50")
    assert locked_out(right) and "sessionid" not in right.cookies
    assert len(hasher_runs) == 5
    counted = AccessAttempt.objects.filter(username="duck").aggregate(n=Sum("failures_since_start"))
    assert counted["n"] == 5, "refused attempts were counted"
    # Refused attempts are not counted, so they do not extend the lock: 14 minutes on it
    # still holds and says so, ...
    cool_off_passes(by=timedelta(minutes=14))
    later = login("duck", PASSWORD, "192.0.2.50")
    assert locked_out(later) and 59 <= int(later["Retry-After"]) <= 60
    # ... and 15 minutes after the fifth failure the right password logs in.
    cool_off_passes(by=timedelta(minutes=1, seconds=1))
    assert logged_in(login("duck", PASSWORD, "192.0.2.50"))
    # The successful login cleared the username's count.
    assert not AccessAttempt.objects.filter(username="duck").exists()


def test_twenty_one_failures_from_one_address_for_different_usernames_lock_that_address(
    duck, hasher_runs
):
    answers = [login(f"guess-{n}", "wrong", "203.0.113.9") for n in range(1, 21)]
    assert all(refused_form(answer) for answer in answers[:19])
    assert locked_out(answers[19])
    assert len(hasher_runs) == 20

    twenty_first = login("guess-21", "wrong", "203.0.113.9")
    assert locked_out(twenty_first) and "your address" in twenty_first.text
    assert len(hasher_runs) == 20, "a locked-out attempt ran the password hasher"
    # From that address even the right password is refused; no username reached its own
    # limit, so it works from elsewhere ...
    assert locked_out(login("duck", PASSWORD, "203.0.113.9"))
    assert logged_in(login("duck", PASSWORD, "203.0.113.10"))
    # ... and, after the cool-off, from the address too.
    cool_off_passes()
    assert logged_in(login("duck", PASSWORD, "203.0.113.9"))


def test_an_ipv6_64_counts_as_one_address(duck, settings):
    settings.DUCKE_LOGIN_FAILURE_LIMITS = {"username": 5, "ip_address": 3}
    for n in range(1, 4):
        login(f"guess-{n}", "wrong", f"2001:db8:1:2::{n}")
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"2001:db8:1:2::"}
    assert locked_out(login("duck", PASSWORD, "2001:db8:1:2:ffff::1"))
    assert logged_in(login("duck", PASSWORD, "2001:db8:1:3::1"))


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(duck, settings):
    settings.QUOTAS_TRUSTED_PROXIES = "10.0.0.0/8"
    settings.DUCKE_LOGIN_FAILURE_LIMITS = {"username": 5, "ip_address": 3}

    def via_proxy(username, password, client):
        return login(username, password, "10.0.0.2", HTTP_X_FORWARDED_FOR=f"{client}, 10.0.0.3")

    for n in range(1, 4):
        via_proxy(f"guess-{n}", "wrong", "198.51.100.77")
    assert locked_out(via_proxy("duck", PASSWORD, "198.51.100.77"))
    # Everyone else behind the same proxy can still log in.
    assert logged_in(via_proxy("duck", PASSWORD, "198.51.100.78"))


def test_a_client_asking_for_json_gets_json(duck):
    for n in range(5):
        login("duck", "wrong", f"198.51.100.{n + 1}")
    response = login("duck", PASSWORD, HTTP_ACCEPT="application/json")
    assert response.status_code == 429
    body = response.json()
    assert body["error"] == "locked_out" and body["retry_after"] == int(response["Retry-After"])
    assert "Try again in 15 minutes" in body["detail"]


def lock_duck():
    for n in range(5):
        login("duck", "wrong", f"198.51.100.{n + 1}")
    assert locked_out(login("duck", PASSWORD))


def test_the_operator_unlocks_a_username_with_the_command(duck):
    lock_duck()
    out = io.StringIO()
    call_command("axes_reset_username", "duck", stdout=out)
    assert "5 attempts removed" in out.getvalue()
    assert logged_in(login("duck", PASSWORD))


def test_the_operator_unlocks_a_username_in_the_admin(duck, admin_client):
    lock_duck()
    one_row = AccessAttempt.objects.filter(username="duck").first()
    response = admin_client.post(
        "/admin/axes/accessattempt/",
        {"action": "unlock_usernames", "_selected_action": [one_row.pk]},
        follow=True,
    )
    assert "Unlocked 1 username(s); 5 attempt rows removed." in response.text
    assert logged_in(login("duck", PASSWORD))


def test_the_operator_unlocks_an_address_in_the_admin(duck, admin_client, settings):
    settings.DUCKE_LOGIN_FAILURE_LIMITS = {"username": 5, "ip_address": 3}
    for n in range(3):
        login(f"guess-{n}", "wrong", "203.0.113.9")
    assert locked_out(login("duck", PASSWORD, "203.0.113.9"))
    one_row = AccessAttempt.objects.filter(ip_address="203.0.113.9").first()
    response = admin_client.post(
        "/admin/axes/accessattempt/",
        {"action": "unlock_addresses", "_selected_action": [one_row.pk]},
        follow=True,
    )
    assert "Unlocked 1 address(es); 3 attempt rows removed." in response.text
    assert logged_in(login("duck", PASSWORD, "203.0.113.9"))


def test_expired_attempts_are_cleaned_up_from_the_admin(duck, admin_client):
    login("other", "wrong")
    login("duck", "wrong")
    cool_off_passes(username="duck")
    any_row = AccessAttempt.objects.first().pk
    response = admin_client.post(
        "/admin/axes/accessattempt/",
        {"action": "cleanup_expired_attempts", "_selected_action": [any_row]},
        follow=True,
    )
    assert "Cleaned up 1 expired access attempts." in response.text
    assert list(AccessAttempt.objects.values_list("username", flat=True)) == ["other"]


def test_attempts_are_visible_read_only_in_the_admin(duck, admin_client):
    lock_duck()
    login("other", "wrong", "198.51.100.1")
    listing = admin_client.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200
    rows = listing.context["cl"].result_list
    duck_rows = [row for row in rows if row.username == "duck"]
    assert len(duck_rows) == 5
    assert "5 / 5 locked" in listing.text
    # 198.51.100.1 has one failure for duck and one for other.
    assert "2 / 20" in listing.text
    pk = duck_rows[0].pk
    assert admin_client.get("/admin/axes/accessattempt/add/").status_code == 403
    assert admin_client.get(f"/admin/axes/accessattempt/{pk}/change/").status_code == 200
    assert admin_client.post(f"/admin/axes/accessattempt/{pk}/change/", {}).status_code == 403
    assert admin_client.get("/admin/axes/accesslog/").status_code == 200


def test_the_lockout_page_carries_the_security_headers(duck):
    lock_duck()
    response = login("duck", PASSWORD)
    assert "script-src 'self'" in response["Content-Security-Policy"]
    assert response["X-Frame-Options"] == "DENY"


def test_the_limits_and_cool_off_come_from_the_environment():
    script = (
        "from django.conf import settings as s; "
        "print(s.DUCKE_LOGIN_FAILURE_LIMITS, s.AXES_COOLOFF_TIME.total_seconds())"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(
        DJANGO_SETTINGS_MODULE="ducke.settings",
        DJANGO_LOGIN_FAILURES_PER_USERNAME="3",
        DJANGO_LOGIN_FAILURES_PER_ADDRESS="50",
        DJANGO_LOGIN_COOLOFF_MINUTES="60",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "{'username': 3, 'ip_address': 50} 3600.0", result.stderr


def test_lockout_through_daphne(daphne_server_factory):
    """The ASGI path (axes' async middleware) answers the lockout the same way."""
    server = daphne_server_factory(DJANGO_LOGIN_FAILURES_PER_USERNAME="2")
    with httpx.Client(base_url=server.url, timeout=10) as browser:
        page = browser.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        form = {"csrfmiddlewaretoken": token, "username": "nobody", "password": "wrong"}
        answers = [browser.post("/admin/login/", data=form) for _ in range(3)]
    assert answers[0].status_code == 200, server.log_tail()
    assert [a.status_code for a in answers[1:]] == [429, 429], server.log_tail()
    assert 899 <= int(answers[2].headers["Retry-After"]) <= 900
    assert "Too many failed logins for this username" in answers[2].text
    assert "Content-Security-Policy" in answers[2].headers
