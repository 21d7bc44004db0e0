"""Server-side tools DUCK-E's model can call: current weather, weather forecast, web search.

The relay sends ``TOOL_SCHEMAS`` in ``session.update`` and answers each function call with
``await run_tool(name, arguments, client=ip)``; the outcome's ``output`` goes back as a
``function_call_output`` item and its ``usage`` (tokens a tool spent on a paid model) to the
meter.
"""

from .common import ToolOutcome, ToolUsage
from .registry import TOOL_SCHEMAS, run_tool

__all__ = ["TOOL_SCHEMAS", "ToolOutcome", "ToolUsage", "run_tool"]
