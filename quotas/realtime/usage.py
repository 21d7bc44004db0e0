"""OpenAI Realtime usage in billing kinds: the six token kinds of a usage, and audio in tokens.

``TokenCounts`` is a usage by billing kind (``quotas.pricing.TOKEN_KINDS``: the columns of the
price table and of the ledger, ``quotas.models.TokenColumns``): ``text_input`` is the text input
billed at the full rate (the cached part is in ``cached_text_input``), same for audio. So
cost = sum over kinds of tokens x rate / 1M, row by row, rounded up to the ledger quantum.

The usage parsers follow REALTIME.md's formula and never under-charge a partial usage. Audio
is pcm16 at 24 kHz (48,000 bytes a second), billed at about 10 tokens a second of user audio
and 20 of assistant audio: what the meter projects a running response's cost from.
"""

import math
from dataclasses import dataclass, fields
from decimal import Decimal

from ..pricing import PER_TOKENS, TOKEN_KINDS, quantize_usd

INPUT_KINDS = ("text_input", "cached_text_input", "audio_input", "cached_audio_input")
OUTPUT_KINDS = ("text_output", "audio_output")
# Billed audio tokens per second (REALTIME.md): user audio ~10/s, assistant audio ~20/s.
INPUT_AUDIO_TOKENS_PER_SECOND = 10
OUTPUT_AUDIO_TOKENS_PER_SECOND = 20
PCM16_BYTES_PER_SECOND = 48_000


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
