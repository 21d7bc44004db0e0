"""Admin pages to edit rate-limit rules, model prices and the budget policy."""

from django.contrib import admin

from .models import BudgetPolicy, ModelPrice, RateLimitRule


@admin.register(RateLimitRule)
class RateLimitRuleAdmin(admin.ModelAdmin):
    list_display = ("name", "scope", "target", "key", "limit", "window_seconds", "enabled", "shadow")
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


# -- Ledger (view only) and the breaker reset ---------------------------------------------------

from django.urls import reverse  # noqa: E402
from django.utils.html import format_html  # noqa: E402

from .models import QuotaSession, UsageRecord  # noqa: E402
from .spend import spend_counters  # noqa: E402


class ViewOnlyAdmin(admin.ModelAdmin):
    """The ledger is written by the meter only; the admin may look, never touch."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class UsageRecordInline(admin.TabularInline):
    model = UsageRecord
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("created_at", "kind", "model", "response_id", "cost_usd", "unknown_model")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(QuotaSession)
class QuotaSessionAdmin(ViewOnlyAdmin):
    list_display = ("id", "client", "model", "started_at", "ended_at", "end_reason", "cost_usd")
    list_filter = ("end_reason", "model", ("ended_at", admin.EmptyFieldListFilter))
    search_fields = ("id", "client", "model")
    date_hierarchy = "started_at"
    inlines = [UsageRecordInline]


@admin.register(UsageRecord)
class UsageRecordAdmin(ViewOnlyAdmin):
    list_display = (
        "created_at",
        "kind",
        "model",
        "response_id",
        "cost_usd",
        "unknown_model",
        "session_link",
    )
    list_filter = ("kind", "model", "unknown_model")
    search_fields = ("response_id", "model", "session__id", "session__client")
    date_hierarchy = "created_at"
    list_select_related = ("session",)

    @admin.display(description="session")
    def session_link(self, record):
        url = reverse("admin:quotas_quotasession_change", args=[record.session_id])
        return format_html('<a href="{}">{}</a>', url, record.session_id)


@admin.action(description="Reset circuit breaker")
def reset_circuit_breaker(modeladmin, request, queryset):
    counters = spend_counters()
    shared = counters.reset_breaker()
    where = "on every instance (Redis)" if shared else "in this process (Redis not in use)"
    modeladmin.message_user(
        request,
        f"Circuit breaker reset {where}. A charge while the rolling hour is still over the "
        "threshold opens it again.",
    )


# Registered again as a subclass so the breaker action is added without editing the class.
admin.site.unregister(BudgetPolicy)


@admin.register(BudgetPolicy)
class BudgetPolicyWithBreakerAdmin(BudgetPolicyAdmin):
    actions = [reset_circuit_breaker]
