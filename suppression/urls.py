"""Recipient pages, under the site root: /u/<token>/ (unsubscribe and RFC 8058 one-click)
and /preferences/<token>/ (the preference centre)."""

from django.urls import path

from suppression import views

app_name = "suppression"
urlpatterns = [
    path("u/<str:token>/", views.unsubscribe, name="unsubscribe"),
    path("preferences/<str:token>/", views.preferences, name="preferences"),
]
