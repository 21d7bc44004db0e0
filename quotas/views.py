"""Report pages in the admin: an index and one page per report, each with CSV export.

Mixed into the ``Reports`` ModelAdmin, whose ``get_urls()`` puts these paths first, so they
live under ``/admin/quotas/reports/``. Anonymous users are sent to the admin login; signed-in
users who are not staff get 403 (the admin's own check would send them back to the login
page, which they have passed already).
"""

from datetime import timedelta
from functools import update_wrapper
from urllib.parse import urlencode

from django import forms
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from .charts import render_chart
from .reports import DEFAULT_DAYS, REPORTS, PeriodError, cells, check_period, run_report, to_csv


class ReportRangeForm(forms.Form):
    """The date range of a report: both ends optional, the last 7 days by default."""

    since = forms.DateTimeField(
        label="From",
        required=False,
        help_text="e.g. 2026-11-01 or 2026-11-01 08:00 (UTC)",
        widget=forms.DateTimeInput(attrs={"placeholder": "YYYY-MM-DD HH:MM"}),
    )
    until = forms.DateTimeField(
        label="To (not included)",
        required=False,
        widget=forms.DateTimeInput(attrs={"placeholder": "YYYY-MM-DD HH:MM"}),
    )

    def __init__(self, data=None, *, now=None):
        super().__init__(data)
        now = now or timezone.now()
        # The next whole minute: the range shown in the form (to the minute) is then exact.
        self.now = now.replace(second=0, microsecond=0) + timedelta(minutes=1)

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        since, until = cleaned.get("since"), cleaned.get("until")
        default = timedelta(days=DEFAULT_DAYS)
        until = until or (since + default if since else self.now)
        since = since or until - default
        try:
            cleaned["period"] = check_period(since, until)
        except PeriodError as exc:
            raise forms.ValidationError(str(exc)) from None
        return cleaned


def _shown(moment):
    moment = timezone.localtime(moment)
    if moment.second or moment.microsecond:
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f")
    return moment.strftime("%Y-%m-%d %H:%M")


def _initial(period):
    return {"since": _shown(period.since), "until": _shown(period.until)}


class ReportViews:
    """ModelAdmin mixin: the reports index and report pages (staff only)."""

    def get_urls(self):
        def wrap(view):
            guarded = self.admin_site.admin_view(view)

            def staff_only(request, *args, **kwargs):
                user = request.user
                if user.is_authenticated and not (user.is_active and user.is_staff):
                    raise PermissionDenied("The reports are for staff only.")
                return guarded(request, *args, **kwargs)

            return update_wrapper(staff_only, view)

        info = self.opts.app_label
        mine = [
            path("", wrap(self.reports_index_view), name=f"{info}_reports_changelist"),
            path("<slug:name>/", wrap(self.report_view), name=f"{info}_report"),
        ]
        return mine + super().get_urls()

    def _context(self, request, **extra):
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "reports": list(REPORTS.values()),
            **extra,
        }

    def reports_index_view(self, request):
        """The list of every report, with its description."""
        context = self._context(request, title="Reports")
        return TemplateResponse(request, "admin/quotas/reports/index.html", context)

    def report_view(self, request, name):
        """One report: range form, chart, table; ``?format=csv`` downloads the table."""
        report = REPORTS.get(name)
        if report is None:
            raise Http404(f"No report named {name!r}.")
        bound = {k: v for k, v in request.GET.items() if k in ("since", "until") and v.strip()}
        form = ReportRangeForm(bound)
        wants_csv = request.GET.get("format") == "csv"
        if not form.is_valid():
            problems = " ".join(str(e) for errors in form.errors.values() for e in errors)
            if wants_csv:
                return HttpResponse(
                    f"Bad date range: {problems}\n", status=400, content_type="text/plain"
                )
            context = self._context(
                request, title=report.title, report=report, form=form, problems=problems
            )
            return TemplateResponse(
                request, "admin/quotas/reports/report.html", context, status=400
            )
        period = form.cleaned_data["period"]
        result = run_report(name, period)
        if wants_csv:
            response = HttpResponse(to_csv(result), content_type="text/csv; charset=utf-8")
            stamp = f"{period.since:%Y%m%d%H%M}-{period.until:%Y%m%d%H%M}"
            response["Content-Disposition"] = f'attachment; filename="{name}-{stamp}.csv"'
            return response
        context = self._context(
            request,
            title=report.title,
            report=report,
            form=ReportRangeForm(_initial(period)),
            result=result,
            table=cells(result),
            # The CSP nonce of a middleware that sets one (DUCK-E's, django-csp), else none.
            chart_svg=render_chart(result, nonce=str(getattr(request, "csp_nonce", "") or "")),
            csv_query=urlencode({**_initial(period), "format": "csv"}),
        )
        return TemplateResponse(request, "admin/quotas/reports/report.html", context)
