"""Admin pages to edit rate-limit rules, model prices and the budget policy."""

from django.contrib import admin

from .models import BudgetPolicy, ModelPrice, RateLimitRule


@admin.register(RateLimitRule)
class RateLimitRuleAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "scope",
        "target",
        "key",
        "limit",
        "window_seconds",
        "enabled",
        "shadow",
    )
    list_editable = ("limit", "window_seconds", "enabled", "shadow")
    list_filter = ("scope", "key", "enabled", "shadow")
    search_fields = ("name", "target")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "effective_from",
        "text_input",
        "cached_text_input",
        "audio_input",
        "cached_audio_input",
        "text_output",
        "audio_output",
        "note",
    )
    list_filter = ("model",)
    search_fields = ("model", "note")
    date_hierarchy = "effective_from"


@admin.register(BudgetPolicy)
class BudgetPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "active",
        "session_cap_usd",
        "session_max_seconds",
        "hourly_cap_usd",
        "breaker_threshold_usd",
        "breaker_cooldown_seconds",
        "max_concurrent_sessions_per_client",
    )
