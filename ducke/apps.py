from django.apps import AppConfig


class DuckeConfig(AppConfig):
    name = "ducke"
    verbose_name = "DUCK-E"

    def ready(self):
        from . import checks  # noqa: F401 - registers the environment check
