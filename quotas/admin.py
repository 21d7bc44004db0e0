"""Admin pages to edit rate-limit rules, model prices and the budget policy, the read-only
ledger and event records, and the reports under ``/admin/quotas/reports/``."""

from django.contrib import admin, messages

from .models import BudgetPolicy, ModelPrice, PolicyChange, RateLimitRule, SpendLimit, ToolPrice
from .signals import acting_as


class PolicyHistoryAdmin(admin.ModelAdmin):
    """Attributes saves and deletes to the admin user, and shows them in the object history."""

    def save_model(self, request, obj, form, change):
        with acting_as(request.user.get_username()):
            super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        with acting_as(request.user.get_username()):
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with acting_as(request.user.get_username()):
            super().delete_queryset(request, queryset)

    def history_view(self, request, object_id, extra_context=None):
        changes = PolicyChange.objects.filter(
            object_type=self.opts.label_lower, object_id=str(object_id)
        )[:100]
        extra_context = {**(extra_context or {}), "policy_changes": changes}
        return super().history_view(request, object_id, extra_context)


@admin.register(RateLimitRule)
class RateLimitRuleAdmin(PolicyHistoryAdmin):
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
class ModelPriceAdmin(PolicyHistoryAdmin):
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
class BudgetPolicyAdmin(PolicyHistoryAdmin):
    list_display = (
        "name",
        "active",
        "session_cap_usd",
        "session_max_seconds",
        "hourly_cap_usd",
        "breaker_threshold_usd",
        "breaker_cooldown_seconds",
        "max_concurrent_sessions_per_client",
        "max_output_tokens_per_response",
    )

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        for warning in obj.warnings():
            self.message_user(request, warning, level=messages.WARNING)


@admin.register(SpendLimit)
class SpendLimitAdmin(PolicyHistoryAdmin):
    list_display = (
        "name",
        "key",
        "cap_usd",
        "period",
        "window_seconds",
        "group",
        "alert_at_percent",
        "enabled",
        "shadow",
    )
    list_editable = ("cap_usd", "enabled", "shadow")
    list_filter = ("key", "period", "enabled", "shadow", "group")
    search_fields = ("name",)


@admin.register(ToolPrice)
class ToolPriceAdmin(PolicyHistoryAdmin):
    list_display = ("tool", "effective_from", "per_call_usd", "note")
    list_filter = ("tool",)
    search_fields = ("tool", "note")
    date_hierarchy = "effective_from"


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
    fields = (
        "created_at",
        "kind",
        "model",
        "response_id",
        "cost_usd",
        "estimated",
        "unknown_model",
    )
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(QuotaSession)
class QuotaSessionAdmin(ViewOnlyAdmin):
    list_display = (
        "id",
        "client",
        "user",
        "model",
        "started_at",
        "ended_at",
        "end_reason",
        "cost_usd",
    )
    list_filter = (
        "end_reason",
        "model",
        ("ended_at", admin.EmptyFieldListFilter),
        ("user", admin.RelatedOnlyFieldListFilter),
    )
    search_fields = ("id", "client", "model", "user__username", "user__email")
    list_select_related = ("user",)
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
        "estimated",
        "unknown_model",
        "session_link",
    )
    list_filter = ("kind", "model", "estimated", "unknown_model")
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
    shared = counters.reset_breaker(actor=request.user.get_username())
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


# -- Events (view only) ---------------------------------------------------------------------

from .models import (  # noqa: E402
    BreakerEvent,
    RateLimitViolation,
    Reports,
    ToolCallCount,
)
from .views import ReportViews  # noqa: E402


@admin.register(RateLimitViolation)
class RateLimitViolationAdmin(ViewOnlyAdmin):
    list_display = ("minute", "rule", "scope", "endpoint", "shadow", "count")
    list_filter = ("scope", "shadow", "rule")
    search_fields = ("rule", "endpoint")
    date_hierarchy = "minute"


@admin.register(ToolCallCount)
class ToolCallCountAdmin(ViewOnlyAdmin):
    list_display = ("minute", "tool", "status", "count")
    list_filter = ("tool", "status")
    search_fields = ("tool",)
    date_hierarchy = "minute"


@admin.register(BreakerEvent)
class BreakerEventAdmin(ViewOnlyAdmin):
    list_display = ("at", "kind", "hour_cost_usd", "threshold_usd", "actor", "engine")
    list_filter = ("kind", "engine")
    search_fields = ("actor",)
    date_hierarchy = "at"


@admin.register(PolicyChange)
class PolicyChangeAdmin(ViewOnlyAdmin):
    list_display = ("at", "actor", "action", "object_type", "object_repr", "fields_changed")
    list_filter = ("action", "object_type", "actor")
    search_fields = ("object_repr", "object_id", "actor")
    date_hierarchy = "at"
    readonly_fields = (
        "at",
        "actor",
        "action",
        "object_type",
        "object_id",
        "object_repr",
        "before",
        "after",
    )

    @admin.display(description="fields")
    def fields_changed(self, change):
        return ", ".join(change.changed_fields)


@admin.register(Reports)
class ReportsAdmin(ReportViews, ViewOnlyAdmin):
    """The reports index and pages, under /admin/quotas/reports/ (staff only)."""

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_staff
