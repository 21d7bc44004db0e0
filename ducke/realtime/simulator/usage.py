"""What a response costs, billed like the real service, and the rate limits it reports.

The whole conversation is input on every response; the part that matches the previous
response's input (by prefix, as upstream caches) counts as cached. Audio is 10 tokens/s from
the user and 20 tokens/s from the assistant; text is chars/4. The assistant speaks ~14 chars/s.
"""

import json
import math
from collections.abc import Hashable, Iterable

from ducke.realtime import duck_replies

SPEAKING_CHARS_PER_SECOND = 14.0
USER_AUDIO_TOKENS_PER_SECOND = 10
ASSISTANT_AUDIO_TOKENS_PER_SECOND = 20
CHARS_PER_TEXT_TOKEN = 4
RATE_LIMIT_REQUESTS = 5000
RATE_LIMIT_TOKENS = 400_000

Segment = tuple[Hashable, int, int]


def text_tokens(chars: int) -> int:
    """Text tokens billed for `chars` characters (the usual ~4 chars/token estimate)."""
    return math.ceil(chars / CHARS_PER_TEXT_TOKEN)


def input_segments(instructions: str, tools: list, context: Iterable) -> list[Segment]:
    """A response's input as (cache key, text tokens, audio tokens) pieces, in order:
    instructions and tools first, then every conversation item of `context`."""
    prefix = instructions + json.dumps(tools, sort_keys=True)
    segments: list[Segment] = [
        (("prefix", duck_replies.stable_hash(prefix)), text_tokens(len(prefix)), 0)
    ]
    for item in context:
        text, audio = item.input_tokens()
        segments.append(((item.id, text, audio), text, audio))
    return segments


def usage(
    segments: list[Segment], billed_before: list[Segment], output_chars: int, output_seconds: float
) -> dict:
    """The `usage` of a `response.done`: `segments` as input (the prefix shared with
    `billed_before`, the previous response's input, is cached) and the output sent."""
    text_in = sum(s[1] for s in segments)
    audio_in = sum(s[2] for s in segments)
    # Upstream caches by prefix: what matches the previous response's input is cached.
    cached_text = cached_audio = 0
    for now, before in zip(segments, billed_before, strict=False):
        if now[0] != before[0]:
            break
        cached_text += now[1]
        cached_audio += now[2]
    text_out = text_tokens(output_chars)
    audio_out = round(output_seconds * ASSISTANT_AUDIO_TOKENS_PER_SECOND)
    input_tokens = text_in + audio_in
    output_tokens = text_out + audio_out
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": 0,
            },
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


class RateLimits:
    """The connection's remaining requests and tokens, as `rate_limits.updated` reports them."""

    def __init__(self):
        self.requests = RATE_LIMIT_REQUESTS
        self.tokens = RATE_LIMIT_TOKENS

    def spend(self, total_tokens: int) -> dict:
        """Count one response of `total_tokens`; the `rate_limits.updated` event to send."""
        self.requests = max(0, self.requests - 1)
        self.tokens = max(0, self.tokens - total_tokens)
        return {
            "type": "rate_limits.updated",
            "rate_limits": [
                {
                    "name": "requests",
                    "limit": RATE_LIMIT_REQUESTS,
                    "remaining": self.requests,
                    "reset_seconds": 0.012,
                },
                {
                    "name": "tokens",
                    "limit": RATE_LIMIT_TOKENS,
                    "remaining": self.tokens,
                    "reset_seconds": 0.6,
                },
            ],
        }
