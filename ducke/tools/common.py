"""What every server-side tool shares: outcomes, failures, settings and bounded HTTP.

Settings (``ducke.conf``, read on every call, so ``override_settings`` works):
DUCKE_TOOL_TIMEOUT_SECONDS bounds one weather tool call (geocoding and forecast together,
connect and read); DUCKE_WEB_SEARCH_TIMEOUT_SECONDS one web search (a search model that
browses needs longer than a weather lookup); DUCKE_GEOCODING_URL, DUCKE_WEATHER_URL,
DUCKE_OPENAI_BASE_URL: see weather.py, web_search.py.
"""

import json
from dataclasses import dataclass

import httpx

from ducke.conf import default, ducke_settings

# An upstream answer larger than this is not a weather report or a search answer.
MAX_RESPONSE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ToolUsage:
    """Tokens a tool spent on a paid model, for the meter to book."""

    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    # Calls of a tool the paid service bills per call on top of tokens (web search).
    per_call_tool: str = ""
    calls: int = 0


@dataclass(frozen=True)
class ToolOutcome:
    """What a tool call returns to the relay: the JSON output for the model and a status."""

    output: str
    status: str  # "ok" | "refused" | "invalid" | "failed" | "unknown_tool"
    usage: tuple[ToolUsage, ...] = ()


class InvalidArguments(Exception):
    """The model's arguments do not fit the tool; the message tells the model how to fix them."""


class ToolFailure(Exception):
    """A tool could not do its job; ``message`` is safe to show, ``reason`` is safe to log."""

    def __init__(self, message, *, reason, error="upstream_unavailable", usage=()):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.error = error
        self.usage = tuple(usage)


def to_json(payload):
    """The compact JSON text sent as a ``function_call_output``."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def error_outcome(status, error, message, **extra):
    """A ToolOutcome whose output is ``{"error": ..., "message": ...}``."""
    return ToolOutcome(output=to_json({"error": error, "message": message, **extra}), status=status)


def setting_seconds(name):
    """A positive number of seconds from ``DUCKE_<name>``, its default when unusable."""
    try:
        seconds = float(getattr(ducke_settings, name))
    except (TypeError, ValueError):
        return float(default(name))
    return seconds if seconds > 0 else float(default(name))


def setting_url(name):
    """The base URL of ``DUCKE_<name>`` without its trailing slash; its default when empty."""
    value = str(getattr(ducke_settings, name) or "").strip()
    return (value or default(name)).rstrip("/")


def http_client(timeout):
    """An httpx client for one tool call: every phase bounded, no redirects followed."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False)


async def fetch_json(client, method, url, *, service, params=None, json_body=None, headers=None):
    """Send one request and return its JSON body; any upstream trouble is a ToolFailure.

    ``service`` names the upstream in the polite message ("weather service"). Exception
    texts are never kept: httpx puts URLs in them, and a URL may carry secrets elsewhere.
    """
    unavailable = f"The {service} is not answering properly right now; please try again later."
    try:
        async with client.stream(
            method, url, params=params, json=json_body, headers=headers
        ) as response:
            if response.status_code != 200:
                raise ToolFailure(unavailable, reason=f"http {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ToolFailure(unavailable, reason="response too large")
    except httpx.TimeoutException:
        raise ToolFailure(
            f"The {service} took too long to answer; please try again in a little while.",
            reason="timeout",
            error="timeout",
        ) from None
    except httpx.HTTPError as exc:
        raise ToolFailure(unavailable, reason=f"transport {type(exc).__name__}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ToolFailure(unavailable, reason="invalid json") from None


def timeout_failure(service):
    """The ToolFailure for a call that ran past its total deadline."""
    return ToolFailure(
        f"The {service} took too long to answer; please try again in a little while.",
        reason="deadline",
        error="timeout",
    )
