"""Money and the price tables: the USD quantum, ``Decimal`` helpers, price lookup by model and time.

Prices are ``ModelPrice`` rows (USD per 1M tokens of each of ``TOKEN_KINDS``, the columns of
the price table and of the ledger); the row that applies to a usage is the one of that model
with the latest ``effective_from`` at or before the usage time, so a price change never
reprices old ledger rows. A usage before a known model's first row is priced at that first
row (never free). ``ToolPrice`` rows (USD per call of a tool) are looked up the same way.

An unknown model (no row at all) is priced at the most expensive known rate of each token
kind and flagged: a warning in the log, ``unknown_model=True`` on the ledger row and the
``unknown_model_usage_total`` metric. With no price rows at all, the highest rates of the
project's fresh-install sheet (``QUOTAS_DEFAULT_POLICIES``' ``price_sheet``) apply, else those
of the caller's ``fallback`` (the Realtime meter's: its conservative sheet, never free).

Money sums are rounded UP (``ROUND_CEILING``) to 0.000001 USD: rounding never loses money,
and each ledger row is at most 1 micro-dollar high. Splitting a usage into token kinds is the
Realtime add-on's (``quotas.realtime.usage``).
"""

import bisect
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

logger = logging.getLogger("quotas.pricing")

USD_QUANTUM = Decimal("0.000001")
MICRO_PER_USD = 1_000_000
PER_TOKENS = Decimal(1_000_000)  # prices are per 1M tokens
UNKNOWN_MODEL_LABEL = "unknown"
# The priced token kinds: the columns of ``ModelPrice`` and of the ledger, in this order
# (text in, cached text in, audio in, cached audio in, text out, audio out).
TOKEN_KINDS = (
    "text_input",
    "cached_text_input",
    "audio_input",
    "cached_audio_input",
    "text_output",
    "audio_output",
)


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


def fresh_install_prices():
    """The price tuples of the project's fresh-install sheet (none in a neutral install)."""
    from .defaults import configured_policies

    return tuple((configured_policies()["price_sheet"] or {}).values())


class PriceBook:
    """Every price row, by model, sorted by ``effective_from``; immutable once built."""

    def __init__(self, rows, tool_rows=(), fallback=()):
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
        known = [prices for entries in self._prices.values() for prices in entries]
        if not known:
            # No price at all: guess from the project's fresh-install sheet, else ``fallback``.
            known = list(fresh_install_prices() or fallback)
        self._max = tuple(
            max((prices[i] for prices in known), default=Decimal(0))
            for i in range(len(TOKEN_KINDS))
        )

    @classmethod
    def from_database(cls, fallback=()):
        """Load every ``ModelPrice`` and ``ToolPrice`` row (sync)."""
        from .models import ModelPrice, ToolPrice

        rows = [
            (row[0], row[1], tuple(row[2:]))
            for row in ModelPrice.objects.values_list("model", "effective_from", *TOKEN_KINDS)
        ]
        tools = ToolPrice.objects.values_list("tool", "effective_from", "per_call_usd")
        return cls(rows, tools, fallback)

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
_book_cache = {"snapshot": None, "books": {}}


def reset_price_book():
    """Forget the cached price books (``quotas.testing``)."""
    with _book_lock:
        _book_cache["snapshot"], _book_cache["books"] = None, {}


def price_book(fallback=()):
    """This process's price book, rebuilt when the policy snapshot is reloaded (sync).

    ``fallback``: the price tuples to guess from when there is no price row at all and the
    project declared no fresh-install sheet (the Realtime add-on passes its conservative
    sheet, ``quotas.realtime.prices.price_book``). Price edits bump the policy version
    (signals.py), which makes ``policy_cache`` load a new snapshot; keying on the snapshot
    object keeps prices exactly as fresh as policies.
    """
    from .policies import policy_cache

    snapshot = policy_cache.get()
    with _book_lock:
        if _book_cache["snapshot"] is not snapshot:
            _book_cache["snapshot"], _book_cache["books"] = snapshot, {}
        book = _book_cache["books"].get(fallback)
        if book is None:
            book = _book_cache["books"][fallback] = PriceBook.from_database(fallback)
        return book


def warn_unknown(rates, context):
    """Log and count a usage priced for an unknown model."""
    from .metrics import unknown_model_usage_total

    logger.warning(
        "no price for model %r (%s): charged at the highest known rates", rates.model, context
    )
    unknown_model_usage_total.inc()


def timestamp_to_datetime(timestamp):
    """An aware UTC datetime from a POSIX timestamp (the meters' injected clocks)."""
    return datetime.fromtimestamp(timestamp, UTC)
