"""Cost of usage events: the Realtime formula, fallbacks, unknown models, price history."""

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from quotas.defaults import SHEET_EPOCH
from quotas.metrics import unknown_model_usage_total
from quotas.models import ModelPrice
from quotas.pricing import PriceBook, price_book, quantize_usd
from quotas.realtime.prices import load_price_sheet
from quotas.realtime.usage import (
    TokenCounts,
    tool_token_counts,
    transcription_token_counts,
    usage_cost,
)

# REALTIME.md's usage shape, every detail present.
EXAMPLE_USAGE = {
    "total_tokens": 1540,
    "input_tokens": 1200,
    "output_tokens": 340,
    "input_token_details": {
        "text_tokens": 200,
        "audio_tokens": 1000,
        "image_tokens": 0,
        "cached_tokens": 600,
        "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 500, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 40, "audio_tokens": 300},
}
LIST_DAY = datetime(2026, 6, 1, tzinfo=UTC)
AFTER_LIST_DAY = LIST_DAY + timedelta(days=1)


@pytest.fixture
def list_sheet(django_db_blocker):
    """The published list prices, in force from LIST_DAY (the fresh-install sheet before)."""
    with django_db_blocker.unblock():
        load_price_sheet(ModelPrice, "list", LIST_DAY)


@pytest.mark.django_db
def test_example_usage_on_fresh_install_sheet():
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    cost, counts = usage_cost(EXAMPLE_USAGE, rates)
    # Every input kind 100 $/1M, every output kind 200 $/1M.
    by_hand = (Decimal(100 + 100 + 500 + 500) * 100 + Decimal(40 + 300) * 200) / 1_000_000
    assert by_hand == Decimal("0.188")
    assert cost == Decimal("0.188000")
    assert counts == TokenCounts(100, 100, 500, 500, 40, 300)
    assert not rates.unknown


@pytest.mark.django_db
def test_example_usage_on_list_sheet(list_sheet):
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    cost, _ = usage_cost(EXAMPLE_USAGE, rates)
    by_hand = (
        100 * Decimal("4.00")  # uncached text in
        + 100 * Decimal("0.40")  # cached text in
        + 500 * Decimal("32.00")  # uncached audio in
        + 500 * Decimal("0.40")  # cached audio in
        + 40 * Decimal("16.00")  # text out
        + 300 * Decimal("64.00")  # audio out
    ) / 1_000_000
    assert by_hand == Decimal("0.03648")
    assert cost == by_hand


@pytest.mark.django_db
def test_sub_micro_costs_round_up_never_down(list_sheet):
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    one_cached = {
        "input_tokens": 1,
        "output_tokens": 0,
        "input_token_details": {
            "text_tokens": 1,
            "audio_tokens": 0,
            "cached_tokens": 1,
            "cached_tokens_details": {"text_tokens": 1, "audio_tokens": 0},
        },
        "output_token_details": {"text_tokens": 0, "audio_tokens": 0},
    }
    # 1 token x 0.40 $/1M = 0.0000004 $: rounds up to the 1 micro-dollar quantum.
    assert usage_cost(one_cached, rates)[0] == Decimal("0.000001")
    assert quantize_usd(Decimal("0.0000010001")) == Decimal("0.000002")


@pytest.mark.django_db
def test_missing_details_price_at_the_most_expensive_rate(list_sheet):
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    cost, counts = usage_cost({"input_tokens": 1000, "output_tokens": 100}, rates)
    # Highest input rate is audio in (32), highest output rate audio out (64).
    assert cost == (1000 * Decimal(32) + 100 * Decimal(64)) / 1_000_000
    assert counts == TokenCounts(audio_input=1000, audio_output=100)


@pytest.mark.django_db
def test_cached_without_split_gets_no_discount(list_sheet):
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    usage = {
        "input_tokens": 1200,
        "output_tokens": 0,
        "input_token_details": {"text_tokens": 200, "audio_tokens": 1000, "cached_tokens": 600},
        "output_token_details": {"text_tokens": 0, "audio_tokens": 0},
    }
    cost, _ = usage_cost(usage, rates)
    assert cost == (200 * Decimal(4) + 1000 * Decimal(32)) / 1_000_000


@pytest.mark.django_db
def test_unexplained_tokens_take_the_top_rate(list_sheet):
    rates = price_book().rates_at("gpt-realtime", AFTER_LIST_DAY)
    usage = {
        "input_tokens": 300,  # 100 text + 150 audio + 50 image tokens
        "output_tokens": 10,
        "input_token_details": {"text_tokens": 100, "audio_tokens": 150, "image_tokens": 50},
        "output_token_details": {"text_tokens": 10, "audio_tokens": 0},
    }
    cost, counts = usage_cost(usage, rates)
    assert counts.audio_input == 200
    assert cost == (100 * Decimal(4) + 200 * Decimal(32) + 10 * Decimal(16)) / 1_000_000


@pytest.mark.django_db(transaction=True)  # async meters on PostgreSQL need real commits
def test_unknown_model_priced_at_max_rates_and_flagged(list_sheet, caplog):
    from asgiref.sync import async_to_sync

    from quotas.models import UsageRecord
    from quotas.policies import BudgetSpec
    from quotas.realtime.meter import SessionMeter
    from quotas.spend import SpendCounters

    rates = price_book().rates_at("gpt-mystery", AFTER_LIST_DAY)
    assert rates.unknown and rates.metric_model == "unknown"
    # In force after LIST_DAY: the list sheet; its highest rate per kind.
    assert (rates.text_input, rates.cached_text_input, rates.audio_input) == (
        Decimal(5),
        Decimal("2.5"),
        Decimal(40),
    )
    assert (rates.cached_audio_input, rates.text_output, rates.audio_output) == (
        Decimal("2.5"),
        Decimal(20),
        Decimal(80),
    )
    cost, _ = usage_cost({"input_tokens": 1000, "output_tokens": 1000}, rates)
    assert cost == Decimal("0.120000")  # 1000 x 40 + 1000 x 80 per 1M

    # Booked through a meter: flagged on the row, logged, counted; never free.
    clock = [AFTER_LIST_DAY.timestamp()]
    meter = SessionMeter(
        "1.2.3.4",
        "gpt-mystery",
        BudgetSpec(),
        timer=lambda: clock[0],
        counters=SpendCounters(None, timer=lambda: clock[0]),
    )
    before = unknown_model_usage_total._value.get()
    async_to_sync(meter.open)()
    event = {"type": "response.done", "response": {"id": "resp_1", "usage": {"input_tokens": 10}}}
    with caplog.at_level(logging.WARNING, logger="quotas.pricing"):
        outcome = async_to_sync(meter.charge_response)(event)
    assert outcome.unknown_model and outcome.cost == Decimal("0.000400")
    record = UsageRecord.objects.get(response_id="resp_1")
    assert record.unknown_model and record.cost_usd == Decimal("0.000400")
    assert "gpt-mystery" in caplog.text
    assert unknown_model_usage_total._value.get() == before + 1


def test_unknown_model_without_any_price_row_uses_the_default_sheet_maximum():
    rates = PriceBook([]).rates_at("anything", AFTER_LIST_DAY)
    assert rates.unknown
    assert (rates.text_input, rates.audio_output) == (Decimal(100), Decimal(200))


@pytest.mark.django_db(transaction=True)
def test_price_change_mid_day_books_each_usage_at_its_own_price():
    from asgiref.sync import async_to_sync

    from quotas.models import QuotaSession, UsageRecord
    from quotas.policies import BudgetSpec
    from quotas.realtime.meter import SessionMeter
    from quotas.spend import SpendCounters

    morning = datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
    noon = morning + timedelta(hours=4)
    fields = ("text_input", "cached_text_input", "audio_input", "cached_audio_input")
    ModelPrice.objects.create(
        model="duck-voice",
        effective_from=morning,
        **dict.fromkeys(fields, Decimal("1")),
        text_output=Decimal("2"),
        audio_output=Decimal("2"),
    )
    ModelPrice.objects.create(
        model="duck-voice",
        effective_from=noon,
        **dict.fromkeys(fields, Decimal("10")),
        text_output=Decimal("20"),
        audio_output=Decimal("20"),
    )
    clock = [(noon - timedelta(minutes=1)).timestamp()]
    meter = SessionMeter(
        "1.2.3.4",
        "duck-voice",
        BudgetSpec(),
        timer=lambda: clock[0],
        counters=SpendCounters(None, timer=lambda: clock[0]),
    )
    async_to_sync(meter.open)()
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "input_token_details": {"text_tokens": 1000, "audio_tokens": 0},
        "output_token_details": {"text_tokens": 500, "audio_tokens": 0},
    }
    before = async_to_sync(meter.charge_response)({"response": {"id": "r-before", "usage": usage}})
    clock[0] = noon.timestamp()  # the new price applies from this instant on
    after = async_to_sync(meter.charge_response)({"response": {"id": "r-after", "usage": usage}})
    assert before.cost == Decimal("0.002000")  # 1000 x 1 + 500 x 2 per 1M
    assert after.cost == Decimal("0.020000")  # 1000 x 10 + 500 x 20 per 1M
    rows = dict(UsageRecord.objects.values_list("response_id", "cost_usd"))
    assert rows == {"r-before": Decimal("0.002000"), "r-after": Decimal("0.020000")}
    assert QuotaSession.objects.get().cost_usd == Decimal("0.022000")


