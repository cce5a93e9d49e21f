"""Recipient-facing consent pages, mounted by the project under /consent/."""

from django.urls import path

from suppression import consent_views

app_name = "consent"
urlpatterns = [
    path("confirm/<str:token>/", consent_views.consent_confirm_view, name="confirm"),
]
