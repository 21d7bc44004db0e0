from django.contrib import admin
from django.urls import path

from tests.reuse import views

urlpatterns = [
    path("search", views.search, name="search"),
    path("export", views.export, name="export"),
    path("status", views.status, name="status"),
    path("admin/", admin.site.urls),
]
