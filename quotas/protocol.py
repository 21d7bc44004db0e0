"""What quotas tells a WebSocket client: close codes, ``quota.*`` events and their messages.

Close codes (the application range 4000-4999 mirrors HTTP where it can):
- 4429  connection rate or concurrent-session limit (``rate_limited``, ``concurrent_sessions``)
- 4402  a budget of this session, client or user is spent (``budget``, ``client_budget``,
        ``user_budget``)
- 4408  the session's duration cap is reached (``duration``)
- 4503  the service is paused for everyone (``hourly_cap``, ``global_budget``, ``breaker``)

Events: ``quota.status`` after each response, ``quota.warning`` (``reason``, ``message``) at
50/80/95 % of a budget and before the duration cap, ``quota.exceeded`` (``reason``,
``message``, ``retry_after``) right before a quota close. Money travels as a decimal string.
Messages name the product by ``QUOTAS_SERVICE_NAME`` and go through gettext.
"""

import math
from decimal import ROUND_HALF_UP, Decimal

from django.utils.translation import gettext as _

from .conf import quota_settings

CLOSE_BUDGET = 4402
CLOSE_DURATION = 4408
CLOSE_RATE_LIMITED = 4429
CLOSE_PAUSED = 4503

CLOSE_CODE_BY_REASON = {
    "budget": CLOSE_BUDGET,
    "client_budget": CLOSE_BUDGET,
    "user_budget": CLOSE_BUDGET,
    "duration": CLOSE_DURATION,
    "rate_limited": CLOSE_RATE_LIMITED,
    "concurrent_sessions": CLOSE_RATE_LIMITED,
    "hourly_cap": CLOSE_PAUSED,
    "global_budget": CLOSE_PAUSED,
    "breaker": CLOSE_PAUSED,
}

_CENTS = Decimal("0.01")


def close_code_for(reason):
    """The close code that ends a session refused for ``reason``."""
    return CLOSE_CODE_BY_REASON.get(reason, CLOSE_PAUSED)


def format_usd(amount):
    """Money for the browser: a decimal string with 2 to 6 places ("0.0123", "5.00")."""
    text = f"{Decimal(amount).quantize(Decimal('0.000001'), rounding=ROUND_HALF_UP):f}"
    whole, _dot, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction.ljust(2, '0')}"


def dollars(amount):
    """Money in a sentence: "$10.00"."""
    return f"${Decimal(amount).quantize(_CENTS)}"


def warning_event(reason, message):
    """A ``quota.warning`` event."""
    return {"type": "quota.warning", "reason": reason, "message": message}


def exceeded_event(reason, message, retry_after=0):
    """A ``quota.exceeded`` event (sent right before a quota close)."""
    return {
        "type": "quota.exceeded",
        "reason": reason,
        "message": message,
        "retry_after": int(retry_after),
    }


def minutes_until(seconds):
    """Whole minutes (at least 1) for a wait of ``seconds``, for messages."""
    return max(1, math.ceil(seconds / 60))


def _wait(retry_after):
    if retry_after <= 0:
        return ""
    if retry_after < 120:
        return " " + _("Please try again in %(seconds)d seconds.") % {"seconds": retry_after}
    return " " + _("Please try again in %(minutes)d min.") % {"minutes": minutes_until(retry_after)}


def refusal_message(reason, retry_after=0, cap=None):
    """The sentence a person reads when a budget refuses their session or answer."""
    if reason == "breaker":
        return breaker_message(retry_after)
    if reason == "hourly_cap":
        return hourly_cap_message(retry_after)
    service = quota_settings.SERVICE_NAME
    limit = f" ({dollars(cap.cap_micro / 1_000_000)})" if cap is not None and cap.cap_micro else ""
    texts = {
        "budget": _("This session has used up its budget%(limit)s."),
        "client_budget": _("Your address has reached its spending limit%(limit)s."),
        "user_budget": _("Your account has reached its spending limit%(limit)s."),
        "global_budget": _("%(service)s has reached its overall spending limit%(limit)s."),
    }
    text = texts.get(reason, _("%(service)s cannot start this now."))
    return text % {"service": service, "limit": limit} + _wait(int(retry_after))


def breaker_message(retry_after):
    """The message of a breaker pause (kept in the shape sessions have always received)."""
    return _(
        "%(service)s is paused because spending rose unusually fast. "
        "Please try again in %(minutes)d min."
    ) % {"service": quota_settings.SERVICE_NAME, "minutes": minutes_until(retry_after)}


def hourly_cap_message(retry_after):
    """The message of an hourly-cap refusal."""
    return _(
        "%(service)s has reached its spending limit for this hour. "
        "Please try again in %(minutes)d min."
    ) % {"service": quota_settings.SERVICE_NAME, "minutes": minutes_until(retry_after)}
