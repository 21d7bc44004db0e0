"""The tools the model may call, and ``run_tool``: validate, rate-limit, run, answer politely.

Order of work for one call: the arguments are checked first (a malformed call costs no
quota), then the tool's rate-limit rule is counted through ``quotas.guards``, then the tool
calls out. Whatever happens, the relay gets a ``ToolOutcome`` whose output is JSON the model
can read aloud from; nothing is raised and no exception text reaches the model.
"""

import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from quotas.events import record_tool_call
from quotas.guards import check_tool_call
from quotas.limiter import ceil_seconds

from . import weather, web_search
from .common import InvalidArguments, ToolFailure, ToolOutcome, error_outcome, to_json

logger = logging.getLogger("ducke.tools")


@dataclass(frozen=True)
class Tool:
    """One function tool: its schema, its rate-limit target and how to run it."""

    schema: dict
    target: str  # the ``target`` of the tool's RateLimitRule
    action: str  # what it does, for a refusal: "I can only <action> 10 times an hour"
    validate: Callable[[str], dict]
    run: Callable[..., Awaitable]

    @property
    def name(self):
        return self.schema["name"]


async def _search(query):
    return await web_search.web_search(query)


TOOLS = {
    tool.name: tool
    for tool in (
        Tool(
            schema=weather.CURRENT_WEATHER_SCHEMA,
            target="weather",
            action="look up the weather",
            validate=weather.validate_current,
            run=weather.current_weather,
        ),
        Tool(
            schema=weather.FORECAST_SCHEMA,
            target="weather",
            action="look up the weather",
            validate=weather.validate_forecast,
            run=weather.weather_forecast,
        ),
        Tool(
            schema=web_search.WEB_SEARCH_SCHEMA,
            target="web_search",
            action="search the web",
            validate=web_search.validate,
            run=_search,
        ),
    )
}

TOOL_SCHEMAS = [tool.schema for tool in TOOLS.values()]


async def run_tool(name, arguments, *, client, user_id=None):
    """Run the function call ``name(arguments)`` for ``client`` (and the signed-in
    ``user_id``, for ``user`` rules); never raises."""
    started = time.perf_counter()
    outcome, reason = await _run(name, arguments, client, user_id)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    shown = name if isinstance(name, str) and name in TOOLS else "(unknown)"
    record_tool_call(shown, outcome.status)
    if reason:
        logger.info("tool %s: %s (%s) in %.0f ms", shown, outcome.status, reason, elapsed_ms)
    else:
        logger.info("tool %s: %s in %.0f ms", shown, outcome.status, elapsed_ms)
    return outcome


async def _run(name, arguments, client, user_id=None):
    """The outcome of one call and a short reason for the log (never secrets or URLs)."""
    tool = TOOLS.get(name) if isinstance(name, str) else None
    if tool is None:
        known = ", ".join(TOOLS)
        return error_outcome(
            "unknown_tool", "unknown_tool", f"There is no such tool here; the tools are {known}."
        ), ""
    try:
        try:
            values = tool.validate(arguments)
        except InvalidArguments as exc:
            return error_outcome("invalid", "invalid_arguments", str(exc)), "bad arguments"
        decision = await check_tool_call(tool.target, str(client), user_id)
        if decision is not None and not decision.allowed:
            retry = max(1, ceil_seconds(decision.retry_after))
            message = refusal_message(tool, decision, retry)
            return error_outcome(
                "refused", "rate_limited", message, retry_after_seconds=retry
            ), f"rate limited, retry in {retry}s"
        result = await tool.run(**values)
        payload, usage = result if isinstance(result, tuple) else (result, ())
        return ToolOutcome(output=to_json(payload), status="ok", usage=tuple(usage)), ""
    except ToolFailure as failure:
        outcome = error_outcome("failed", failure.error, failure.message)
        return ToolOutcome(outcome.output, "failed", failure.usage), failure.reason
    except Exception as exc:
        # A bug or an outage we did not foresee: the session goes on without the tool.
        logger.error("tool %s raised %s", tool.name, where(exc))
        return error_outcome(
            "failed",
            "internal_error",
            "That tool is not working right now; please carry on without it.",
        ), f"error {type(exc).__name__}"


def where(exc):
    """An exception's type and innermost source line: enough to find a bug, no message text.

    The message is left out on purpose; an unforeseen exception may quote a URL or a header.
    """
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}{place}"


def refusal_message(tool, decision, retry):
    """The polite refusal for a rate-limited call, with numbers from the limiter's decision."""
    refusing = decision.refusing
    if decision.engine == "closed" or not refusing:
        # Fail-closed without Redis: the numbers of the rule would not be the reason.
        return f"I can't {tool.action} right now; please try again in {about(retry)}."
    state = max(refusing, key=lambda s: s.reset_seconds)
    times = {1: "once", 2: "twice"}.get(state.limit.limit, f"{state.limit.limit} times")
    return (
        f"I can only {tool.action} {times} {per(state.limit.window_seconds)} for you; "
        f"try again in {about(retry)}."
    )


def per(window_seconds):
    """A window in words: "a minute", "an hour", "every 5 minutes"."""
    window = int(window_seconds)
    units = ((86400, "a day", "days"), (3600, "an hour", "hours"), (60, "a minute", "minutes"))
    for size, one, unit in units:
        if window == size:
            return one
        if window % size == 0:
            return f"every {window // size} {unit}"
    return f"every {window} seconds"


def about(seconds):
    """A wait in words: "about 40 seconds", "about 12 minutes", "about an hour"."""
    if seconds < 60:
        return f"about {seconds} seconds" if seconds != 1 else "about a second"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"about {minutes} minutes" if minutes != 1 else "about a minute"
    hours = round(seconds / 3600)
    return f"about {hours} hours" if hours > 1 else "about an hour"
