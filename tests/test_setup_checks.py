"""Start-up guarantees: migrations, fresh-install defaults, commands, system checks, env errors."""

import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.test import override_settings

from quotas.models import BudgetPolicy, ModelPrice, PolicyVersion, RateLimitRule

ROOT = Path(__file__).resolve().parent.parent
MIDDLEWARE_PATH = "quotas.middleware.RateLimitMiddleware"


@pytest.mark.django_db
def test_migrations_are_up_to_date():
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db
def test_data_migration_loaded_the_design_defaults():
    rules = {
        r.name: (r.scope, r.target, r.key, r.limit, r.window_seconds, r.enabled, r.shadow)
        for r in RateLimitRule.objects.all()
    }
    assert rules == {
        "status": ("http", "/status", "ip", 60, 60, True, False),
        "page": ("http", "/", "ip", 30, 60, True, False),
        "session-connect": ("websocket", "/session", "ip", 5, 60, True, False),
        "default": ("http", "*", "ip", 100, 60, True, False),
        "tool-weather": ("tool", "weather", "ip", 10, 3600, True, False),
        "tool-web-search": ("tool", "web_search", "ip", 5, 3600, True, False),
    }
    budget = BudgetPolicy.objects.get()
    assert budget.active
    assert budget.session_cap_usd == Decimal("5.00")
    assert budget.session_max_seconds == 1800
    assert budget.hourly_cap_usd == Decimal("50.00")
    assert budget.breaker_threshold_usd == Decimal("100.00")
    assert budget.breaker_cooldown_seconds == 3600
    prices = {
        p.model: (
            p.text_input,
            p.cached_text_input,
            p.audio_input,
            p.cached_audio_input,
            p.text_output,
            p.audio_output,
        )
        for p in ModelPrice.objects.all()
    }
    flat = {"gpt-5": (10, 30), "gpt-5-mini": (3, 15), "gpt-realtime": (100, 200)}
    assert prices == {m: (i, i, i, i, o, o) for m, (i, o) in flat.items()}
    assert all(isinstance(v, Decimal) for row in prices.values() for v in row)
    assert PolicyVersion.objects.get(pk=1).version >= 1


@pytest.mark.django_db
def test_load_defaults_restores_missing_rows_and_keeps_edits():
    RateLimitRule.objects.filter(name="page").delete()
    RateLimitRule.objects.filter(name="status").update(limit=7)
    version = PolicyVersion.objects.get(pk=1).version
    out = StringIO()
    call_command("quotas_load_defaults", stdout=out)
    assert "Default policies are in place." in out.getvalue()
    assert RateLimitRule.objects.get(name="page").limit == 30
    assert RateLimitRule.objects.get(name="status").limit == 7
    assert RateLimitRule.objects.count() == 6
    assert BudgetPolicy.objects.count() == 1
    assert PolicyVersion.objects.get(pk=1).version > version


@pytest.mark.django_db
def test_load_prices_list_sheet():
    out = StringIO()
    call_command("quotas_load_prices", "list", "--effective-from", "2026-12-01", stdout=out)
    assert "from the 'list' sheet, effective 2026-12-01 00:00 UTC" in out.getvalue()
    when = datetime(2026, 12, 1, tzinfo=UTC)
    realtime = ModelPrice.objects.get(model="gpt-realtime", effective_from=when)
    assert realtime.audio_output == Decimal("64.00")
    assert realtime.cached_text_input == Decimal("0.40")
    # Loading the same sheet at the same date again adds nothing.
    out = StringIO()
    call_command("quotas_load_prices", "list", "--effective-from", "2026-12-01", stdout=out)
    assert "Loaded 0 price(s)" in out.getvalue()


@pytest.mark.django_db
def test_load_prices_rejects_a_bad_date():
    before = ModelPrice.objects.count()
    with pytest.raises(CommandError, match="is not an ISO date such as 2026-12-01"):
        call_command("quotas_load_prices", "list", "--effective-from", "next tuesday")
    assert ModelPrice.objects.count() == before


def check_ids(**overrides):
    with override_settings(**overrides):
        return {message.id for message in run_checks()}


def test_checks_pass_on_the_test_settings():
    ids = check_ids()
    assert not {i for i in ids if i.startswith("quotas.E")}
    assert "quotas.W001" not in ids


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"QUOTAS_FAIL_MODE": "sometimes"}, "quotas.E001"),
        ({"QUOTAS_TRUSTED_PROXIES": "10.0.0.0/33"}, "quotas.E002"),
        ({"QUOTAS_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"}, "quotas.E002"),
        ({"QUOTAS_TRUSTED_PROXIES": 42}, "quotas.E002"),
        ({"QUOTAS_REDIS_URL": "http://127.0.0.1:6379/0"}, "quotas.E003"),
        ({"QUOTAS_POLICY_REFRESH_SECONDS": 0}, "quotas.E004"),
        ({"QUOTAS_SESSION_HEARTBEAT_SECONDS": 0}, "quotas.E004"),
        ({"QUOTAS_IPV6_PREFIX": "abc"}, "quotas.E005"),
        ({"QUOTAS_IPV6_PREFIX": 0}, "quotas.E005"),
        ({"QUOTAS_IPV6_PREFIX": 129}, "quotas.E005"),
        ({"QUOTAS_IPV4_PREFIX": 33}, "quotas.E005"),
        ({"QUOTAS_IPV4_PREFIX": "24"}, "quotas.E005"),
    ],
)
def test_checks_report_bad_quota_settings(overrides, expected):
    assert expected in check_ids(**overrides)


