"""Budgets through the real relay: one response at a time, spend limits at connect and at
every reservation, tiers for signed-in users, provisional records, the stale-session sweep."""

import asyncio
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from quotas.models import BudgetPolicy, QuotaSession, SpendLimit, UsageRecord
from tests.fixtures.relay import ORIGIN_HEADERS, SessionClient, user_text

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("close_worker_connections"),
]


def a_client():
    return f"10.8.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


@sync_to_async
def policy(**budget):
    from quotas.signals import bump_policy_version

    if budget:
        BudgetPolicy.objects.filter(active=True).update(**budget)
    bump_policy_version()


@sync_to_async
def set_limit(name, **fields):
    SpendLimit.objects.update_or_create(name=name, defaults=fields)


@sync_to_async
def load_list_prices():
    from django.core.management import call_command

    call_command("quotas_load_prices", "list", "--effective-from", "2026-01-01")


@sync_to_async
def ledger():
    return list(QuotaSession.objects.all()), list(UsageRecord.objects.order_by("created_at"))


async def closed_ledger(timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions, records = await ledger()
        if sessions and all(s.ended_at for s in sessions):
            return sessions, records
        await asyncio.sleep(0.05)
    raise AssertionError("the session row was not closed")


async def open_session(app, client=None, headers=None):
    browser = SessionClient(app, client=client or a_client(), headers=headers)
    accepted, code = await browser.connect()
    assert accepted, code
    first = await browser.next_message()
    if first["type"] == "quota.exceeded":
        return browser, first
    await browser.receive_until("session.updated")
    return browser, None


async def ask(browser, text="Walk me through my failing test, please."):
    await browser.send_event(user_text(text))
    await browser.send_event({"type": "response.create"})


async def test_a_burst_of_response_creates_starts_exactly_one_response(relay_app, simulator):
    simulator.pace = 1.0  # the answer streams for seconds: the burst meets it running
    browser, _ = await open_session(relay_app)
    await browser.send_event(user_text("Why does my loop never end?"))
    for _ in range(50):
        await browser.send_event({"type": "response.create"})
    events = await browser.receive_until("quota.status", timeout=20)
    refused = [
        e
        for e in events
        if e["type"] == "error" and e["error"]["code"] == "conversation_already_has_active_response"
    ]
    assert len(refused) == 49
    assert len([e for e in events if e["type"] == "response.done"]) == 1
    sent = [r.event["type"] for r in simulator.recorder.client_events]
    assert sent.count("response.create") == 1
    assert len(simulator.recorder.responses) == 1
    await browser.disconnect()


async def test_a_response_create_right_after_response_done_is_answered(
    relay_app, simulator, monkeypatch
):
    """The browser sees ``response.done`` before the relay has booked it: a question asked at
    once waits for the booking, it is not refused as if the answer were still running."""
    from quotas.realtime.meter import SessionMeter

    charge_response = SessionMeter.charge_response

    async def slow_charge(self, event):
        await asyncio.sleep(0.3)  # a slow ledger: the browser is faster
        return await charge_response(self, event)

    monkeypatch.setattr(SessionMeter, "charge_response", slow_charge)
    browser, _ = await open_session(relay_app)
    await ask(browser)
    await browser.receive_until("response.done", timeout=20)
    await ask(browser, "And why only on Tuesdays?")
    events = await browser.receive_until("response.done", timeout=20)
    assert not [e for e in events if e["type"] == "error"], events
    assert len(simulator.recorder.responses) == 2
    await browser.disconnect()


async def test_a_running_response_is_held_provisionally_then_settled_exactly(relay_app, simulator):
    simulator.pace = 1.0
    browser, _ = await open_session(relay_app)
    await ask(browser)
    await browser.receive_until("response.output_audio.delta", timeout=10)
    _, records = await ledger()
    assert [(r.kind, r.estimated) for r in records] == [("response", True)]
    estimate = records[0].cost_usd
    # The server's max_output_tokens, at the dearest output kind.
    assert records[0].audio_output + records[0].text_output == 1000
    events = await browser.receive_until("quota.status", timeout=20)
    status = events[-1]
    assert status["limit_name"] == "session"
    _, records = await ledger()
    assert [(r.kind, r.estimated) for r in records] == [("response", False)]
    assert records[0].response_id == simulator.recorder.responses[0].event["id"]
    assert 0 < records[0].cost_usd < estimate
    await browser.disconnect()


async def test_a_client_over_its_spend_limit_is_refused_at_reservation_then_at_connect(
    relay_app, simulator
):
    await load_list_prices()  # cheap enough for several answers under a few cents
    await set_limit("client-hour", key="client", cap_usd=Decimal("0.03"), window_seconds=3600)
    await policy(max_output_tokens_per_response=200)
    client = a_client()
    browser, refusal = await open_session(relay_app, client)
    assert refusal is None
    for _ in range(20):
        await ask(browser)
        events = await browser.receive_until("quota.status", timeout=20)
        if events[-1]["type"] == "websocket.close":
            break
    else:
        raise AssertionError("the client's limit never bit")
    assert events[-1] == {"type": "websocket.close", "code": 4402}
    exceeded = [e for e in events if e["type"] == "quota.exceeded"]
    assert [e["reason"] for e in exceeded] == ["client_budget"]
    assert exceeded[0]["retry_after"] > 0
    sessions, records = await closed_ledger()
    assert sum(r.cost_usd for r in records) <= Decimal("0.03")  # reservations: no overshoot
    assert not [r for r in records if r.estimated]
    assert sessions[0].end_reason == "client_budget"
    # No room for one more bounded answer: the next connect is refused before the relay runs.
    again, refusal = await open_session(relay_app, client)
    assert refusal["reason"] == "client_budget" and 0 < refusal["retry_after"] <= 3600
    assert (await again.next_message())["code"] == 4402
    # Another client is served.
    other, refusal = await open_session(relay_app, a_client())
    assert refusal is None
    await other.disconnect()


async def test_quota_status_names_the_tightest_limit(relay_app):
    await set_limit("client-hour", key="client", cap_usd=Decimal("1.00"), window_seconds=3600)
    browser, _ = await open_session(relay_app)
    await ask(browser)
    events = await browser.receive_until("quota.status", timeout=20)
    status = events[-1]
    assert status["limit_name"] == "client-hour"
    spent = Decimal(status["session_cost_usd"])
    assert Decimal(status["limit_left_usd"]) == Decimal("1.00") - spent
    await browser.disconnect()


@sync_to_async
def signed_in_cookie(username, group=None):
    from django.contrib.auth.models import Group, User
    from django.test import Client

    user = User.objects.create_user(username, password="pw-123456")
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    web = Client()
    web.force_login(user)
    return user, (b"cookie", f"sessionid={web.cookies['sessionid'].value}".encode())


async def test_a_tier_member_gets_the_tier_cap_and_an_anonymous_client_the_untiered(relay_app):
    from django.contrib.auth.models import Group

    # Untiered: too little for one answer at fresh-install prices ($0.20 of output).
    await set_limit("client-hour", key="client", cap_usd=Decimal("0.05"), window_seconds=3600)
    gold = await sync_to_async(lambda: Group.objects.get_or_create(name="gold")[0])()
    await set_limit(
        "gold-hour", key="client", cap_usd=Decimal("50"), window_seconds=3600, group=gold
    )
    await policy()
    anonymous, refusal = await open_session(relay_app)
    assert refusal["reason"] == "client_budget"
    assert (await anonymous.next_message())["code"] == 4402
    user, cookie = await signed_in_cookie("ada", group="gold")
    member, refusal = await open_session(relay_app, headers=[*ORIGIN_HEADERS, cookie])
    assert refusal is None
    await ask(member)
    events = await member.receive_until("quota.status", timeout=20)
    assert events[-1]["limit_name"] == "session"  # $5 session cap is tighter than $50
    await member.disconnect()
    sessions, _ = await ledger()
    served = [s for s in sessions if s.user_id == user.pk]
    assert len(served) == 1 and served[0].cost_usd > 0
    # A signed-in user outside the tier keeps the untiered limit.
    _, plain = await signed_in_cookie("bob")
    outsider, refusal = await open_session(relay_app, headers=[*ORIGIN_HEADERS, plain])
    assert (await outsider.next_message())["code"] == 4402
    assert refusal["reason"] == "client_budget"


async def test_a_user_limit_counts_per_user_across_addresses(relay_app):
    await set_limit(
        "user-hour", key="user", cap_usd=Decimal("0.05"), period="rolling", window_seconds=3600
    )
    await policy()
    _, cookie = await signed_in_cookie("carol")
    for _ in range(2):  # two addresses, one user: both refused by the user's limit
        browser, refusal = await open_session(
            relay_app, client=a_client(), headers=[*ORIGIN_HEADERS, cookie]
        )
        assert refusal["reason"] == "user_budget"
        assert (await browser.next_message())["code"] == 4402


# -- the stale-session sweep ---------------------------------------------------------------------


@sync_to_async
def crashed_session(age_seconds, estimated_cost=Decimal("0.25")):
    beat = timezone.now() - timedelta(seconds=age_seconds)
    session = QuotaSession.objects.create(
        client="10.7.7.7", model="gpt-realtime", started_at=beat, heartbeat_at=beat
    )
    UsageRecord.objects.create(
        session=session,
        kind="response",
        model="gpt-realtime",
        response_id=f"reserved:{uuid.uuid4().hex}",
        cost_usd=estimated_cost,
        estimated=True,
        audio_output=1000,
        created_at=beat,
    )
    return session


async def test_the_sweep_closes_sessions_of_a_dead_process_and_keeps_their_estimate():
    from quotas.sweep import asweep

    dead = await crashed_session(age_seconds=600)
    alive = await crashed_session(age_seconds=10)
    result = await asweep()
    assert [pk for pk, _, _ in result.closed] == [str(dead.pk)]
    dead = await QuotaSession.objects.aget(pk=dead.pk)
    assert dead.end_reason == "server_crash"
    assert dead.cost_usd == Decimal("0.25") and dead.audio_output == 1000
    assert dead.ended_at == dead.heartbeat_at
    assert (await QuotaSession.objects.aget(pk=alive.pk)).ended_at is None
    assert len(await asweep()) == 0  # nothing left to close


async def test_a_starting_process_closes_stale_sessions_and_frees_their_slots(settings):
    from quotas.guards import session_slots
    from quotas.startup import prepare_process

    settings.QUOTAS_SPEND_SWEEP_SECONDS = 300
    dead = await crashed_session(age_seconds=600)
    await QuotaSession.objects.filter(pk=dead.pk).aupdate(slot="dead-slot")
    slots = session_slots()
    assert await slots.acquire("10.7.7.7", "dead-slot", 1)
    await sync_to_async(prepare_process)()
    dead = await QuotaSession.objects.aget(pk=dead.pk)
    assert dead.end_reason == "server_crash" and dead.cost_usd == Decimal("0.25")
    # The one slot the client may hold is free again.
    assert await slots.acquire("10.7.7.7", "new-slot", 1)
    await slots.release("10.7.7.7", "new-slot")


async def test_quotas_close_stale_command(capsys):
    from django.core.management import call_command

    await crashed_session(age_seconds=600)
    await sync_to_async(call_command)("quotas_close_stale")
    out = capsys.readouterr().out
    assert "as server_crash" in out and "1 stale sessions closed." in out


async def test_a_running_session_keeps_its_heartbeat(relay_app, settings):
    settings.QUOTAS_SESSION_HEARTBEAT_SECONDS = 0.2
    browser, _ = await open_session(relay_app)
    sessions, _ = await ledger()
    first = sessions[0].heartbeat_at
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        sessions, _ = await ledger()
        if sessions[0].heartbeat_at > first:
            break
    assert sessions[0].heartbeat_at > first
    await browser.disconnect()


async def test_a_web_search_books_its_tokens_and_its_per_call_fee(
    settings, relay_app, simulator, fake_responses_api
):
    from quotas.models import ToolPrice

    settings.DUCKE_OPENAI_BASE_URL = fake_responses_api.base_url
    settings.OPENAI_API_KEY = "sk-test-not-real"
    settings.DUCKE_WEB_SEARCH_TIMEOUT_SECONDS = 2
    fee = (await ToolPrice.objects.aget(tool="web_search")).per_call_usd
    browser, _ = await open_session(relay_app)
    await browser.send_event(user_text("Search the web for the latest Python release."))
    await browser.send_event({"type": "response.create"})
    await browser.receive_until("response.done", timeout=15)  # the function call
    await browser.receive_until("response.done", timeout=15)  # the spoken answer
    await browser.disconnect()
    sessions, records = await closed_ledger()
    kinds = sorted(r.kind for r in records)
    assert kinds == ["response", "response", "tool", "tool_fee"]
    [fee_row] = [r for r in records if r.kind == "tool_fee"]
    assert fee_row.cost_usd == fee and fee_row.model == "web_search"
    assert fee_row.response_id.endswith(":fee")
    assert sessions[0].cost_usd == sum(r.cost_usd for r in records)
