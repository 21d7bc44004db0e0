from django.apps import AppConfig


class DuckeConfig(AppConfig):
    name = "ducke"
    verbose_name = "DUCK-E"

    def ready(self):
        from . import checks, metrics_access  # noqa: F401 - register system checks
