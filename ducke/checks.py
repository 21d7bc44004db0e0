"""System checks for DUCK-E's environment variables."""

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register(Tags.compatibility)
def check_environment(app_configs, **kwargs):
    """Report each environment variable whose value could not be parsed (ducke.E001)."""
    messages = [
        Error(
            f"Environment variable {name} has a bad value: {problem}",
            hint=f"Fix or unset {name}; see README 'Configure'.",
            id="ducke.E001",
        )
        for name, problem in getattr(settings, "ENVIRONMENT_ERRORS", [])
    ]
    if not settings.DEBUG and settings.SECRET_KEY.startswith("insecure-dev-key"):
        messages.append(
            Warning(
                "DJANGO_SECRET_KEY is not set; a development key is in use.",
                hint="Set DJANGO_SECRET_KEY to a long random value in production.",
                id="ducke.W001",
            )
        )
    return messages
