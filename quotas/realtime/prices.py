"""OpenAI's price sheets, as plain data, and loading one into ``ModelPrice``.

Prices are USD per 1M tokens in the order of ``quotas.pricing.TOKEN_KINDS``: text in, cached
text in, audio in, cached audio in, text out, audio out. A project declares a sheet as its
fresh-install prices in ``QUOTAS_DEFAULT_POLICIES`` (``"price_sheet": PRICE_SHEETS["default"]``,
as DUCK-E does); ``manage.py quotas_load_prices`` loads one later with a date of its own.
"""

from decimal import Decimal as D

from .. import pricing
from ..defaults import load_prices


def _flat(input_price, output_price):
    i, o = D(input_price), D(output_price)
    return (i, i, i, i, o, o)


def _chat(input_price, cached_price, output_price):
    # Chat models take no audio; audio kinds carry the text prices so nothing is ever free.
    i, c, o = D(input_price), D(cached_price), D(output_price)
    return (i, c, i, c, o, o)


PRICE_SHEETS = {
    # The conservative sheet of DUCK-E's product brief.
    "default": {
        "gpt-5": _flat("10", "30"),
        "gpt-5-mini": _flat("3", "15"),
        "gpt-realtime": _flat("100", "200"),
    },
    # OpenAI's published list prices, late 2026 (shared/REALTIME.md).
    "list": {
        "gpt-realtime": tuple(map(D, ("4.00", "0.40", "32.00", "0.40", "16.00", "64.00"))),
        "gpt-realtime-mini": tuple(map(D, ("0.60", "0.06", "10.00", "0.30", "2.40", "20.00"))),
        "gpt-4o-realtime-preview": tuple(
            map(D, ("5.00", "2.50", "40.00", "2.50", "20.00", "80.00"))
        ),
        "gpt-5": _chat("1.25", "0.125", "10.00"),
        "gpt-5-mini": _chat("0.25", "0.025", "2.00"),
        "gpt-4o-mini": _chat("0.15", "0.075", "0.60"),
        "gpt-4o-transcribe": (D("2.50"), D("2.50"), D("2.50"), D("2.50"), D("10.00"), D("10.00")),
        "gpt-4o-mini-transcribe": (
            D("1.25"),
            D("1.25"),
            D("1.25"),
            D("1.25"),
            D("5.00"),
            D("5.00"),
        ),
    },
}


def load_price_sheet(price_model, sheet, effective_from, note=""):
    """Insert the prices of the sheet named ``sheet`` at ``effective_from``; returns how many
    rows were new."""
    return load_prices(price_model, PRICE_SHEETS[sheet], effective_from, note or f"{sheet} sheet")


_CONSERVATIVE = tuple(PRICE_SHEETS["default"].values())


def price_book():
    """``quotas.pricing.price_book()`` for Realtime usage: with no price row at all and no
    fresh-install sheet declared, a usage is priced at the conservative sheet's highest rates
    (never free)."""
    return pricing.price_book(fallback=_CONSERVATIVE)
