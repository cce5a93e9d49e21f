"""The tracking events admin: a read-only list with filters and exact search."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.urls import reverse

from tests.webhooks.postmark import WebhookTestCase, for_message, payload
from webhooks.models import TrackingEvent

CHANGELIST = reverse("admin:webhooks_trackingevent_changelist")


class TrackingEventAdminTests(WebhookTestCase):
    def setUp(self) -> None:
        user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
        self.client.force_login(user)
        self.message_sent = self.message()
        self.assertAccepted(self.post(for_message("delivery", self.message_sent)))
        self.assertAccepted(self.post(payload("bounce")))  # for no message of ours
        self.delivery = TrackingEvent.objects.get(event_type="delivered")
        self.bounce = TrackingEvent.objects.get(event_type="bounced")

    def test_the_list_shows_events_with_a_link_to_their_message(self) -> None:
        response = self.client.get(CHANGELIST)
        self.assertEqual(response.status_code, 200)
        message_url = reverse("admin:campaigns_message_change", args=[self.message_sent.pk])
        self.assertContains(response, f'href="{message_url}"')
        self.assertContains(response, "john@example.com")
        self.assertContains(response, "ada@example.com")

    def test_filters_by_esp_and_event_type(self) -> None:
        response = self.client.get(CHANGELIST, {"event_type__exact": "bounced", "esp__exact": "postmark"})
        self.assertEqual(list(response.context["cl"].queryset), [self.bounce])

    def test_search_by_exact_esp_message_id(self) -> None:
        response = self.client.get(CHANGELIST, {"q": self.message_sent.esp_message_id})
        self.assertEqual(list(response.context["cl"].queryset), [self.delivery])
        response = self.client.get(CHANGELIST, {"q": self.message_sent.esp_message_id[:8]})
        self.assertEqual(list(response.context["cl"].queryset), [])

    def test_events_are_read_only(self) -> None:
        change = reverse("admin:webhooks_trackingevent_change", args=[self.delivery.pk])
        response = self.client.get(change)
        self.assertEqual(response.status_code, 200)
        self.assertNotContains(response, 'name="_save"')
        self.assertContains(response, "Test delivery webhook details")
        self.assertEqual(self.client.post(change, {"esp": "x"}).status_code, 403)
        self.assertEqual(self.client.get(reverse("admin:webhooks_trackingevent_add")).status_code, 403)
        delete = reverse("admin:webhooks_trackingevent_delete", args=[self.delivery.pk])
        self.assertEqual(self.client.post(delete, {"post": "yes"}).status_code, 403)
        self.assertEqual(TrackingEvent.objects.count(), 2)
