"""Restore the fresh-install policies that are missing (existing rows are kept)."""

from django.core.management.base import BaseCommand
from django.db import transaction

from quotas.defaults import load_defaults
from quotas.models import (
    BudgetPolicy,
    ModelPrice,
    PolicyVersion,
    RateLimitRule,
    SpendLimit,
    ToolPrice,
)
from quotas.signals import bump_policy_version


class Command(BaseCommand):
    help = (
        "Create any missing default rate-limit rules, budget policy, spend limits and "
        "fresh-install prices."
    )

    def handle(self, *args, **options):
        with transaction.atomic():
            load_defaults(
                RateLimitRule, BudgetPolicy, ModelPrice, PolicyVersion, SpendLimit, ToolPrice
            )
            bump_policy_version()
        self.stdout.write(self.style.SUCCESS("Default policies are in place."))
