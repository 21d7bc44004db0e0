"""What a usage event costs: price lookup by model and time, and the Realtime cost formula.

Prices are ``ModelPrice`` rows (USD per 1M tokens); the row that applies to a usage is the one
of that model with the latest ``effective_from`` at or before the usage time, so a price
change never reprices old ledger rows. A usage before a known model's first row is priced at
that first row (never free).

An unknown model (no row at all) is priced at the most expensive known rate of each token
kind and flagged: a warning in the log, ``unknown_model=True`` on the ledger row and the
``unknown_model_usage_total`` metric. With no price rows at all, the fresh-install sheet's
highest rates apply.

Token counts come out by billing kind: ``text_input`` is the text input billed at the full
rate (the cached part is in ``cached_text_input``), same for audio. So cost = sum over kinds
of tokens x rate / 1M, row by row. The exact sum is rounded UP (``ROUND_CEILING``) to
0.000001 USD: rounding never loses money, and each ledger row is at most 1 micro-dollar high.
"""

import bisect
import logging
import math
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

from .defaults import PRICE_SHEETS, TOKEN_KINDS

logger = logging.getLogger("quotas.pricing")

USD_QUANTUM = Decimal("0.000001")
MICRO_PER_USD = 1_000_000
PER_TOKENS = Decimal(1_000_000)  # prices are per 1M tokens
INPUT_KINDS = ("text_input", "cached_text_input", "audio_input", "cached_audio_input")
OUTPUT_KINDS = ("text_output", "audio_output")
# Billed audio tokens per second (REALTIME.md): user audio ~10/s, assistant audio ~20/s.
INPUT_AUDIO_TOKENS_PER_SECOND = 10
OUTPUT_AUDIO_TOKENS_PER_SECOND = 20
PCM16_BYTES_PER_SECOND = 48_000
UNKNOWN_MODEL_LABEL = "unknown"


def quantize_usd(amount):
    """Round a USD amount up to the ledger quantum (never loses money)."""
    return Decimal(amount).quantize(USD_QUANTUM, rounding=ROUND_CEILING)


def to_micro(amount):
    """Integer micro-USD of a quantized amount (the unit of the shared counters)."""
    return int(quantize_usd(amount) * MICRO_PER_USD)


def from_micro(micro):
    """Decimal USD from integer micro-USD."""
    return (Decimal(int(micro)) / MICRO_PER_USD).quantize(USD_QUANTUM)


@dataclass(frozen=True)
class Rates:
    """USD per 1M tokens of each kind for one model at one time; ``unknown`` when guessed."""

    model: str
    text_input: Decimal
    cached_text_input: Decimal
    audio_input: Decimal
    cached_audio_input: Decimal
    text_output: Decimal
    audio_output: Decimal
    unknown: bool = False

    @property
    def metric_model(self):
        """The bounded ``model`` label for metrics."""
        return UNKNOWN_MODEL_LABEL if self.unknown else self.model

    def max_kind(self, kinds):
        """The most expensive of ``kinds`` (ties: the first)."""
        return max(kinds, key=lambda kind: getattr(self, kind))

    def per_token_cost(self, kind):
        """USD of one token of ``kind`` (exact, unrounded)."""
        return getattr(self, kind) / PER_TOKENS


@dataclass(frozen=True)
class TokenCounts:
    """Tokens by billing kind (cached parts excluded from the full-rate kinds)."""

    text_input: int = 0
    cached_text_input: int = 0
    audio_input: int = 0
    cached_audio_input: int = 0
    text_output: int = 0
    audio_output: int = 0

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def cost(self, rates):
        """Exact cost at ``rates``, rounded up to the quantum."""
        total = sum(
            (getattr(self, kind) * getattr(rates, kind) for kind in TOKEN_KINDS), Decimal(0)
        )
        return quantize_usd(total / PER_TOKENS)


class PriceBook:
    """Every price row, by model, sorted by ``effective_from``; immutable once built."""

    def __init__(self, rows, tool_rows=()):
        self._tools = {}
        for tool, effective_from, price in sorted(tool_rows, key=lambda row: row[1]):
            self._tools.setdefault(tool, []).append((effective_from, Decimal(price)))
        by_model = {}
        for model, effective_from, prices in rows:
            by_model.setdefault(model, []).append((effective_from, prices))
        self._dates = {}
        self._prices = {}
        for model, entries in by_model.items():
            entries.sort(key=lambda entry: entry[0])
            self._dates[model] = [when for when, _ in entries]
            self._prices[model] = [prices for _, prices in entries]
        fallback = PRICE_SHEETS["default"].values()
        self._max = tuple(
            max(
                [prices[i] for entries in self._prices.values() for prices in entries]
                or [sheet[i] for sheet in fallback]
            )
            for i in range(len(TOKEN_KINDS))
        )

    @classmethod
    def from_database(cls):
        """Load every ``ModelPrice`` and ``ToolPrice`` row (sync)."""
        from .models import ModelPrice, ToolPrice

        rows = [
            (row[0], row[1], tuple(row[2:]))
            for row in ModelPrice.objects.values_list("model", "effective_from", *TOKEN_KINDS)
        ]
        tools = ToolPrice.objects.values_list("tool", "effective_from", "per_call_usd")
        return cls(rows, tools)

    def tool_fee_at(self, tool, when):
        """USD per call of ``tool`` in force at ``when``; a tool without a price is charged the
        dearest per-call price known (never free when some tool is priced)."""
        entries = self._tools.get(tool)
        if not entries:
            prices = [price for rows in self._tools.values() for _, price in rows]
            return max(prices, default=Decimal(0))
        dates = [when_ for when_, _ in entries]
        return entries[max(0, bisect.bisect_right(dates, when) - 1)][1]

    @property
    def models(self):
        return tuple(self._prices)

    def rates_at(self, model, when):
        """The rates of ``model`` in force at ``when`` (an aware datetime)."""
        dates = self._dates.get(model)
        if dates is None:
            return Rates(model, *self._max_at(when), unknown=True)
        index = max(0, bisect.bisect_right(dates, when) - 1)
        return Rates(model, *self._prices[model][index])

    def dearest_at(self, when):
        """Each kind's highest rate in force at ``when``, over every model (fail safe)."""
        return Rates("*", *self._max_at(when), unknown=True)

    def _max_at(self, when):
        """Each kind's highest rate among the prices in force at ``when`` (rare path)."""
        in_force = []
        for model, dates in self._dates.items():
            index = bisect.bisect_right(dates, when) - 1
            if index >= 0:
                in_force.append(self._prices[model][index])
        if not in_force:
            return self._max
        return tuple(max(prices[i] for prices in in_force) for i in range(len(TOKEN_KINDS)))


