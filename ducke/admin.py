"""Login attempts in the admin: axes' pages, view-only, with each row's counts and unlocking."""

from axes.admin import AccessAttemptAdmin, AccessLogAdmin
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from axes.models import AccessAttempt, AccessLog
from axes.utils import reset
from django.contrib import admin
from django.db.models import IntegerField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from ducke.conf import ducke_settings


def _failures_in_window(field, since):
    """Failures of the row's ``field`` value (its username or address) since ``since``."""
    rows = AccessAttempt.objects.filter(**{field: OuterRef(field)})
    if since is not None:
        rows = rows.filter(attempt_time__gte=since)
    total = rows.order_by().values(field).annotate(total=Sum("failures_since_start"))
    return Coalesce(Subquery(total.values("total")), Value(0), output_field=IntegerField())


class LoginAttemptAdmin(AccessAttemptAdmin):
    """Failed logins per username, address and user agent; unlock by username or address."""

    list_display = [
        "attempt_time",
        "username",
        "ip_address",
        "user_agent",
        "failures_since_start",
        "username_failures",
        "address_failures",
    ]
    list_filter = ["attempt_time"]
    actions = ["unlock_usernames", "unlock_addresses", "cleanup_expired_attempts"]

    def get_queryset(self, request):
        cool_off = get_cool_off(request)
        since = timezone.now() - cool_off if cool_off is not None else None
        return (
            super()
            .get_queryset(request)
            .annotate(
                username_total=_failures_in_window("username", since),
                address_total=_failures_in_window("ip_address", since),
            )
        )

    @staticmethod
    def _against_limit(failures, parameter):
        limit = ducke_settings.LOGIN_FAILURE_LIMITS[parameter]
        return f"{failures} / {limit}" + (" locked" if failures >= limit else "")

    @admin.display(description="username failures (cool-off)", ordering="username_total")
    def username_failures(self, obj):
        return self._against_limit(obj.username_total, "username")

    @admin.display(description="address failures (cool-off)", ordering="address_total")
    def address_failures(self, obj):
        return self._against_limit(obj.address_total, "ip_address")

    @admin.action(description="Unlock the usernames of the selected attempts")
    def unlock_usernames(self, request, queryset):
        usernames = {name for name in queryset.values_list("username", flat=True) if name}
        removed = sum(reset(username=username) for username in usernames)
        self.message_user(
            request, f"Unlocked {len(usernames)} username(s); {removed} attempt rows removed."
        )

    @admin.action(description="Unlock the addresses of the selected attempts")
    def unlock_addresses(self, request, queryset):
        addresses = {ip for ip in queryset.values_list("ip_address", flat=True) if ip}
        removed = sum(reset(ip=address) for address in addresses)
        self.message_user(
            request, f"Unlocked {len(addresses)} address(es); {removed} attempt rows removed."
        )

    @admin.action(description="Clean up expired attempts")
    def cleanup_expired_attempts(self, request, queryset):
        # axes 8.3.1's own action fails: the handler reads the attempt time axes sets only on
        # the requests it watches, so give this request those attributes first.
        AxesProxyHandler.update_request(request)
        count = AxesProxyHandler.get_implementation().clean_expired_user_attempts(request)
        self.message_user(request, f"Cleaned up {count} expired access attempts.")

    def has_change_permission(self, request, obj=None):
        return False


class LoginAdmin(AccessLogAdmin):
    """Successful logins and logouts, view-only."""

    def has_change_permission(self, request, obj=None):
        return False


for model, model_admin in ((AccessAttempt, LoginAttemptAdmin), (AccessLog, LoginAdmin)):
    if admin.site.is_registered(model):
        admin.site.unregister(model)
    admin.site.register(model, model_admin)
