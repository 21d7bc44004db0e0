"""Delete quota events (and, when asked, ledger rows) older than the retention period."""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from quotas.conf import quota_settings
from quotas.models import (
    BreakerEvent,
    QuotaSession,
    RateLimitViolation,
    ToolCallCount,
    UsageRecord,
)


def prune_querysets(cutoff, *, ledger=False):
    """(label, queryset) pairs of the rows older than ``cutoff``, in a safe deletion order."""
    pairs = [
        ("rate-limit violation rows", RateLimitViolation.objects.filter(minute__lt=cutoff)),
        ("tool-call count rows", ToolCallCount.objects.filter(minute__lt=cutoff)),
        ("breaker events", BreakerEvent.objects.filter(at__lt=cutoff)),
    ]
    if ledger:
        old_usage = UsageRecord.objects.filter(created_at__lt=cutoff)
        newer_usage = UsageRecord.objects.filter(session=OuterRef("pk"), created_at__gte=cutoff)
        # A session goes only when it ended before the cutoff and keeps no newer usage.
        old_sessions = QuotaSession.objects.filter(
            started_at__lt=cutoff, ended_at__lt=cutoff
        ).exclude(Exists(newer_usage))
        pairs += [("usage records", old_usage), ("sessions", old_sessions)]
    return pairs


class Command(BaseCommand):
    help = (
        "Delete rate-limit violation, tool-call and breaker events older than "
        "QUOTAS_EVENT_RETENTION_DAYS (or --days). Policy history is kept. "
        "--ledger also deletes ledger rows (usage records, ended sessions) that old."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, help="retention in days (default: the setting)")
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument(
            "--ledger",
            action="store_true",
            help="also delete usage records and ended sessions older than the retention",
        )

    def handle(self, *args, days, dry_run, ledger, **options):
        days = quota_settings.EVENT_RETENTION_DAYS if days is None else days
        try:
            days = int(days)
        except (TypeError, ValueError):
            raise CommandError(f"retention must be a whole number of days, got {days!r}") from None
        if days < 1:
            raise CommandError("retention must be at least 1 day")
        cutoff = timezone.now() - timedelta(days=days)
        verb = "would delete" if dry_run else "deleted"
        with transaction.atomic():
            for label, queryset in prune_querysets(cutoff, ledger=ledger):
                if dry_run:
                    count = queryset.count()
                else:
                    count = queryset.delete()[0]
                self.stdout.write(f"{verb} {count} {label}")
        self.stdout.write(
            self.style.SUCCESS(f"older than {cutoff:%Y-%m-%d %H:%M} UTC ({days} days)")
        )
