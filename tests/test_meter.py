"""SessionMeter: warnings, caps, projection, exactly-once booking, ledger totals, admin."""

import asyncio
from decimal import Decimal

import pytest
from channels.layers import get_channel_layer
from django.core.management import call_command
from django.db.models import Sum

from quotas import spend as spend_module
from quotas.defaults import SHEET_EPOCH
from quotas.metrics import active_sessions_total, api_cost_total_usd, budget_exceeded_total
from quotas.models import ModelPrice, QuotaSession, UsageRecord
from quotas.policies import BudgetSpec
from quotas.pricing import TOKEN_KINDS, timestamp_to_datetime
from quotas.realtime.meter import SessionMeter, admit_new_session, format_usd
from quotas.realtime.prices import load_price_sheet
from quotas.realtime.usage import usage_token_counts
from quotas.redis_client import SharedRedis
from quotas.spend import BREAKER_EVENT, BREAKER_GROUP, SpendCounters
from quotas.testing import aread

T0 = 1_800_000_000.0
PER_M = Decimal(1_000_000)
# Fresh-install sheet: gpt-realtime costs 100 $/1M for every input kind, 200 $/1M for output.
IN_RATE, OUT_RATE = Decimal(100), Decimal(200)
ONE_SECOND_OF_OUTPUT = 20 * OUT_RATE / PER_M  # 20 audio tokens per second of output: $0.004
DELTA_BYTES = 4_800  # 0.1 s of pcm16 at 24 kHz


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def fresh_spend_counters():
    spend_module.reset_spend_counters()
    yield
    spend_module.reset_spend_counters()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def price_sheet(django_db_blocker):
    """The fresh-install price sheet (transactional tests flush the migration's rows)."""
    with django_db_blocker.unblock():
        load_price_sheet(ModelPrice, "default", SHEET_EPOCH)


@pytest.fixture
def make_meter(clock, no_redis, price_sheet):
    """Meters sharing one in-process counter set, on the injected clock."""
    counters = SpendCounters(None, timer=clock)

    async def factory(budget, model="gpt-realtime", client="10.1.1.1"):
        meter = SessionMeter(client, model, budget, timer=clock, counters=counters)
        await meter.open()
        return meter

    factory.counters = counters
    return factory


def text_usage(input_tokens, output_tokens=0):
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0},
        "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
    }


def audio_usage(input_audio, output_audio):
    return {
        "input_tokens": input_audio,
        "output_tokens": output_audio,
        "input_token_details": {"text_tokens": 0, "audio_tokens": input_audio},
        "output_token_details": {"text_tokens": 0, "audio_tokens": output_audio},
    }


def done(response_id, usage):
    return {"type": "response.done", "response": {"id": response_id, "usage": usage}}


CENTS_BUDGET = BudgetSpec(session_cap_usd=Decimal("0.10"))


@pytest.mark.django_db(transaction=True)
async def test_warnings_in_order_once_each_then_exceeded_4402(make_meter):
    meter = await make_meter(CENTS_BUDGET)
    before = budget_exceeded_total.labels(reason="budget")._value.get()
    # 500 text tokens x 100 $/1M = $0.05 (50 %).
    first = await meter.charge_response(done("r1", text_usage(500)))
    assert first.cost == Decimal("0.05") and first.session_cost == Decimal("0.05")
    assert [w["reason"] for w in first.warnings] == ["budget_50"]
    assert first.warnings[0]["type"] == "quota.warning"
    assert first.exceeded is None and first.close_code is None
    second = await meter.charge_response(done("r2", text_usage(300)))  # $0.08 (80 %)
    assert [w["reason"] for w in second.warnings] == ["budget_80"]
    third = await meter.charge_response(done("r3", text_usage(150)))  # $0.095 (95 %)
    assert [w["reason"] for w in third.warnings] == ["budget_95"]
    assert third.close_code is None
    fourth = await meter.charge_response(done("r4", text_usage(100)))  # $0.105
    assert fourth.warnings == []
    assert fourth.exceeded["type"] == "quota.exceeded"
    assert fourth.exceeded["reason"] == "budget" and fourth.close_code == 4402
    assert budget_exceeded_total.labels(reason="budget")._value.get() == before + 1
    status = meter.status()
    assert status == {
        "type": "quota.status",
        "session_cost_usd": "0.105",
        "session_cap_usd": "0.10",
        "seconds_left": 1800,
        "limit_name": "session",
        "limit_left_usd": "0.00",
    }


