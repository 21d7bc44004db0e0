from django.contrib import admin
from django.urls import path

from ducke import metrics_access, views

urlpatterns = [
    path("", views.index, name="index"),
    path("status", views.status, name="status"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_access.metrics, name="prometheus-django-metrics"),
]
