"""The one receiver of Anymail's `tracking` signal (connected in WebhooksConfig.ready)."""

from __future__ import annotations

from typing import Any

from anymail.signals import AnymailTrackingEvent

from webhooks.services import esp_slug, tracking_event_record


def tracking_received(sender: object, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """Anymail sends this once per event from its tracking webhook views.

    Exceptions propagate on purpose: the view then answers 500 and the ESP retries later
    (anymail/webhooks/base.py, AnymailCoreWebhookView.post), which is what a database
    outage needs; the retry is harmless because events are deduplicated.
    """
    # Our views carry the URL's ESP name ("amazon_ses"); Anymail's display name
    # ("Amazon SES") is the fallback for a signal sent from anywhere else.
    esp = getattr(sender, "esp_slug", None) or esp_slug(esp_name)
    tracking_event_record(esp=esp, event=event)
