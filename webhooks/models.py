"""The deduplicated store of ESP tracking events: one row per ESP event, however many
times the ESP posts it."""

from __future__ import annotations

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q
from django.utils import timezone


class TrackingEvent(models.Model):
    """One delivery or engagement event an ESP reported through its tracking webhook."""

    class EventType(models.TextChoices):
        # Anymail's normalized event types (anymail.signals.EventType), stored as Anymail
        # names them; an event type a later Anymail adds is stored as "unknown".
        QUEUED = "queued", "queued by the ESP"
        SENT = "sent", "sent by the ESP"
        REJECTED = "rejected", "rejected by the ESP"
        FAILED = "failed", "failed at the ESP"
        BOUNCED = "bounced", "bounced"
        DEFERRED = "deferred", "deferred"
        DELIVERED = "delivered", "delivered"
        AUTORESPONDED = "autoresponded", "auto-responded"
        OPENED = "opened", "opened"
        CLICKED = "clicked", "clicked"
        COMPLAINED = "complained", "complained (spam)"
        UNSUBSCRIBED = "unsubscribed", "unsubscribed"
        SUBSCRIBED = "subscribed", "subscribed"
        UNKNOWN = "unknown", "unknown"

    class BounceKind(models.TextChoices):
        HARD = "hard", "hard"
        SOFT = "soft", "soft"

    esp = models.CharField(max_length=32, help_text="The ESP, as in /webhooks/<esp>/tracking/.")
    esp_event_id = models.CharField(
        max_length=255,
        help_text="The ESP's event id, or 'sha256:' and a hash of the raw event where the ESP gives none.",
    )
    event_type = models.CharField(max_length=20, choices=EventType.choices)
    bounce_kind = models.CharField(
        max_length=4,
        choices=BounceKind.choices,
        blank=True,
        help_text="For bounces: hard (the address is dead) or soft (try again later). "
        "Empty for a bounce that says nothing about the address (virus, spam filter, ISP block).",
    )
    message = models.ForeignKey(
        "campaigns.Message",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="tracking_events",
        help_text="Empty when the event names no message we sent.",
    )
    esp_message_id = models.CharField(max_length=255, blank=True)
    recipient = models.CharField(max_length=254, blank=True, help_text="Lower case.")
    occurred_at = models.DateTimeField(help_text="When the ESP says it happened (else when we received it).")
    received_at = models.DateTimeField(default=timezone.now)
    description = models.TextField(blank=True)
    mta_response = models.TextField(blank=True)
    reject_reason = models.CharField(max_length=20, blank=True)
    click_url = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    esp_event = models.JSONField(
        default=dict, blank=True, encoder=DjangoJSONEncoder, help_text="The event exactly as the ESP sent it."
    )

    class Meta:
        ordering = ["-id"]
        constraints = [
            # The deduplication: ESPs retry webhooks, and a replay must change nothing.
            models.UniqueConstraint(fields=["esp", "esp_event_id"], name="tracking_event_esp_event_unique"),
        ]
        indexes = [
            models.Index(fields=["esp_message_id"], name="tracking_event_esp_message"),
            # Counting an address's recent soft bounces; soft bounces are a small share of
            # all events, so the index stays small.
            models.Index(
                fields=["recipient", "occurred_at"],
                name="tracking_event_soft_bounces",
                condition=Q(bounce_kind="soft"),
            ),
            # The reputation guard's bounces and complaints in a window
            # (suppression/reputation.py): a small share of all events.
            models.Index(
                fields=["occurred_at"],
                name="tracking_event_reputation",
                condition=Q(event_type__in=["bounced", "rejected", "failed", "complained"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.esp} {self.event_type} {self.esp_event_id}"
