from django.urls import path

from campaigns import views

app_name = "campaigns"
urlpatterns = [
    path("api/events/", views.events_api, name="events-api"),
]
