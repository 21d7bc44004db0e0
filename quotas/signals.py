"""On every policy change (rule, price, budget, spend limit): bump the version, record history.

The version bump makes every process reload its snapshot. The history (``PolicyChange``)
keeps who changed what, with the fields before and after. The admin names the user through
``acting_as()``; a change from anywhere else (shell, migration, another process) is "system".
"""

import contextlib
import contextvars
import json
from decimal import Decimal

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import F
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver
from django.utils import timezone

from .models import (
    BudgetPolicy,
    ModelPrice,
    PolicyChange,
    PolicyVersion,
    RateLimitRule,
    SpendLimit,
    ToolPrice,
)
from .policies import policy_cache

SYSTEM_ACTOR = "system"
_actor = contextvars.ContextVar("quotas_policy_actor", default=SYSTEM_ACTOR)


@contextlib.contextmanager
def acting_as(actor):
    """Attribute policy changes made inside the block to ``actor`` (an admin username)."""
    token = _actor.set(str(actor or SYSTEM_ACTOR)[:150])
    try:
        yield
    finally:
        _actor.reset(token)


def bump_policy_version():
    """Advance the shared version so every process reloads its snapshot."""
    updated = PolicyVersion.objects.filter(pk=1).update(
        version=F("version") + 1, changed_at=timezone.now()
    )
    if not updated:
        PolicyVersion.objects.get_or_create(pk=1, defaults={"version": 1})
    policy_cache.invalidate()
    transaction.on_commit(policy_cache.invalidate)


def policy_fields(instance):
    """The editable fields of a policy object as JSON-ready values (no id, no timestamps)."""
    values = {}
    for field in instance._meta.concrete_fields:
        if field.primary_key or getattr(field, "auto_now", False):
            continue
        value = field.value_from_object(instance)
        if isinstance(value, Decimal) and getattr(field, "decimal_places", None) is not None:
            # As stored: 50 and 50.000000 are the same price, not a change.
            value = value.quantize(Decimal(1).scaleb(-field.decimal_places))
        values[field.name] = value
    return json.loads(json.dumps(values, cls=DjangoJSONEncoder))


def record_policy_change(instance, action, before, after):
    """Write one ``PolicyChange`` row; a save that changed nothing is not recorded."""
    if action == PolicyChange.Action.CHANGED and before == after:
        return None
    return PolicyChange.objects.create(
        actor=_actor.get(),
        object_type=instance._meta.label_lower,
        object_id=str(instance.pk),
        object_repr=str(instance)[:200],
        action=action,
        before=before,
        after=after,
    )


@receiver(pre_save, sender=RateLimitRule)
@receiver(pre_save, sender=ModelPrice)
@receiver(pre_save, sender=BudgetPolicy)
@receiver(pre_save, sender=SpendLimit)
@receiver(pre_save, sender=ToolPrice)
def remember_policy_before(sender, instance, raw=False, **kwargs):
    """Keep the stored fields of an object about to be saved, for its history row."""
    before = None
    if instance.pk is not None and not raw:
        stored = sender._default_manager.filter(pk=instance.pk).first()
        before = policy_fields(stored) if stored is not None else None
    instance._quotas_before = before


@receiver(post_save, sender=RateLimitRule)
@receiver(post_save, sender=ModelPrice)
@receiver(post_save, sender=BudgetPolicy)
@receiver(post_save, sender=SpendLimit)
@receiver(post_save, sender=ToolPrice)
@receiver(post_delete, sender=RateLimitRule)
@receiver(post_delete, sender=ModelPrice)
@receiver(post_delete, sender=BudgetPolicy)
@receiver(post_delete, sender=SpendLimit)
@receiver(post_delete, sender=ToolPrice)
def policy_changed(sender, instance=None, created=False, raw=False, **kwargs):
    bump_policy_version()
    if instance is None or raw:
        return
    if kwargs.get("signal") is post_delete:
        record_policy_change(instance, PolicyChange.Action.DELETED, policy_fields(instance), None)
        return
    before = getattr(instance, "_quotas_before", None)
    action = (
        PolicyChange.Action.CREATED if created or before is None else PolicyChange.Action.CHANGED
    )
    record_policy_change(instance, action, before, policy_fields(instance))
    instance._quotas_before = policy_fields(instance)
