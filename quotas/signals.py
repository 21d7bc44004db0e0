"""Bump the policy version whenever a rule, price or budget policy changes."""

from django.db import transaction
from django.db.models import F
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from .models import BudgetPolicy, ModelPrice, PolicyVersion, RateLimitRule
from .policies import policy_cache


def bump_policy_version():
    """Advance the shared version so every process reloads its snapshot."""
    updated = PolicyVersion.objects.filter(pk=1).update(
        version=F("version") + 1, changed_at=timezone.now()
    )
    if not updated:
        PolicyVersion.objects.get_or_create(pk=1, defaults={"version": 1})
    policy_cache.invalidate()
    transaction.on_commit(policy_cache.invalidate)


@receiver(post_save, sender=RateLimitRule)
@receiver(post_save, sender=ModelPrice)
@receiver(post_save, sender=BudgetPolicy)
@receiver(post_delete, sender=RateLimitRule)
@receiver(post_delete, sender=ModelPrice)
@receiver(post_delete, sender=BudgetPolicy)
def policy_changed(sender, **kwargs):
    bump_policy_version()
