"""Load a published price sheet into ModelPrice."""

from datetime import datetime

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from quotas.defaults import PRICE_SHEETS, load_price_sheet
from quotas.models import ModelPrice


class Command(BaseCommand):
    help = (
        "Load a price sheet: 'list' (OpenAI's published prices, shared/REALTIME.md) or "
        "'default' (the conservative fresh-install sheet), effective from now or --effective-from."
    )

    def add_arguments(self, parser):
        parser.add_argument("sheet", nargs="?", default="list", choices=sorted(PRICE_SHEETS))
        parser.add_argument(
            "--effective-from",
            help="ISO date or datetime (UTC when no zone is given); default: now.",
        )

    def handle(self, *args, sheet, effective_from, **options):
        when = timezone.now()
        if effective_from:
            try:
                when = datetime.fromisoformat(effective_from)
            except ValueError:
                raise CommandError(
                    f"--effective-from {effective_from!r} is not an ISO date such as 2026-12-01"
                ) from None
            if timezone.is_naive(when):
                when = timezone.make_aware(when, timezone.utc)
        with transaction.atomic():
            created = load_price_sheet(ModelPrice, sheet, when)
        self.stdout.write(
            self.style.SUCCESS(
                f"Loaded {created} price(s) from the {sheet!r} sheet, "
                f"effective {when:%Y-%m-%d %H:%M} UTC."
            )
        )