def test_prefix_check_names_the_variable_and_accepts_the_whole_range():
    with override_settings(QUOTAS_IPV6_PREFIX=129):
        (error,) = [m for m in run_checks() if m.id == "quotas.E005"]
    assert "QUOTAS_IPV6_PREFIX" in error.msg and "129" in error.msg
    assert "QUOTAS_IPV6_PREFIX" in error.hint and "1 to 128" in error.hint
    for good in ({"QUOTAS_IPV6_PREFIX": 1, "QUOTAS_IPV4_PREFIX": 1}, {"QUOTAS_IPV6_PREFIX": 128}):
        assert "quotas.E005" not in check_ids(**good)


def test_check_warns_without_the_middleware(settings):
    middleware = [m for m in settings.MIDDLEWARE if m != MIDDLEWARE_PATH]
    assert "quotas.W001" in check_ids(MIDDLEWARE=middleware)
    assert "quotas.W001" not in check_ids(MIDDLEWARE=middleware, QUOTAS_ENABLED=False)


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_check_warns_about_a_shared_database_without_redis(settings):
    postgres = {
        "default": {**settings.DATABASES["default"], "ENGINE": "django.db.backends.postgresql"}
    }
    assert "quotas.W002" in check_ids(DATABASES=postgres, QUOTAS_REDIS_URL="")
    assert "quotas.W002" not in check_ids(
        DATABASES=postgres, QUOTAS_REDIS_URL="redis://127.0.0.1:6379/0"
    )


def in_fresh_process(args, timeout=60, **env):
    """Run ``python *args`` from the project root in a fresh process on DUCK-E's settings,
    without the shell's database and Redis, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    clean.update(DJANGO_SETTINGS_MODULE="ducke.settings", PYTHONWARNINGS="ignore", **env)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def manage_check(**env):
    """Run ``manage.py check`` in a fresh process with the given environment variables."""
    return in_fresh_process(["manage.py", "check"], **env)


@pytest.mark.parametrize(
    ("variable", "value", "check_id"),
    [
        ("DATABASE_URL", "garbage", "ducke.E001"),
        ("REDIS_URL", "http://x", "ducke.E001"),
        ("DJANGO_DEBUG", "maybe", "ducke.E001"),
        ("QUOTAS_ENABLED", "perhaps", "ducke.E001"),
        ("QUOTAS_FAIL_MODE", "x", "quotas.E001"),
        ("QUOTAS_TRUSTED_PROXIES", "10.0.0.0/33", "quotas.E002"),
        ("QUOTAS_IPV6_PREFIX", "abc", "ducke.E001"),
        ("QUOTAS_IPV4_PREFIX", "33", "quotas.E005"),
        ("DJANGO_LOGIN_FAILURES_PER_USERNAME", "0", "ducke.E001"),
        ("DJANGO_LOGIN_FAILURES_PER_ADDRESS", "many", "ducke.E001"),
        ("DJANGO_LOGIN_COOLOFF_MINUTES", "-15", "ducke.E001"),
        ("QUOTAS_SPEND_SWEEP_SECONDS", "-1", "ducke.E001"),
        ("QUOTAS_SESSION_HEARTBEAT_SECONDS", "soon", "ducke.E001"),
        ("QUOTAS_SESSION_HEARTBEAT_SECONDS", "0", "quotas.E004"),
    ],
)
def test_bad_environment_stops_start_up_with_a_message(variable, value, check_id):
    result = manage_check(**{variable: value})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert check_id in output
    assert variable in output
    assert "Traceback" not in output


def test_good_environment_starts():
    result = manage_check(
        DJANGO_DEBUG="true",
        QUOTAS_FAIL_MODE="closed",
        QUOTAS_TRUSTED_PROXIES="10.0.0.0/8,::1",
        QUOTAS_IPV6_PREFIX="56",
        QUOTAS_IPV4_PREFIX="24",
        QUOTAS_SPEND_SWEEP_SECONDS="60",
        QUOTAS_SESSION_HEARTBEAT_SECONDS="10",
        REDIS_URL="redis://:secret@127.0.0.1:6379/0",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_the_server_process_freezes_what_start_up_loaded(tmp_path):
    """ducke.asgi ends with gc.freeze(): a full collection no longer walks Django, the apps
    and the tokenizer (~70 ms a walk here), only what sessions created since."""
    probe = (
        "import gc; before = gc.get_freeze_count(); import ducke.asgi; "
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))"
    )
    result = in_fresh_process(
        ["-c", probe], timeout=120, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    before, frozen, tracked = map(int, result.stdout.split()[-3:])
    assert before == 0
    assert frozen > 50_000  # Django and the apps: over 100,000 objects here
    assert tracked < frozen / 10  # what the collector still walks: the few made since
