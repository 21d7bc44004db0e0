"""The relay's response lifecycle, transition by transition, without a socket."""

import asyncio

import pytest

from ducke.response_lifecycle import (
    IDLE,
    REQUESTED,
    RESERVING,
    SETTLING,
    STREAMING,
    LifecycleError,
    ResponseLifecycle,
)


def streaming(response_id="resp_1"):
    life = ResponseLifecycle()
    life.reserve()
    life.request()
    life.created(response_id)
    return life


def test_a_response_from_reservation_to_settlement():
    life = ResponseLifecycle()
    assert life.state == IDLE and life.idle and not life.running
    life.reserve()
    assert life.state == RESERVING and life.running and not life.idle
    assert not life.awaiting_upstream
    assert life.request() == "ducke_create_1"
    assert life.state == REQUESTED and life.requested and life.awaiting_upstream
    assert life.create_event_id == "ducke_create_1" and life.answering is None
    life.created("resp_1")
    assert life.state == STREAMING and life.answering == "resp_1"
    assert life.create_event_id is None and not life.requested
    life.done()
    # Over for the browser (a new request waits instead of being refused), not yet idle:
    # the next reservation waits for the settlement; tool results still wait too.
    assert life.state == SETTLING and not life.running and not life.idle
    assert life.answering == "resp_1" and not life.awaiting_upstream
    life.settled()
    assert life.state == IDLE and life.idle and life.answering is None


def test_every_request_gets_its_own_event_id():
    life = ResponseLifecycle()
    ids = []
    for _ in range(3):
        life.reserve()
        ids.append(life.request())
        life.created("r")
        life.done()
        life.settled()
    assert ids == ["ducke_create_1", "ducke_create_2", "ducke_create_3"]


def test_only_an_idle_lifecycle_reserves():
    life = streaming()
    with pytest.raises(LifecycleError):
        life.reserve()
    life.done()
    with pytest.raises(LifecycleError):
        life.reserve()


def test_a_refused_reservation_or_request_starts_nothing():
    life = ResponseLifecycle()
    life.reserve()
    life.not_started()
    assert life.idle and life.create_event_id is None
    life.reserve()
    life.request()
    life.not_started()  # upstream refused the response.create
    assert life.idle and life.create_event_id is None
    streaming_life = streaming()
    streaming_life.not_started()  # only an unstarted response can be given up this way
    assert streaming_life.state == STREAMING


def test_a_lost_upstream_owes_nothing_but_a_settlement_goes_on():
    life = streaming()
    life.upstream_lost()
    assert life.idle and life.answering is None
    life = streaming()
    life.done()
    life.upstream_lost()
    assert life.state == SETTLING
    life.settled()
    assert life.idle
    life = ResponseLifecycle()
    life.reserve()
    life.upstream_lost()
    assert life.idle and life.request() is None  # abandoned: nothing to send


def test_a_stray_done_during_a_reservation_is_settled_apart():
    life = ResponseLifecycle()
    life.reserve()
    life.done()
    assert life.state == RESERVING and life.settlements == 1
    life.request()
    life.created("resp_2")
    life.settled()  # the stray one's booking
    assert life.state == STREAMING
    life.done()
    life.settled()
    assert life.idle


def test_two_dones_settle_in_turn():
    life = streaming()
    life.done()
    life.done()
    life.settled()
    assert life.state == SETTLING
    life.settled()
    assert life.idle
    life.settled()  # one too many changes nothing
    assert life.idle and life.settlements == 0


def test_a_pending_booking_keeps_the_next_reservation_waiting():
    life = streaming()
    life.booking_queued()  # an input transcription, booked while the answer streams
    life.done()
    life.settled()
    assert life.state == IDLE and not life.idle and not life.running
    life.booking_done()
    assert life.idle
    life = ResponseLifecycle()
    life.booking_queued()
    assert not life.idle
    life.booking_done()
    life.booking_done()  # one too many changes nothing
    assert life.idle and life.bookings == 0


async def test_wait_idle_returns_once_the_bookings_are_done():
    life = ResponseLifecycle()
    life.booking_queued()
    waiter = asyncio.ensure_future(life.wait_idle())
    await asyncio.sleep(0)
    assert not waiter.done()
    life.booking_done()
    await asyncio.wait_for(waiter, 1)


def test_create_waiting_once():
    life = streaming()
    assert life.wait_to_create() is True
    assert life.wait_to_create() is False
    assert life.create_waiting
    life.stop_waiting()
    assert not life.create_waiting and life.wait_to_create() is True


def test_tools_running_counts_calls():
    life = ResponseLifecycle()
    life.tool_started()
    life.tool_started()
    assert life.tools_running == 2
    life.tool_finished()
    life.tool_finished()
    life.tool_finished()
    assert life.tools_running == 0


def test_cutoff_is_decided_once():
    life = streaming()
    assert life.cut_off("budget") is True
    assert life.cut_off("breaker") is False
    assert life.cutoff == "budget"


def test_closing_and_finishing():
    life = ResponseLifecycle()
    assert not life.closing and not life.finished
    life.close()
    assert life.closing
    assert life.finish() is True
    assert life.finish() is False and life.finished


async def test_wait_idle_returns_at_the_settlement():
    life = streaming()
    life.done()
    waiter = asyncio.ensure_future(life.wait_idle())
    await asyncio.sleep(0)
    assert not waiter.done()
    life.settled()
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(ResponseLifecycle().wait_idle(), 1)  # idle from the start
