"""Top-level URLs: the admin, the events API, webhooks, recipient pages, health."""

from django.contrib import admin
from django.urls import include, path

from mailauto import views

admin.site.site_header = "mailauto"
admin.site.site_title = "mailauto"
admin.site.index_title = "Email automation"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/", views.health, name="health"),
    path("metrics", views.metrics, name="metrics"),
    path("webhooks/", include("webhooks.urls")),
    path("", include("campaigns.urls")),
    path("", include("suppression.urls")),
    path("consent/", include("suppression.consent_urls")),
]
