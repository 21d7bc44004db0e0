"""Settings of the reuse project: Django, Channels and quotas, nothing of DUCK-E."""

import os

SECRET_KEY = "reuse-project-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "quotas",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "quotas.middleware.RateLimitMiddleware",
]
ROOT_URLCONF = "tests.reuse.urls"
ASGI_APPLICATION = "tests.reuse.asgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Redis when the environment names one (CI's second pass), else in-process counters.
QUOTAS_REDIS_URL = os.environ.get("REDIS_URL", "")
QUOTAS_KEY_PREFIX = f"quotas-reuse-{os.getpid()}"
QUOTAS_EVENT_FLUSH_SECONDS = 0
QUOTAS_SPEND_SWEEP_SECONDS = 0
QUOTAS_SERVICE_NAME = "Reuse Demo"