_book_lock = threading.Lock()
_book_cache = {"snapshot": None, "book": None}


def reset_price_book():
    """Forget the cached price book (``quotas.testing``)."""
    with _book_lock:
        _book_cache["snapshot"] = _book_cache["book"] = None


def price_book():
    """This process's price book, rebuilt when the policy snapshot is reloaded (sync).

    Price edits bump the policy version (signals.py), which makes ``policy_cache`` load a
    new snapshot; keying on the snapshot object keeps prices exactly as fresh as policies.
    """
    from .policies import policy_cache

    snapshot = policy_cache.get()
    with _book_lock:
        if _book_cache["snapshot"] is not snapshot or _book_cache["book"] is None:
            _book_cache["book"] = PriceBook.from_database()
            _book_cache["snapshot"] = snapshot
        return _book_cache["book"]


def warn_unknown(rates, context):
    """Log and count a usage priced for an unknown model."""
    from .metrics import unknown_model_usage_total

    logger.warning(
        "no price for model %r (%s): charged at the highest known rates", rates.model, context
    )
    unknown_model_usage_total.inc()


def _int(value):
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def usage_token_counts(usage, rates):
    """Split a Realtime ``usage`` dict into billing kinds (REALTIME.md's formula).

    Missing details fall back to the most expensive kind of their side, so a partial usage
    is never under-charged: no input details -> all input at the highest input rate; cached
    tokens without ``cached_tokens_details`` -> billed at full rates (no cache discount);
    tokens the details do not explain (image tokens, gaps) -> the highest rate of the side.
    """
    usage = usage or {}
    counts = dict.fromkeys(TOKEN_KINDS, 0)
    max_input = rates.max_kind(INPUT_KINDS)
    max_output = rates.max_kind(OUTPUT_KINDS)

    in_details = usage.get("input_token_details")
    input_tokens = usage.get("input_tokens")
    if isinstance(in_details, dict):
        text = _int(in_details.get("text_tokens"))
        audio = _int(in_details.get("audio_tokens"))
        image = _int(in_details.get("image_tokens"))
        input_total = _int(input_tokens) if input_tokens is not None else text + audio + image
        cached_details = in_details.get("cached_tokens_details")
        cached_text = cached_audio = 0
        if isinstance(cached_details, dict):
            cached_text = min(text, _int(cached_details.get("text_tokens")))
            cached_audio = min(audio, _int(cached_details.get("audio_tokens")))
        counts["text_input"] = text - cached_text
        counts["cached_text_input"] = cached_text
        counts["audio_input"] = audio - cached_audio
        counts["cached_audio_input"] = cached_audio
        counts[max_input] += max(0, input_total - text - audio)
    else:
        counts[max_input] += _int(input_tokens)

    out_details = usage.get("output_token_details")
    output_tokens = usage.get("output_tokens")
    if isinstance(out_details, dict):
        text = _int(out_details.get("text_tokens"))
        audio = _int(out_details.get("audio_tokens"))
        output_total = _int(output_tokens) if output_tokens is not None else text + audio
        counts["text_output"] += text
        counts["audio_output"] += audio
        counts[max_output] += max(0, output_total - text - audio)
    else:
        counts[max_output] += _int(output_tokens)
    return TokenCounts(**counts)


def transcription_token_counts(usage, rates):
    """Billing kinds of a transcription ``usage`` (``tokens`` or ``duration`` type).

    Duration usage is converted at the billed rate of user audio (10 tokens per second,
    rounded up) and priced as audio input.
    """
    usage = usage or {}
    if usage.get("type") == "duration":
        try:
            seconds = max(0.0, float(usage.get("seconds") or 0))
        except (TypeError, ValueError):
            seconds = 0.0
        if not math.isfinite(seconds):
            seconds = 0.0
        tokens = math.ceil(seconds * INPUT_AUDIO_TOKENS_PER_SECOND)
        return TokenCounts(**{rates.max_kind(("audio_input", "text_input")): tokens})
    return usage_token_counts(usage, rates)


def tool_token_counts(input_tokens, cached_input_tokens, output_tokens):
    """Billing kinds of a text model call (a tool's LLM call): cached is part of input."""
    total, cached = _int(input_tokens), _int(cached_input_tokens)
    cached = min(cached, total)
    return TokenCounts(
        text_input=total - cached, cached_text_input=cached, text_output=_int(output_tokens)
    )


def usage_cost(usage, rates):
    """(cost, counts) of a Realtime ``usage`` dict at ``rates``."""
    counts = usage_token_counts(usage, rates)
    return counts.cost(rates), counts


def timestamp_to_datetime(timestamp):
    """An aware UTC datetime from a POSIX timestamp (the meters' injected clocks)."""
    return datetime.fromtimestamp(timestamp, UTC)
