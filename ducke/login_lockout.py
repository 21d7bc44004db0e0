"""Admin login lockout on django-axes 8.3, with one failure limit per lockout parameter.

Axes counts failed logins in its database table ``AccessAttempt`` (one row per username,
address and user agent) and, for each entry of ``AXES_LOCKOUT_PARAMETERS``, sums the failures
within ``AXES_COOLOFF_TIME``. It then compares the largest sum against a single
``AXES_FAILURE_LIMIT``; it has no limit per parameter. DUCK-E wants two: 5 failures lock a
username (from any address), 20 lock an address (for any usernames), as set in
``DUCKE_LOGIN_FAILURE_LIMITS`` (``ducke.conf``) (keyed by lockout parameter).

Both places where axes decides are ``get_failures(request) >= get_failure_limit(request)``:
the check before authentication (``is_locked``) and the one after recording a failure
(``user_login_failed``). So the two are answered together, for the same parameter: the one
with the fewest failures left before its own limit. ``LoginLockoutHandler.get_failures``
returns that parameter's failures and ``failure_limit`` (``AXES_FAILURE_LIMIT``) its limit;
their comparison is true exactly when some parameter has reached its limit. Everything else
(recording, cool-off, reset commands, signals, the admin) stays axes' own code.

A locked-out attempt is refused by ``axes.backends.AxesStandaloneBackend`` before
``ModelBackend`` runs, so it costs no password hashing; ``lockout_response`` answers it with
429, ``Retry-After`` and a page saying when the lock ends.
"""

import math
from dataclasses import dataclass

from axes.handlers.database import AxesDatabaseHandler
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_client_username, get_cool_off, get_lockout_parameters
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib import admin
from django.db.models import QuerySet, Sum
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from ducke.conf import ducke_settings
from quotas.middleware import request_client_address, request_client_ip

# What the lockout page calls each parameter.
PARAMETER_NAMES = {"username": "this username", "ip_address": "your address"}


def client_identity(request):
    """``AXES_CLIENT_IP_CALLABLE``: the address failures count under, as quotas counts clients.

    That is the trusted-proxy-aware client address widened to its network (an IPv6 /64 by
    default), so one household cannot rotate through its /64 to guess on. The network is
    recorded as its first address (``2001:db8:1:2::``): axes stores an IP address field,
    which PostgreSQL will not fill with a network. A peer that is no IP address (a unix
    socket) gives None.
    """
    if request_client_address(request) is None:
        return None
    network, _, _prefix = request_client_ip(request).partition("/")
    return network


@dataclass(frozen=True)
class FailureCount:
    """The failures of one lockout parameter within the cool-off, against its own limit."""

    parameter: str
    failures: int
    limit: int
    attempts: QuerySet

    @property
    def left(self):
        return self.limit - self.failures

    @property
    def locked(self):
        return self.failures >= self.limit


def _parameter_name(parameter):
    # A combined parameter such as ["username", "ip_address"] is keyed "username+ip_address".
    return parameter if isinstance(parameter, str) else "+".join(parameter)


class LoginLockoutHandler(AxesDatabaseHandler):
    """Axes' database handler with one failure limit per lockout parameter."""

    def failure_counts(self, request, credentials=None):
        """One ``FailureCount`` per ``AXES_LOCKOUT_PARAMETERS`` entry, in that order."""
        limits = ducke_settings.LOGIN_FAILURE_LIMITS
        names = [_parameter_name(p) for p in get_lockout_parameters(request, credentials)]
        counts = []
        for name, attempts in zip(names, self.get_user_attempts(request, credentials), strict=True):
            failures = attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0
            counts.append(FailureCount(name, failures, limits[name], attempts))
        return counts

    def tightest(self, request, credentials=None):
        """The parameter with the fewest failures left (a locked one, if any is locked)."""
        return min(self.failure_counts(request, credentials), key=lambda count: count.left)

    def get_failures(self, request, credentials=None):
        return self.tightest(request, credentials).failures

    def is_locked(self, request, credentials=None):
        # Same answer as axes' own get_failures() >= get_failure_limit(), with half the queries.
        return settings.AXES_LOCK_OUT_AT_FAILURE and self.tightest(request, credentials).locked

    def lockout(self, request, credentials=None):
        """``(locked parameters, when the lock ends)``; the end is None without a cool-off."""
        cool_off = get_cool_off(request)
        locked = [count for count in self.failure_counts(request, credentials) if count.locked]
        ends = [_unlocked_at(count, cool_off) for count in locked] if cool_off is not None else []
        return [count.parameter for count in locked], max(ends, default=None)

    def reset_user_attempts(self, request, credentials=None):
        """After a successful login (``AXES_RESET_ON_SUCCESS``), forget that username's failures.

        Axes would also clear every failure counted for the address, so anyone holding one
        account could wipe an address's count for guesses at other usernames by signing in.
        """
        username = get_client_username(request, credentials)
        count, _ = AccessAttempt.objects.filter(username=username).delete()
        return count


def _unlocked_at(count, cool_off):
    """When enough of the oldest rows leave the cool-off window for ``count`` to unlock.

    Each row leaves ``cool_off`` after its last failure (``attempt_time``), oldest first.
    """
    failures = count.failures
    rows = count.attempts.order_by("attempt_time").values_list(
        "attempt_time", "failures_since_start"
    )
    for attempt_time, row_failures in rows:
        failures -= row_failures
        if failures < count.limit:
            return attempt_time + cool_off
    raise AssertionError("a locked count always unlocks once its rows are gone")


def _handler():
    return AxesProxyHandler.get_implementation()


def failure_limit(request, credentials=None):
    """``AXES_FAILURE_LIMIT``: the limit of the parameter ``get_failures`` reports."""
    return _handler().tightest(request, credentials).limit


def lockout_response(request, original_response=None, credentials=None):
    """``AXES_LOCKOUT_CALLABLE``: 429 with ``Retry-After`` and when to try again.

    HTML for the admin login form, JSON for a client that prefers it. The credentials come
    from ``request.axes_credentials``: axes' async middleware passes them in the wrong slot.
    """
    credentials = getattr(request, "axes_credentials", None)
    now = getattr(request, "axes_attempt_time", None) or timezone.now()
    locked, until = _handler().lockout(request, credentials)
    retry_after = None
    if until is not None:
        retry_after = max(1, math.ceil((until - now).total_seconds()))
    reasons = [PARAMETER_NAMES.get(parameter, parameter) for parameter in locked]
    detail = _detail(reasons, retry_after, until)
    if request.get_preferred_type(["text/html", "application/json"]) == "application/json":
        response = JsonResponse(
            {"error": "locked_out", "detail": detail, "retry_after": retry_after}, status=429
        )
    else:
        context = {
            **admin.site.each_context(request),
            "title": "Too many failed logins",
            "detail": detail,
            "until": until,
        }
        response = TemplateResponse(request, "ducke/login_locked_out.html", context, status=429)
        response.render()
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def _detail(reasons, retry_after, until):
    who = " and ".join(reasons) or "this login"
    if retry_after is None:
        return f"Too many failed logins for {who}. Ask an operator to unlock it."
    minutes = math.ceil(retry_after / 60)
    when = timezone.localtime(until).strftime("%H:%M %Z")
    unit = "minute" if minutes == 1 else "minutes"
    return (
        f"Too many failed logins for {who}. Try again in {minutes} {unit} "
        f"(after {when}), or ask an operator to unlock it."
    )
