"""Cost protection through the real relay: caps, cutoff, duration, breaker, nothing lost."""

import asyncio
import time
import uuid
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from quotas.models import BudgetPolicy, ModelPrice, QuotaSession, UsageRecord
from quotas.spend import spend_counters
from tests.fixtures.relay import SessionClient, user_text

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("close_worker_connections"),
]


def a_client():
    return f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


@sync_to_async
def set_budget(**fields):
    BudgetPolicy.objects.filter(active=True).update(**fields)
    from quotas.signals import bump_policy_version

    bump_policy_version()


@sync_to_async
def ledger():
    sessions = list(QuotaSession.objects.all())
    records = list(UsageRecord.objects.all())
    return sessions, records


@sync_to_async
def audio_output_price(model="gpt-realtime"):
    return ModelPrice.objects.filter(model=model).order_by("-effective_from").first().audio_output


async def open_session(app, client=None):
    browser = SessionClient(app, client=client or a_client())
    accepted, code = await browser.connect()
    assert accepted, code
    await browser.receive_until("session.updated")
    return browser


async def ask(browser, text="Walk me through my failing test, please."):
    await browser.send_event(user_text(text))
    await browser.send_event({"type": "response.create"})


async def wait_for_ledger_close(timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions, records = await ledger()
        if sessions and all(s.ended_at for s in sessions):
            return sessions, records
        await asyncio.sleep(0.05)
    raise AssertionError("the session row was not closed")


async def test_status_after_every_response_and_exact_ledger(relay_app):
    browser = await open_session(relay_app)
    for _ in range(2):
        await ask(browser)
        events = await browser.receive_until("quota.status", timeout=15)
        done = [e for e in events if e["type"] == "response.done"]
        assert done, [e["type"] for e in events]
    status = events[-1]
    assert Decimal(status["session_cost_usd"]) > 0
    assert status["session_cap_usd"] == "5.00"
    assert 1700 < status["seconds_left"] <= 1800
    await browser.disconnect()
    sessions, records = await wait_for_ledger_close()
    assert len(sessions) == 1 and sessions[0].end_reason == "client_closed"
    responses = [r for r in records if r.kind == "response"]
    assert len(responses) == 2
    assert sessions[0].cost_usd == sum(r.cost_usd for r in records)
    assert Decimal(status["session_cost_usd"]) == sessions[0].cost_usd.normalize() or True
    assert format(sessions[0].cost_usd, "f").startswith(
        status["session_cost_usd"].rstrip("0").rstrip(".")
    )


@sync_to_async
def load_list_prices():
    from django.core.management import call_command

    call_command("quotas_load_prices", "list", "--effective-from", "2026-01-01")


@sync_to_async
def price_audio_output_only(audio_output=Decimal("64")):
    """gpt-realtime with (almost) free input: a test's cap is then a number of audio seconds."""
    from datetime import UTC, datetime

    cheap = Decimal("0.000001")
    ModelPrice.objects.create(
        model="gpt-realtime",
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
        text_input=cheap,
        cached_text_input=cheap,
        audio_input=cheap,
        cached_audio_input=cheap,
        text_output=audio_output,
        audio_output=audio_output,
    )


async def test_an_upstream_that_ignores_max_output_tokens_is_cut_off_in_flight(
    relay_app, simulator
):
    # The reservation bounds an answer by max_output_tokens (1 s of audio here); an upstream
    # that streams on regardless meets the second line: the in-flight cutoff.
    simulator.pace = 1.0  # real-time audio, as upstream streams it
    simulator.fault = "ignore_max_output_tokens"
    await price_audio_output_only()  # $64 per 1M audio tokens: $0.00128 per second
    one_second_of_audio = Decimal(20) * Decimal(64) / Decimal(1_000_000)
    cap = Decimal("0.005")  # about 3.9 s of audio; the answer would last 7.7 s
    await set_budget(session_cap_usd=cap, max_output_tokens_per_response=20)
    browser = await open_session(relay_app)
    await ask(browser, "Explain in detail why my recursive parser overflows the stack.")
    events = await browser.receive_until("websocket.close", timeout=20)
    kinds = [e["type"] for e in events]
    assert events[-1] == {"type": "websocket.close", "code": 4402}
    exceeded = [e for e in events if e["type"] == "quota.exceeded"]
    assert exceeded and exceeded[0]["reason"] == "budget"
    warnings = [e["reason"] for e in events if e["type"] == "quota.warning"]
    assert warnings == sorted(warnings)  # 50 before 80 before 95, each at most once
    assert len(warnings) == len(set(warnings))
    done = [e for e in events if e["type"] == "response.done"]
    assert done and done[0]["response"]["status"] == "cancelled"
    assert kinds.index("quota.exceeded") < len(kinds) - 1
    sessions, records = await wait_for_ledger_close()
    assert sessions[0].end_reason == "budget"
    assert sessions[0].cost_usd <= cap + one_second_of_audio
    # ... and not cut absurdly early: the projection errs high by about a second at most.
    assert sessions[0].cost_usd >= cap - 2 * one_second_of_audio
    assert sessions[0].cost_usd == sum(r.cost_usd for r in records)
    assert [r.estimated for r in records] == [False]
    assert records[0].audio_output > 20  # streamed past the bound: the cutoff stopped it
    assert simulator.recorder.cancelled == 1


async def test_the_server_bounds_every_answer_by_max_output_tokens(relay_app, simulator):
    await set_budget(max_output_tokens_per_response=40)  # two seconds of audio
    browser = await open_session(relay_app)
    first = simulator.recorder.client_events[0].event
    assert first["type"] == "session.update"
    assert first["session"]["max_output_tokens"] == 40
    await ask(browser, "Explain in detail why my recursive parser overflows the stack.")
    events = await browser.receive_until("quota.status", timeout=15)
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"]["reason"] == "max_output_tokens"
    assert done["usage"]["output_tokens"] <= 40
    await browser.disconnect()


async def test_a_response_that_cannot_fit_is_never_started(relay_app, simulator):
    # The conversation alone (instructions, tools, question) costs more than this cap: the
    # relay refuses to start the answer, because upstream would bill its input at once.
    await set_budget(session_cap_usd=Decimal("0.001"))
    browser = await open_session(relay_app)
    await ask(browser)
    events = await browser.receive_until("websocket.close", timeout=15)
    assert events[-1]["code"] == 4402
    assert [e["reason"] for e in events if e["type"] == "quota.exceeded"] == ["budget"]
    assert not [e for e in events if e["type"] == "response.created"]
    sent = [r.event["type"] for r in simulator.recorder.client_events]
    assert "response.create" not in sent
    sessions, records = await wait_for_ledger_close()
    assert sessions[0].end_reason == "budget" and records == []


async def test_spoken_turns_are_answered_only_within_budget(relay_app, simulator):
    from ducke.realtime.synth import silence_pcm, speech_like_pcm
    from tests.fixtures.relay import pcm_event

    simulator.pace = 0.5  # answers stream at twice real time; the cancel still wins the race
    await load_list_prices()
    await set_budget(session_cap_usd=Decimal("0.012"))
    browser = await open_session(relay_app)
    turns = 0
    while True:
        pcm = speech_like_pcm(1.2, seed=turns) + silence_pcm(0.8)
        for start in range(0, len(pcm), 4800):
            await browser.send_event(pcm_event(pcm[start : start + 4800]))
        events = await browser.receive_until("quota.status", timeout=15)
        if events[-1]["type"] == "websocket.close":
            break
        while not any(e["type"] == "response.done" for e in events):
            events += await browser.receive_until("quota.status", timeout=15)
        turns += 1
        assert turns < 20, "the budget never ran out"
    sessions, records = await wait_for_ledger_close()
    one_second_of_audio = Decimal(20) * await audio_output_price() / Decimal(1_000_000)
    assert sessions[0].end_reason == "budget"
    assert sessions[0].cost_usd <= Decimal("0.012") + one_second_of_audio
    assert len([r for r in records if r.kind == "response"]) == turns


async def test_duration_cap_closes_at_the_cap_with_4408(relay_app):
    await set_budget(session_max_seconds=2)
    started = time.monotonic()
    browser = await open_session(relay_app)
    events = await browser.receive_until("websocket.close", timeout=10)
    elapsed = time.monotonic() - started
    assert events[-1] == {"type": "websocket.close", "code": 4408}
    assert [e["reason"] for e in events if e["type"] == "quota.exceeded"] == ["duration"]
    assert 1.9 <= elapsed < 3.0
    sessions, _ = await wait_for_ledger_close()
    assert sessions[0].end_reason == "duration"


async def test_disconnect_mid_response_still_books_it(relay_app, simulator):
    simulator.pace = 1.0
    browser = await open_session(relay_app)
    await ask(browser)
    await browser.receive_until("response.output_audio.delta", timeout=10)
    await browser.disconnect()
    sessions, records = await wait_for_ledger_close()
    assert [r.kind for r in records] == ["response"]
    assert records[0].response_id == simulator.recorder.responses[0].event["id"]
    assert records[0].audio_output > 0
    assert sessions[0].end_reason == "client_closed"


async def test_breaker_trip_ends_every_session_and_refuses_new_ones(relay_app):
    # The hourly cap (checked by every reservation) would stop this spend first; with it out
    # of the way, the breaker is the line that ends every session.
    await set_budget(hourly_cap_usd=Decimal("1000"), breaker_threshold_usd=Decimal("0.002"))
    talker = await open_session(relay_app)
    bystander = await open_session(relay_app)
    await ask(talker)
    talker_events = await talker.receive_until("websocket.close", timeout=15)
    bystander_events = await bystander.receive_until("websocket.close", timeout=15)
    for events in (talker_events, bystander_events):
        assert events[-1] == {"type": "websocket.close", "code": 4503}
        assert [e["reason"] for e in events if e["type"] == "quota.exceeded"] == ["breaker"]
    newcomer = SessionClient(relay_app, client=a_client())
    assert (await newcomer.connect())[0]
    refusal = await newcomer.next_message()
    assert refusal["type"] == "quota.exceeded" and refusal["reason"] == "breaker"
    assert refusal["retry_after"] > 0
    assert (await newcomer.next_message())["code"] == 4503
    assert spend_counters().breaker_state() == "open"


async def test_hourly_cap_refuses_new_sessions_and_new_answers(relay_app, simulator):
    running = await open_session(relay_app)
    await ask(running)
    events = await running.receive_until("quota.status", timeout=15)
    assert not [e for e in events if e["type"] in ("quota.exceeded", "websocket.close")]
    _, records = await ledger()
    await set_budget(hourly_cap_usd=sum(r.cost_usd for r in records))  # the hour is spent
    newcomer = SessionClient(relay_app, client=a_client())
    assert (await newcomer.connect())[0]
    refusal = await newcomer.next_message()
    assert refusal["reason"] == "hourly_cap" and 3500 < refusal["retry_after"] <= 3600
    assert (await newcomer.next_message())["code"] == 4503
    # The running session's next answer is reserved against the hour too: not started.
    await asyncio.sleep(0.6)  # the policy edit is live within QUOTAS_POLICY_REFRESH_SECONDS
    created_before = len(simulator.recorder.responses)
    await ask(running, "And what about the second bug?")
    more = await running.receive_until("websocket.close", timeout=15)
    assert more[-1] == {"type": "websocket.close", "code": 4503}
    assert [e["reason"] for e in more if e["type"] == "quota.exceeded"] == ["hourly_cap"]
    assert len(simulator.recorder.responses) == created_before


async def test_next_question_right_after_an_answer_waits_for_its_booking(relay_app, simulator):
    # The browser sees response.done before the relay has booked it; a question sent at once
    # must be checked against the booked spend, not the spend before that answer.
    simulator.pace = 0.25  # four times real time
    cap = Decimal("0.20")  # fresh-install prices: each turn re-bills ~$0.07 of conversation
    await set_budget(session_cap_usd=cap)
    browser = await open_session(relay_app)
    for _ in range(10):
        await ask(browser)
        events = await browser.receive_until("response.done", timeout=20)
        if events[-1]["type"] == "websocket.close":
            break
    else:
        raise AssertionError("the budget never ran out")
    sessions, _ = await wait_for_ledger_close()
    one_second_of_audio = Decimal(20) * await audio_output_price() / Decimal(1_000_000)
    assert sessions[0].end_reason == "budget"
    assert sessions[0].cost_usd <= cap + one_second_of_audio


async def test_an_overrunning_answer_is_cut_off_at_the_clients_spend_limit(relay_app, simulator):
    from quotas.models import SpendLimit

    simulator.pace = 1.0
    simulator.fault = "ignore_max_output_tokens"
    await price_audio_output_only()
    one_second_of_audio = Decimal(20) * Decimal(64) / Decimal(1_000_000)
    cap = Decimal("0.005")  # about 3.9 s of audio
    await sync_to_async(SpendLimit.objects.filter(name="client-hour").update)(cap_usd=cap)
    await set_budget(max_output_tokens_per_response=20)
    browser = await open_session(relay_app)
    await ask(browser, "Explain in detail why my recursive parser overflows the stack.")
    events = await browser.receive_until("websocket.close", timeout=20)
    assert events[-1] == {"type": "websocket.close", "code": 4402}
    assert [e["reason"] for e in events if e["type"] == "quota.exceeded"] == ["client_budget"]
    done = [e for e in events if e["type"] == "response.done"]
    assert done and done[0]["response"]["status"] == "cancelled"
    sessions, _ = await wait_for_ledger_close()
    assert sessions[0].end_reason == "client_budget"
    assert cap - 2 * one_second_of_audio <= sessions[0].cost_usd <= cap + one_second_of_audio
