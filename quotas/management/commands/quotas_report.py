"""Print the admin's reports in a terminal: the same figures as the pages, as table, CSV or JSON."""

from datetime import UTC, datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from quotas.reports import (
    DEFAULT_DAYS,
    REPORTS,
    PeriodError,
    check_period,
    dumps_json,
    run_report,
    to_csv,
    to_text_table,
)


def parse_moment(option, value):
    """An aware datetime from an ISO date or datetime (UTC when no zone is given)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            f"{option} {value!r} is not an ISO date or datetime such as 2026-11-01 "
            "or 2026-11-01T08:00:00+00:00"
        ) from None
    return timezone.make_aware(moment, UTC) if timezone.is_naive(moment) else moment


class Command(BaseCommand):
    help = (
        "Print spend and abuse reports for a date range (default: the last 7 days): "
        f"{', '.join(REPORTS)}."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "names", nargs="*", metavar="report", help="reports to print (default: all)"
        )
        parser.add_argument("--since", help="start (ISO date/datetime, included; UTC default)")
        parser.add_argument("--until", help="end (ISO date/datetime, excluded; default now)")
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
        parser.add_argument(
            "--report",
            choices=sorted(REPORTS),
            action="append",
            help="report to print (repeatable, like the positional names); default: all",
        )

    def handle(self, *args, names, since, until, format, report, **options):
        unknown = [name for name in names if name not in REPORTS]
        if unknown:
            raise CommandError(
                f"unknown report {', '.join(map(repr, unknown))}; choose from {', '.join(REPORTS)}"
            )
        chosen = list(dict.fromkeys([*names, *(report or ())])) or list(REPORTS)
        end = parse_moment("--until", until) if until else timezone.now()
        start = parse_moment("--since", since) if since else end - timedelta(days=DEFAULT_DAYS)
        try:
            period = check_period(start, end)
        except PeriodError as exc:
            raise CommandError(str(exc)) from None
        results = [run_report(name, period) for name in chosen]
        if format == "json":
            self.stdout.write(dumps_json(results), ending="")
        elif format == "csv":
            if len(results) > 1:
                for result in results:
                    self.stdout.write(f"# {result.name}\n{to_csv(result)}\n", ending="")
            else:
                self.stdout.write(to_csv(results[0]), ending="")
        else:
            self.stdout.write("\n".join(to_text_table(r) for r in results), ending="")