@pytest.mark.django_db(transaction=True)
async def test_one_big_charge_gives_all_warnings_in_order(make_meter):
    meter = await make_meter(CENTS_BUDGET)
    outcome = await meter.charge_response(done("r1", text_usage(960)))  # 96 %
    assert [w["reason"] for w in outcome.warnings] == ["budget_50", "budget_80", "budget_95"]
    again = await meter.charge_response(done("r2", text_usage(1)))
    assert again.warnings == []


@pytest.mark.django_db(transaction=True)
async def test_projection_cancels_within_one_second_of_output_audio(make_meter):
    budget = BudgetSpec(session_cap_usd=Decimal("0.05"))
    meter = await make_meter(budget)
    # Turn 1: 3 s of user audio (30 tokens), a 2 s answer (40 tokens), booked normally.
    meter.note_input_audio(3 * 48_000)
    for _ in range(20):
        assert meter.note_output_audio("r1", DELTA_BYTES) is None
    booked = await meter.charge_response(done("r1", audio_usage(30, 40)))
    assert booked.cost == (30 * IN_RATE + 40 * OUT_RATE) / PER_M  # $0.011
    # Turn 2: 2 s more user audio; the whole conversation (30 + 40 + 20 tokens) is input.
    meter.note_input_audio(2 * 48_000)
    input_cost = 90 * IN_RATE / PER_M  # $0.009
    streamed = 0
    signal = None
    while signal is None:
        streamed += DELTA_BYTES
        signal = meter.note_output_audio("r2", DELTA_BYTES)
        assert streamed < 48_000 * 60, "the projection never fired"
    assert signal == "budget"
    spent_at_signal = booked.cost + input_cost + Decimal(streamed) / 2_400 * OUT_RATE / PER_M
    assert spent_at_signal < budget.session_cap_usd  # fired before the cap was passed
    one_delta = Decimal(DELTA_BYTES) / 2_400 * OUT_RATE / PER_M
    # ... and not earlier than needed: one more second (plus a delta) would have passed it.
    assert spent_at_signal + ONE_SECOND_OF_OUTPUT + one_delta > budget.session_cap_usd
    # Worst case, upstream takes a full second to stop after response.cancel.
    for _ in range(10):
        assert meter.note_output_audio("r2", DELTA_BYTES) is None  # signalled once per response
        streamed += DELTA_BYTES
    final = await meter.charge_response(done("r2", audio_usage(90, streamed // 2_400)))
    assert final.session_cost == spent_at_signal + ONE_SECOND_OF_OUTPUT
    assert final.session_cost <= budget.session_cap_usd + ONE_SECOND_OF_OUTPUT
    assert final.session_cost > budget.session_cap_usd - 2 * ONE_SECOND_OF_OUTPUT


@pytest.mark.django_db(transaction=True)
async def test_replayed_response_done_is_booked_once(make_meter):
    meter = await make_meter(BudgetSpec())
    event = done("resp_same", audio_usage(100, 50))
    first = await meter.charge_response(event)
    replay = await meter.charge_response(event)
    assert first.booked and not replay.booked
    assert replay.cost == 0 and replay.session_cost == first.session_cost
    # Two deliveries racing each other: still one row.
    twins = await asyncio.gather(
        meter.charge_response(done("resp_twin", audio_usage(10, 10))),
        meter.charge_response(done("resp_twin", audio_usage(10, 10))),
    )
    assert sorted(o.booked for o in twins) == [False, True]
    assert await UsageRecord.objects.acount() == 2
    hour = await aread(make_meter.counters, BudgetSpec(), None)
    session = await QuotaSession.objects.aget(pk=meter.session_id)
    assert hour.hour_usd == session.cost_usd  # the replay charged nothing either


def _tokens(row):
    return {kind: getattr(row, kind) for kind in TOKEN_KINDS}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_settlement_replaces_its_provisional_record_in_place_once(make_meter, clock):
    meter = await make_meter(BudgetSpec())
    meter.note_input_text("What does a settlement write?")
    assert (await meter.reserve_response()).allowed
    hold = meter.reservation
    provisional = await UsageRecord.objects.aget(pk=hold.record_id)
    assert provisional.estimated and provisional.kind == "response"
    assert provisional.response_id == hold.reference and provisional.cost_usd == hold.cost
    assert _tokens(provisional) == hold.counts.as_dict()
    assert provisional.created_at == timestamp_to_datetime(T0)
    session = await QuotaSession.objects.aget(pk=meter.session_id)
    assert session.cost_usd == hold.cost and _tokens(session) == _tokens(provisional)
    clock.now = T0 + 5
    # 120 audio tokens in x $100/1M + 60 out x $200/1M = $0.024
    settled = await meter.charge_response(done("resp_1", audio_usage(120, 60)))
    assert settled.booked and settled.cost == Decimal("0.024")
    (record,) = [row async for row in UsageRecord.objects.all()]
    assert record.pk == hold.record_id and not record.estimated and not record.unknown_model
    assert record.response_id == "resp_1" and record.cost_usd == Decimal("0.024")
    assert _tokens(record) == {
        **dict.fromkeys(TOKEN_KINDS, 0),
        "audio_input": 120,
        "audio_output": 60,
    }
    assert record.created_at == timestamp_to_datetime(T0 + 5)
    session = await QuotaSession.objects.aget(pk=meter.session_id)
    assert session.cost_usd == Decimal("0.024") and _tokens(session) == _tokens(record)
    # The same settlement again, and the same response.done again: nothing changes.
    rows = [row async for row in UsageRecord.objects.values()]
    again = await meter._settle_provisional(
        hold, "resp_1", lambda rates: usage_token_counts(audio_usage(999, 999), rates), T0 + 9
    )
    replay = await meter.charge_response(done("resp_1", audio_usage(120, 60)))
    assert again is None and not replay.booked
    assert [row async for row in UsageRecord.objects.values()] == rows
    unchanged = await QuotaSession.objects.aget(pk=meter.session_id)
    assert unchanged.cost_usd == Decimal("0.024") and _tokens(unchanged) == _tokens(record)
    hour = await aread(make_meter.counters, BudgetSpec())
    assert hour.hour_usd == Decimal("0.024")  # the hold was replaced, the replay added nothing


@pytest.mark.django_db(transaction=True)
async def test_ledger_totals_equal_the_sum_of_usage_records(make_meter, clock):
    meter = await make_meter(BudgetSpec())
    model_label = api_cost_total_usd.labels(model="gpt-realtime")
    cost_before = model_label._value.get()
    await meter.charge_response(done("r1", audio_usage(120, 60)))
    detailed = {
        "input_tokens": 500,
        "output_tokens": 70,
        "input_token_details": {
            "text_tokens": 200,
            "audio_tokens": 300,
            "cached_tokens": 150,
            "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 100},
        },
        "output_token_details": {"text_tokens": 20, "audio_tokens": 50},
    }
    await meter.charge_response(done("r2", detailed))
    await meter.charge_transcription("item_1", {"type": "duration", "seconds": 3.2}, "whisper-x")
    await meter.charge_tool("call_1", "gpt-5-mini", 1000, 200, 80)
    clock.now += 95
    await meter.close("client_closed")
    session = await QuotaSession.objects.aget(pk=meter.session_id)
    sums = await UsageRecord.objects.filter(session=session).aaggregate(
        cost=Sum("cost_usd"), **{kind: Sum(kind) for kind in TOKEN_KINDS}
    )
    assert session.cost_usd == sums["cost"] > 0
    for kind in TOKEN_KINDS:
        assert getattr(session, kind) == sums[kind], kind
    assert session.cached_audio_input == 100 and session.cached_text_input == 50 + 200
    kinds = {r.response_id: r.kind async for r in UsageRecord.objects.all()}
    assert kinds == {"r1": "response", "r2": "response", "item_1": "transcription",
                     "call_1": "tool"}  # fmt: skip
    assert (await UsageRecord.objects.aget(response_id="item_1")).unknown_model
    assert session.end_reason == "client_closed"
    assert (session.ended_at - session.started_at).total_seconds() == 95
    response_costs = await UsageRecord.objects.filter(model="gpt-realtime").aaggregate(
        total=Sum("cost_usd")
    )
    assert model_label._value.get() == pytest.approx(cost_before + float(response_costs["total"]))


@pytest.mark.django_db(transaction=True)
async def test_close_is_idempotent_and_tracks_active_sessions(make_meter, clock):
    before = active_sessions_total._value.get()
    meter = await make_meter(BudgetSpec())
    assert active_sessions_total._value.get() == before + 1
    await meter.close("budget")
    ended = (await QuotaSession.objects.aget(pk=meter.session_id)).ended_at
    clock.now += 60
    await meter.close("client_closed")
    session = await QuotaSession.objects.aget(pk=meter.session_id)
    assert session.end_reason == "budget" and session.ended_at == ended
    assert active_sessions_total._value.get() == before


@pytest.mark.django_db(transaction=True)
async def test_duration_warnings_and_cap(make_meter, clock):
    meter = await make_meter(BudgetSpec(session_max_seconds=600))
    assert meter.duration_events().warnings == []
    clock.now = T0 + 299
    assert meter.duration_events().warnings == []
    clock.now = T0 + 300
    check = meter.duration_events()
    assert [w["reason"] for w in check.warnings] == ["duration_5min"]
    assert meter.status()["seconds_left"] == 300
    assert meter.duration_events().warnings == []
    clock.now = T0 + 540
    check = meter.duration_events()
    assert [w["reason"] for w in check.warnings] == ["duration_1min"]
    assert check.close_code is None
    clock.now = T0 + 600
    check = meter.duration_events()
    assert check.exceeded["reason"] == "duration" and check.close_code == 4408
    assert meter.status()["seconds_left"] == 0


@pytest.mark.django_db(transaction=True)
async def test_hourly_cap_passed_keeps_running_session_but_refuses_new_ones(make_meter):
    budget = BudgetSpec(hourly_cap_usd=Decimal("0.05"), breaker_threshold_usd=Decimal("1"))
    meter = await make_meter(budget)
    outcome = await meter.charge_response(done("r1", text_usage(600)))  # $0.06
    assert outcome.hourly_cap_reached
    assert outcome.exceeded is None and outcome.close_code is None
    admission = await admit_new_session(budget, counters=make_meter.counters)
    assert not admission.allowed and admission.reason == "hourly_cap"
    assert admission.retry_after == 3600


@pytest.mark.django_db(transaction=True)
async def test_breaker_trips_via_one_instance_and_ends_sessions_on_the_other(
    redis_url, redis_prefix, clock, settings, price_sheet
):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    budget = BudgetSpec(hourly_cap_usd=Decimal("0.05"), breaker_threshold_usd=Decimal("0.10"))

    def instance():
        link = SharedRedis(redis_url)
        return SpendCounters(link, timer=clock, prefix=redis_prefix, ledger=False)

    a = SessionMeter("10.0.0.1", "gpt-realtime", budget, timer=clock, counters=instance())
    b = SessionMeter("10.0.0.2", "gpt-realtime", budget, timer=clock, counters=instance())
    await a.open()
    await b.open()
    layer = get_channel_layer()
    listener = await layer.new_channel()
    await layer.group_add(BREAKER_GROUP, listener)
    first = await b.charge_response(done("b1", text_usage(400)))  # $0.04
    assert first.close_code is None
    tripping = await a.charge_response(done("a1", text_usage(600)))  # hour $0.10
    assert tripping.breaker_tripped and tripping.close_code == 4503
    assert tripping.exceeded["reason"] == "breaker" and tripping.exceeded["retry_after"] == 3600
    notice = await asyncio.wait_for(layer.receive(listener), timeout=2)
    assert notice["type"] == BREAKER_EVENT and notice["retry_after"] == 3600
    seen = await b.charge_response(done("b2", text_usage(1)))
    assert seen.close_code == 4503 and not seen.breaker_tripped
    admission = await admit_new_session(budget, counters=b.counters)
    assert admission.reason == "breaker"
    # The projection also cancels a response that would carry the hour past the threshold.
    c_budget = BudgetSpec(session_cap_usd=Decimal("5"), breaker_threshold_usd=Decimal("0.11"))
    c = SessionMeter("10.0.0.3", "gpt-realtime", c_budget, timer=clock, counters=b.counters)
    await c.open()
    c._hour_usd = seen.session_cost + tripping.session_cost  # as its last charge would report
    signals = {c.note_output_audio("c1", DELTA_BYTES) for _ in range(30)}
    assert "breaker" in signals


@pytest.mark.django_db(transaction=True)
def test_ledger_admin_is_view_only(admin_client, price_sheet):
    from asgiref.sync import async_to_sync

    meter = SessionMeter("10.9.9.9", "gpt-realtime", BudgetSpec(), counters=SpendCounters(None))
    async_to_sync(meter.open)()
    async_to_sync(meter.charge_response)(done("r1", text_usage(10)))
    record = UsageRecord.objects.get()
    for name, pk in (("quotasession", meter.session_id), ("usagerecord", record.pk)):
        base = f"/admin/quotas/{name}/"
        listing = admin_client.get(base)
        assert listing.status_code == 200
        assert listing.context["cl"].result_count == 1
        assert admin_client.get(f"{base}add/").status_code == 403
        assert admin_client.get(f"{base}{pk}/change/").status_code == 200  # view page
        assert admin_client.post(f"{base}{pk}/change/", {}).status_code == 403
        assert admin_client.get(f"{base}{pk}/delete/").status_code == 403
    session_page = admin_client.get(f"/admin/quotas/quotasession/{meter.session_id}/change/")
    assert b"r1" in session_page.content  # usage records inline
    assert admin_client.get("/admin/quotas/usagerecord/?q=r1").context["cl"].result_count == 1
    assert QuotaSession.objects.count() == 1 and UsageRecord.objects.count() == 1


def test_money_format():
    assert format_usd(Decimal("0.0123")) == "0.0123"
    assert format_usd(Decimal("5")) == "5.00"
    assert format_usd(Decimal("0.000001")) == "0.000001"
    assert format_usd(Decimal("12.5")) == "12.50"


@pytest.mark.django_db
def test_no_missing_migrations():
    call_command("makemigrations", "quotas", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
async def test_input_sent_while_a_response_runs_is_reserved_with_the_next_one(make_meter):
    from quotas.realtime.text_tokens import text_token_bound
    from quotas.realtime.usage import TokenCounts

    budget = BudgetSpec(session_cap_usd=Decimal("5.00"), max_output_tokens_per_response=10)
    meter = await make_meter(budget)
    meter.note_input_text("word " * 100)
    assert (await meter.reserve_response()).allowed
    meter.note_response_started("r1")
    # Typed (and spoken) while r1 streams: not in r1's usage, billed by the next response.
    typed = "word " * 1600
    meter.note_input_text(typed)
    meter.note_input_audio(2 * 48_000)  # 2 s: 20 tokens
    await meter.charge_response(done("r1", text_usage(100, 10)))
    later = text_token_bound(typed)
    assert meter.worst_case() == TokenCounts(text_input=110 + later, audio_input=20, text_output=10)
    assert (await meter.reserve_response()).allowed
    await meter.charge_response(done("r2", text_usage(110 + later, 10)))
    assert meter.worst_case() == TokenCounts(text_input=120 + later, text_output=10)


@pytest.mark.django_db(transaction=True)
async def test_a_reservation_holds_the_worst_case_and_refuses_what_cannot_fit(make_meter):
    from quotas.models import UsageRecord
    from quotas.realtime.usage import TokenCounts

    budget = BudgetSpec(session_cap_usd=Decimal("0.05"), max_output_tokens_per_response=10)
    meter = await make_meter(budget)
    meter.note_input_audio(3 * 48_000)  # 3 s of user audio: 30 tokens
    assert (await meter.reserve_response()).allowed
    held = meter.reservation
    # The input it re-bills, plus max_output_tokens at the dearest output kind.
    assert held.counts == TokenCounts(audio_input=30, text_output=10)
    assert held.cost == Decimal("0.005")  # 30 x $100/1M + 10 x $200/1M
    provisional = await UsageRecord.objects.aget(session_id=meter.session_id)
    assert provisional.estimated and provisional.cost_usd == held.cost
    # Turn 1 settled at its exact usage: the provisional row becomes the exact one.
    booked = await meter.charge_response(done("r1", audio_usage(30, 40)))
    assert booked.session_cost == Decimal("0.011") and meter.reservation is None
    exact = await UsageRecord.objects.aget(session_id=meter.session_id)
    assert (exact.pk, exact.estimated, exact.response_id) == (provisional.pk, False, "r1")
    # Next: the conversation (70 tokens) + 2 s of audio + 10 out = $0.011 more: fits.
    meter.note_input_audio(2 * 48_000)
    assert (await meter.reserve_response()).allowed
    await meter.charge_response(done("r2", audio_usage(90, 10)))
    # 1,600 words of typed text (1,600 tokens, $0.16) cannot fit: refused, nothing held.
    meter.note_input_text("word " * 1600)
    refused = await meter.reserve_response()
    assert not refused.allowed and refused.reason == "budget"
    assert meter.reservation is None
    assert await UsageRecord.objects.filter(estimated=True).acount() == 0
