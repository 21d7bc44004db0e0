"""Reusable quota enforcement for Django and Channels: rate limits, prices, budgets.

The public API for code (``quotas.api``): ``ratelimit(rule_name)`` decorates a sync or async
view, ``check(request_or_scope, rule_name)`` / ``acheck(...)`` count a hit and return the
decision without a response. Importing ``quotas`` loads no model: the names resolve lazily.
"""

__version__ = "0.3.0"
__all__ = ["Check", "acheck", "check", "edge_key", "ratelimit"]


def __getattr__(name):
    if name == "edge_key":
        from .edge import edge_key

        return edge_key
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quotas' has no attribute {name!r}")
