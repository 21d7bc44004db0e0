"""Bookings off the upstream read path: the stream goes on while a response is settled, and
the next reservation and the session's end wait for the settlement."""

import asyncio
import time
import uuid

import pytest
from asgiref.sync import sync_to_async

from quotas.models import QuotaSession, UsageRecord
from quotas.realtime.meter import SessionMeter
from tests.fixtures.relay import SessionClient, user_text

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("close_worker_connections"),
]


def a_client():
    return f"10.7.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


@pytest.fixture
def held_bookings(monkeypatch):
    """Response bookings wait for ``gate``; ``log`` records reservations and settlements."""
    gate = asyncio.Event()
    log = []
    charge, reserve = SessionMeter.charge_response, SessionMeter.reserve_response

    async def held_charge(self, *args, **kwargs):
        await gate.wait()
        outcome = await charge(self, *args, **kwargs)
        log.append("settled")
        return outcome

    async def logged_reserve(self):
        log.append("reserve")
        return await reserve(self)

    monkeypatch.setattr(SessionMeter, "charge_response", held_charge)
    monkeypatch.setattr(SessionMeter, "reserve_response", logged_reserve)
    return gate, log


async def open_session(app):
    browser = SessionClient(app, client=a_client())
    accepted, code = await browser.connect()
    assert accepted, code
    await browser.receive_until("session.updated")
    return browser


async def answered(browser, text="Why does my test only fail on CI?"):
    await browser.send_event(user_text(text))
    await browser.send_event({"type": "response.create"})
    return await browser.receive_until("response.done", timeout=15)


@sync_to_async
def ledger():
    return list(QuotaSession.objects.all()), list(UsageRecord.objects.filter(kind="response"))


async def test_a_slow_booking_does_not_hold_up_the_next_events(relay_app, held_bookings):
    gate, log = held_bookings
    browser = await open_session(relay_app)
    await answered(browser)
    # The booking is held; what upstream sends next still reaches the browser at once.
    await browser.send_event(user_text("One more detail."))
    events = await browser.receive_until("conversation.item.done", timeout=5)
    kinds = [e["type"] for e in events]
    assert "conversation.item.added" in kinds and "quota.status" not in kinds
    assert log == ["reserve"]
    gate.set()
    status = await browser.receive_until("quota.status", timeout=10)
    assert status[-1]["type"] == "quota.status" and log == ["reserve", "settled"]
    await browser.disconnect()


async def test_the_next_reservation_waits_for_the_settlement(relay_app, simulator, held_bookings):
    gate, log = held_bookings
    browser = await open_session(relay_app)
    await answered(browser)
    # After response.done, a new request waits for the settlement instead of being refused,
    # and it is not reserved (nor sent upstream) before the settlement is over.
    await browser.send_event({"type": "response.create"})
    await browser.send_event(user_text("While you book that."))
    events = await browser.receive_until("conversation.item.done", timeout=5)
    assert "error" not in [e["type"] for e in events]
    assert log == ["reserve"]
    creates = [r for r in simulator.recorder.client_events if r.event["type"] == "response.create"]
    assert len(creates) == 1
    gate.set()
    events = await browser.receive_until("response.done", timeout=15)
    kinds = [e["type"] for e in events]
    assert kinds.index("quota.status") < kinds.index("response.created")
    assert log[:3] == ["reserve", "settled", "reserve"]
    await browser.disconnect()
    _, records = await ledger()
    assert len(records) == 2


async def test_the_session_end_waits_for_the_settlement(relay_app, held_bookings):
    gate, log = held_bookings
    browser = await open_session(relay_app)
    await answered(browser)
    leaving = asyncio.ensure_future(browser.disconnect())
    await asyncio.sleep(0.2)
    assert not leaving.done()  # the ledger is not closed under a running settlement
    gate.set()
    await asyncio.wait_for(leaving, 10)
    sessions, records = await ledger()
    assert log == ["reserve", "settled"]
    assert sessions[0].ended_at is not None and sessions[0].end_reason == "client_closed"
    assert len(records) == 1 and not records[0].estimated
    assert sessions[0].cost_usd == records[0].cost_usd


async def test_the_session_end_waits_a_bounded_time(relay_app, held_bookings, monkeypatch):
    monkeypatch.setattr("ducke.consumers.DRAIN_SECONDS", 0.3)
    _, log = held_bookings
    browser = await open_session(relay_app)
    await answered(browser)
    started = time.monotonic()
    await browser.disconnect()  # the booking never finishes: the session ends anyway
    assert time.monotonic() - started < 5
    sessions, _ = await ledger()
    assert sessions[0].ended_at is not None and log == ["reserve"]
