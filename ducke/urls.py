from django.contrib import admin
from django.urls import include, path

from ducke import views

urlpatterns = [
    path("", views.index, name="index"),
    path("status", views.status, name="status"),
    path("admin/", admin.site.urls),
    path("", include("django_prometheus.urls")),
]
