"""The floor for a refusal: an ASGI app that answers every HTTP request 429 and does nothing
else (run it under daphne: ``daphne tests.benchmarks.peers.bare429:application``).

Its answer has the shape of DUCK-E's refusal (a JSON body of the same fields, Retry-After,
RateLimit-*), so the difference to DUCK-E is the deciding, not the bytes on the wire.
"""

import json

BODY = json.dumps(
    {
        "error": "rate_limited",
        "detail": "Too many requests: at most 1 per 3600 seconds (status). Try again in 3600 s.",
        "limit": 1,
        "window_seconds": 3600,
        "retry_after": 3600,
    }
).encode()
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"retry-after", b"3600"),
    (b"ratelimit-limit", b"1"),
    (b"ratelimit-remaining", b"0"),
    (b"ratelimit-reset", b"3600"),
]


async def application(scope, receive, send):
    """Answer 429 to every HTTP request; ignore anything else (daphne sends no lifespan)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 429, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
