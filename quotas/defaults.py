"""Fresh-install policies as plain data, and loading them.

Installing ``quotas`` alone loads a neutral set: one active budget policy with the
``DEFAULT_BUDGET`` caps and no rule, spend limit or price. A project declares its own
fresh-install policies with ``QUOTAS_DEFAULT_POLICIES``, the dotted path of a dict::

    {
        "rules": ((name, scope, target, key, limit, window_seconds), ...),
        "budget": {field: value, ...},           # over DEFAULT_BUDGET
        "spend_limits": ((name, key, cap_usd, period, window_seconds), ...),
        "price_sheet": {model: prices, ...},     # or None
        "tool_prices": {tool: usd_per_call, ...},
    }

The data migrations and ``manage.py quotas_load_defaults`` load them; rows that exist are
kept as they are. A sheet's prices are USD per 1M tokens in the order of
``quotas.pricing.TOKEN_KINDS``: text in, cached text in, audio in, cached audio in, text out,
audio out (the Realtime add-on publishes OpenAI's: ``quotas.realtime.prices.PRICE_SHEETS``).
"""

from datetime import UTC, datetime
from decimal import Decimal as D

from django.utils.module_loading import import_string

from .pricing import TOKEN_KINDS

DEFAULT_BUDGET = {
    "name": "default",
    "active": True,
    "session_cap_usd": D("5.00"),
    "session_max_seconds": 1800,
    "hourly_cap_usd": D("50.00"),
    "breaker_threshold_usd": D("100.00"),
    "breaker_cooldown_seconds": 3600,
    "max_concurrent_sessions_per_client": 2,
    "max_output_tokens_per_response": 1000,
}

# Far enough back that every ledger row finds a price.
SHEET_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


NEUTRAL_POLICIES = {
    "rules": (),
    "budget": {},
    "spend_limits": (),
    "price_sheet": None,
    "tool_prices": {},
}


def configured_policies():
    """The fresh-install policies: ``QUOTAS_DEFAULT_POLICIES``, or the neutral set."""
    from .conf import quota_settings

    path = quota_settings.DEFAULT_POLICIES
    declared = import_string(path) if path else {}
    return {**NEUTRAL_POLICIES, **declared}


def load_defaults(
    rule_model,
    budget_model,
    price_model,
    version_model,
    spend_limit_model=None,
    tool_price_model=None,
    policies=None,
):
    """Create the missing fresh-install rules, budget policy, spend limits, price sheet, tool
    prices and version row (``policies``: default ``configured_policies()``).

    Takes the model classes so a data migration can pass its historical models. Existing
    rows (matched by rule or limit name, model or tool + date, any budget policy) are left as
    they are.
    """
    policies = policies or configured_policies()
    if spend_limit_model is not None:
        load_spend_limits(spend_limit_model, policies)
    if tool_price_model is not None:
        load_tool_prices(tool_price_model, policies)
    for name, scope, target, key, limit, window in policies["rules"]:
        rule_model.objects.get_or_create(
            name=name,
            defaults={
                "scope": scope,
                "target": target,
                "key": key,
                "limit": limit,
                "window_seconds": window,
            },
        )
    if not budget_model.objects.exists():
        # A historical model (an early migration) may not have every field yet.
        names = {field.name for field in budget_model._meta.get_fields()}
        budget = {**DEFAULT_BUDGET, **policies["budget"]}
        budget_model.objects.create(**{k: v for k, v in budget.items() if k in names})
    if policies["price_sheet"]:
        load_prices(price_model, policies["price_sheet"], SHEET_EPOCH, note="fresh-install sheet")
    version_model.objects.get_or_create(pk=1, defaults={"version": 1})


def load_prices(price_model, sheet, effective_from, note=""):
    """Insert one sheet's prices (``{model: prices}``) at ``effective_from``; returns how many
    rows were new."""
    created = 0
    for model, prices in sheet.items():
        _, made = price_model.objects.get_or_create(
            model=model,
            effective_from=effective_from,
            defaults={
                **dict(zip(TOKEN_KINDS, prices, strict=True)),
                "note": note,
            },
        )
        created += made
    return created


def load_spend_limits(spend_limit_model, policies=None):
    """Create the fresh-install spend limits that are missing (by name)."""
    policies = policies or configured_policies()
    for name, key, cap, period, window in policies["spend_limits"]:
        spend_limit_model.objects.get_or_create(
            name=name,
            defaults={"key": key, "cap_usd": cap, "period": period, "window_seconds": window},
        )


def load_tool_prices(tool_price_model, policies=None):
    """Create the fresh-install per-call tool prices that are missing."""
    policies = policies or configured_policies()
    for tool, price in policies["tool_prices"].items():
        tool_price_model.objects.get_or_create(
            tool=tool,
            effective_from=SHEET_EPOCH,
            defaults={"per_call_usd": price, "note": "fresh-install price"},
        )
