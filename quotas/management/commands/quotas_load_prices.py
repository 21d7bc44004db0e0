"""Load one of the Realtime add-on's price sheets (``quotas.realtime.prices``) into ModelPrice."""

from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from quotas.models import ModelPrice


class Command(BaseCommand):
    help = (
        "Load a price sheet: 'list' (OpenAI's published prices, shared/REALTIME.md) or "
        "'default' (the conservative fresh-install sheet), effective from now or --effective-from."
    )

    def add_arguments(self, parser):
        from quotas.realtime.prices import PRICE_SHEETS  # the add-on, only when run

        parser.add_argument("sheet", nargs="?", default="list", choices=sorted(PRICE_SHEETS))
        parser.add_argument(
            "--effective-from",
            help="ISO date or datetime (UTC when no zone is given); default: now.",
        )

    def handle(self, *args, sheet, effective_from, **options):
        from quotas.realtime.prices import load_price_sheet

        when = timezone.now()
        if effective_from:
            try:
                when = datetime.fromisoformat(effective_from)
            except ValueError:
                raise CommandError(
                    f"--effective-from {effective_from!r} is not an ISO date such as 2026-12-01"
                ) from None
            if timezone.is_naive(when):
                when = timezone.make_aware(when, UTC)
        with transaction.atomic():
            created = load_price_sheet(ModelPrice, sheet, when)
        self.stdout.write(
            self.style.SUCCESS(
                f"Loaded {created} price(s) from the {sheet!r} sheet, "
                f"effective {when:%Y-%m-%d %H:%M} UTC."
            )
        )