def test_transcription_and_tool_counts():
    rates = PriceBook(
        [("gpt-4o-transcribe", SHEET_EPOCH, (Decimal("2.5"),) * 4 + (Decimal(10),) * 2)]
    ).rates_at("gpt-4o-transcribe", AFTER_LIST_DAY)
    by_tokens = transcription_token_counts(
        {
            "type": "tokens",
            "input_tokens": 80,
            "output_tokens": 12,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 80},
        },
        rates,
    )
    assert by_tokens == TokenCounts(audio_input=80, text_output=12)
    assert by_tokens.cost(rates) == (80 * Decimal("2.5") + 12 * Decimal(10)) / 1_000_000
    # 2.35 s of audio at 10 tokens/s -> 24 tokens (rounded up).
    by_duration = transcription_token_counts({"type": "duration", "seconds": 2.35}, rates)
    assert by_duration.audio_input + by_duration.text_input == 24
    tool = tool_token_counts(input_tokens=1000, cached_input_tokens=400, output_tokens=50)
    assert tool == TokenCounts(text_input=600, cached_text_input=400, text_output=50)


@pytest.mark.django_db
def test_price_book_follows_price_edits():
    first = price_book()
    assert price_book() is first  # cached while policies do not change
    ModelPrice.objects.create(
        model="new-model",
        effective_from=SHEET_EPOCH,
        **dict.fromkeys(
            ("text_input", "cached_text_input", "audio_input", "cached_audio_input"), Decimal(1)
        ),
        text_output=Decimal(1),
        audio_output=Decimal(1),
    )
    second = price_book()
    assert second is not first
    assert not second.rates_at("new-model", AFTER_LIST_DAY).unknown


def test_token_counts_are_the_columns_of_the_price_table_and_the_ledger():
    from dataclasses import fields

    from quotas.models import QuotaSession, UsageRecord
    from quotas.pricing import TOKEN_KINDS

    assert tuple(f.name for f in fields(TokenCounts)) == TOKEN_KINDS
    for model in (ModelPrice, QuotaSession, UsageRecord):
        assert {f.name for f in model._meta.fields} >= set(TOKEN_KINDS), model
