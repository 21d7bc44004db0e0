"""Test-only URLconf: /metrics served by the access-controlled view."""

from django.urls import path

from ducke import metrics_access

urlpatterns = [path("metrics", metrics_access.metrics, name="prometheus-django-metrics")]
