"""quotas in a project of its own: neutral defaults, the README's examples, the guard, budgets,
the admin, checks and migrations, with nothing of DUCK-E installed or imported."""

import io
import json
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command

from quotas.models import (
    BudgetPolicy,
    ModelPrice,
    RateLimitRule,
    SpendLimit,
    ToolPrice,
)
from quotas.policies import policy_cache

pytestmark = pytest.mark.django_db


def rule(name, scope="view", target="", limit=2, **fields):
    made = RateLimitRule(
        name=name, scope=scope, target=target, limit=limit, window_seconds=60, **fields
    )
    made.full_clean()
    made.save()
    policy_cache.invalidate()
    return made


def test_a_fresh_install_is_neutral():
    assert BudgetPolicy.objects.filter(active=True).count() == 1
    assert not RateLimitRule.objects.exists()
    assert not ModelPrice.objects.exists()
    assert not SpendLimit.objects.exists()
    assert not ToolPrice.objects.exists()
    call_command("quotas_load_defaults", stdout=io.StringIO())
    assert not RateLimitRule.objects.exists() and not ModelPrice.objects.exists()


def test_migrations_are_up_to_date():
    call_command("makemigrations", "quotas", "--check", "--dry-run", stdout=io.StringIO())


def test_system_checks_pass():
    from django.core.checks import run_checks

    problems = [m for m in run_checks() if m.id.startswith("quotas.")]
    assert problems == []


