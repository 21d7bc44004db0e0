"""The 429 of the HTTP contract, built in one place for the ASGI edge and the middleware.

A refused request gets a JSON body with ``error`` (``rate_limited``), ``detail``, ``limit``,
``window_seconds`` and ``retry_after``, and the headers ``Retry-After`` and
``RateLimit-Limit``/``-Remaining``/``-Reset`` of the tightest enforced limit. Every response a
rule decided (allowed ones too) carries the ``RateLimit-*`` headers.

``refusal_answer(decision)`` gives the body and headers of a refused ``Decision``;
``ratelimit_headers(*decisions)`` the ``RateLimit-*`` headers of the tightest limit over
several decisions (the edge's and the middleware's). Both hand out header names in their
usual spelling (``RateLimit-Limit``) and, for ASGI, lower-cased bytes. The few distinct
answers (a rule, a limit, whole seconds) are built once and reused (bounded caches).
"""

import functools
import json
from dataclasses import dataclass

from .limiter import ceil_seconds

ERROR = "rate_limited"
_ANSWERS = 512


@dataclass(frozen=True)
class Headers:
    """Header pairs as text (``Name``, value) and as ASGI wants them (lower-cased bytes)."""

    text: tuple = ()
    asgi: tuple = ()


@dataclass(frozen=True)
class RefusalAnswer:
    """The body and headers of one 429."""

    body: bytes
    headers: Headers  # Content-Type, Content-Length, Retry-After, RateLimit-*
    retry_after: int


def _headers(pairs):
    pairs = tuple(pairs)
    return Headers(
        text=pairs,
        asgi=tuple(
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs
        ),
    )


NO_HEADERS = Headers()


def refusing_state(decision):
    """The refusing limit whose slot frees last: it says when to try again."""
    return max(decision.refusing, key=lambda s: s.reset_seconds)


def retry_after_seconds(state):
    """Whole seconds until ``state``'s limit has room again (at least 1)."""
    return max(1, ceil_seconds(state.reset_seconds))


def tightest_state(*decisions):
    """The enforced limit with the fewest hits left over ``decisions`` (ties: resets last)."""
    states = [d.tightest for d in decisions if d is not None]
    states = [s for s in states if s is not None]
    if not states:
        return None
    return min(states, key=lambda s: (s.remaining, -s.reset_seconds))


def ratelimit_headers(*decisions):
    """``RateLimit-Limit``, ``-Remaining``, ``-Reset`` of the tightest enforced limit."""
    state = tightest_state(*decisions)
    if state is None:
        return NO_HEADERS
    return _ratelimit_headers(state.limit.limit, state.remaining, ceil_seconds(state.reset_seconds))


@functools.lru_cache(maxsize=_ANSWERS)
def _ratelimit_headers(limit, remaining, reset):
    return _headers(
        (
            ("RateLimit-Limit", str(limit)),
            ("RateLimit-Remaining", str(remaining)),
            ("RateLimit-Reset", str(reset)),
        )
    )


def refusal_answer(decision):
    """The 429's body and headers for a refused ``decision``."""
    state = refusing_state(decision)
    limit = state.limit
    tightest = tightest_state(decision)
    return _refusal_answer(
        limit.label,
        limit.limit,
        limit.window_seconds,
        retry_after_seconds(state),
        tightest.limit.limit,
        tightest.remaining,
        ceil_seconds(tightest.reset_seconds),
    )


@functools.lru_cache(maxsize=_ANSWERS)
def _refusal_answer(label, limit, window_seconds, retry_after, *tightest):
    body = json.dumps(
        {
            "error": ERROR,
            "detail": f"Too many requests: at most {limit} per {window_seconds:g} "
            f"seconds ({label}). Try again in {retry_after} s.",
            "limit": limit,
            "window_seconds": int(window_seconds),
            "retry_after": retry_after,
        }
    ).encode()
    headers = _headers(
        (
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Retry-After", str(retry_after)),
            *_ratelimit_headers(*tightest).text,
        )
    )
    return RefusalAnswer(body=body, headers=headers, retry_after=retry_after)
