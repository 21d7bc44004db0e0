from django.db import migrations


def load(apps, schema_editor):
    from quotas.defaults import load_defaults

    load_defaults(
        apps.get_model("quotas", "RateLimitRule"),
        apps.get_model("quotas", "BudgetPolicy"),
        apps.get_model("quotas", "ModelPrice"),
        apps.get_model("quotas", "PolicyVersion"),
    )


class Migration(migrations.Migration):
    dependencies = [("quotas", "0001_initial")]

    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