def test_the_decorated_view_of_the_readme(client):
    rule("search", limit=2)
    codes = [client.get("/search", REMOTE_ADDR="192.0.2.7").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    refused = client.get("/search", REMOTE_ADDR="192.0.2.7")
    assert refused.json()["error"] == "rate_limited" and refused["Retry-After"]


def test_the_check_view_of_the_readme(client):
    rule("exports", limit=1)
    assert client.get("/export", REMOTE_ADDR="192.0.2.8").json() == {"left": 0}
    over = client.get("/export", REMOTE_ADDR="192.0.2.8")
    assert over.status_code == 429 and 0 < over.json()["wait"] <= 60


def test_an_http_rule_by_url_name(client):
    rule("status-name", scope="http", target="status", limit=1)
    assert client.get("/status", REMOTE_ADDR="192.0.2.9").status_code == 200
    assert client.get("/status", REMOTE_ADDR="192.0.2.9").status_code == 429


async def connect(path="/chat", address="198.51.100.4"):
    from tests.reuse.asgi import websocket

    scope_client = WebsocketCommunicator(websocket, path)
    scope_client.scope["client"] = (address, 40000)
    connected, code = await scope_client.connect()
    return scope_client, connected, code


@pytest.mark.django_db(transaction=True)
async def test_the_consumer_of_the_readme_counts_its_messages():
    await sync_to_async(rule)("chat-messages", limit=2)
    chat, connected, _ = await connect()
    assert connected
    for text in ("one", "two"):
        await chat.send_json_to({"text": text})
        assert (await chat.receive_json_from())["echo"] == {"text": text}
    await chat.send_json_to({"text": "three"})
    assert (await chat.receive_json_from())["error"] == "slow down"
    await chat.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_the_guard_refuses_connections_over_the_websocket_rule():
    await sync_to_async(rule)("chat-connect", scope="websocket", target="/chat", limit=1)
    first, connected, _ = await connect(address="198.51.100.5")
    assert connected
    second, connected, _ = await connect(address="198.51.100.5")
    assert connected  # accepted only to say why
    refusal = await second.receive_json_from()
    assert refusal["type"] == "quota.exceeded" and refusal["reason"] == "rate_limited"
    assert (await second.receive_output())["code"] == 4429
    await first.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_the_guard_refuses_a_client_over_its_spend_limit():
    from quotas.caps import Identity
    from quotas.spend import entry_member, spend_counters

    await SpendLimit.objects.acreate(
        name="client-hour", key="client", cap_usd=Decimal("0.10"), window_seconds=3600
    )
    policy_cache.invalidate()
    snapshot = await policy_cache.aget()
    counters = spend_counters()
    caps = counters.caps_for(
        snapshot.budget, Identity("198.51.100.6"), limits=snapshot.spend_limits
    )
    await counters.acharge(
        None, 100_000, snapshot.budget, member=entry_member(100_000, "x"), caps=caps
    )
    chat, connected, _ = await connect(address="198.51.100.6")
    assert connected
    refusal = await chat.receive_json_from()
    assert refusal["reason"] == "client_budget" and refusal["retry_after"] > 0
    assert "spending limit" in refusal["message"]
    assert (await chat.receive_output())["code"] == 4402
    other, connected, _ = await connect(address="198.51.100.7")
    assert connected
    await other.send_json_to({"hello": 1})
    assert (await other.receive_json_from())["echo"] == {"hello": 1}
    await other.disconnect()


def test_the_admin_edits_limits_and_shows_the_reports(admin_client):
    response = admin_client.post(
        "/admin/quotas/spendlimit/add/",
        {
            "name": "user-day",
            "key": "user",
            "cap_usd": "3.00",
            "period": "day",
            "window_seconds": "",
            "group": "",
            "alert_at_percent": "",
            "enabled": "on",
        },
    )
    assert response.status_code == 302
    assert SpendLimit.objects.get(name="user-day").period == "day"
    assert admin_client.get("/admin/quotas/reports/").status_code == 200
    assert admin_client.get("/admin/quotas/reports/top-clients/").status_code == 200


def test_alerts_name_the_project_not_duck_e(settings, mailoutbox):
    from quotas import alerts

    settings.ADMINS = [("ops", "ops@example.com")]
    settings.QUOTAS_ALERT_EMAILS = ["ops@example.com"]
    alerts.send_alert("breaker_open", "Circuit breaker open", "test", dedupe_key="reuse")
    alerts.flush()
    assert mailoutbox and mailoutbox[0].subject.startswith("[Reuse Demo] ")
    assert "DUCK-E" not in mailoutbox[0].subject + mailoutbox[0].body


def test_refusal_messages_name_the_project():
    from quotas.protocol import refusal_message

    assert refusal_message("hourly_cap", 120).startswith("Reuse Demo has reached")
    assert json.dumps(refusal_message("breaker", 60)).count("DUCK-E") == 0


# Run in a process of its own: the rest of this run loads the Realtime add-on (its tests).
GENERIC_CORE_PROBE = r"""
import asyncio, importlib, json, sys
from pathlib import Path

import django

django.setup()
from django.core.management import call_command
from django.test import RequestFactory

call_command("migrate", verbosity=0)
import quotas

root = Path(quotas.__file__).parent
generic = sorted(
    ".".join(("quotas", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    for path in root.rglob("*.py")
    if "realtime" not in path.relative_to(root).parts and "build" not in path.parts
)
for name in generic:
    importlib.import_module(name)

from quotas.models import RateLimitRule
from quotas.policies import policy_cache
from quotas.spend import spend_counters
from quotas.testing import admit, charge

RateLimitRule.objects.create(
    name="probe", scope="view", target="", key="ip", limit=1, window_seconds=60
)
policy_cache.invalidate()
request = RequestFactory().get("/probe", REMOTE_ADDR="10.1.2.3")
checks = [quotas.check(request, "probe").allowed for _ in range(2)]
budget = policy_cache.get().budget
counters = spend_counters()
spent = charge(counters, "probe-session", 1_000, budget)
admitted = asyncio.run(counters.aadmit(budget)).allowed
loaded = sorted(n for n in sys.modules if n.split(".")[:2] == ["quotas", "realtime"])
if sys.argv[1:] == ["--then-meter"]:
    import quotas.realtime.meter  # noqa: F401  (the probe must see this)

    loaded = sorted(n for n in sys.modules if n.split(".")[:2] == ["quotas", "realtime"])
print(json.dumps({"generic": generic, "checks": checks, "admitted": admitted,
                  "session_micro": spent.session_micro, "realtime_loaded": loaded}))
"""


def _probe_generic_core(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DJANGO_SETTINGS_MODULE"] = "tests.reuse.settings"
    result = subprocess.run(
        [sys.executable, "-c", GENERIC_CORE_PROBE, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_generic_core_decides_without_loading_the_realtime_add_on():
    probe = _probe_generic_core()
    # Every module of the core was imported (the guards, the sweep, reports, commands...).
    for name in ("quotas.guards", "quotas.sweep", "quotas.reports", "quotas.pricing"):
        assert name in probe["generic"]
    assert "quotas.management.commands.quotas_load_prices" in probe["generic"]
    # A rate-limit decision (the second hit of a 1-per-minute rule is refused) and a spend
    # decision (a charge, then an admission) ran.
    assert probe["checks"] == [True, False]
    assert probe["session_micro"] == 1_000 and probe["admitted"]
    assert probe["realtime_loaded"] == []


def test_the_generic_core_probe_sees_the_realtime_add_on_once_loaded():
    probe = _probe_generic_core("--then-meter")
    assert "quotas.realtime.meter" in probe["realtime_loaded"]
    assert "quotas.realtime.usage" in probe["realtime_loaded"]


def test_with_no_price_at_all_the_core_knows_none_and_the_realtime_meter_guesses_high():
    from datetime import UTC, datetime

    from quotas.pricing import PriceBook, price_book
    from quotas.realtime import prices

    now = datetime.now(UTC)
    assert not ModelPrice.objects.exists()
    neutral = price_book().rates_at("gpt-realtime", now)
    assert neutral.unknown and neutral.audio_output == 0  # no OpenAI price in the core
    assert PriceBook([]).dearest_at(now).text_input == 0
    guessed = prices.price_book().rates_at("gpt-realtime", now)
    assert guessed.unknown
    assert (guessed.text_input, guessed.audio_output) == (Decimal(100), Decimal(200))
