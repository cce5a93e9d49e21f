"""Tracking events in the admin: read-only, for looking up what an ESP said about a
message. Rows are written only by webhooks.services.tracking_event_record."""

from __future__ import annotations

import json

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from webhooks.models import TrackingEvent


@admin.register(TrackingEvent)
class TrackingEventAdmin(admin.ModelAdmin):
    list_display = [
        "occurred_at",
        "esp",
        "event_type",
        "bounce_kind",
        "recipient",
        "message_link",
        "esp_message_id",
    ]
    list_filter = ["esp", "event_type", "bounce_kind"]
    # Exact matches only ("="): the table is large and esp_message_id is indexed.
    search_fields = ["=esp_message_id", "=esp_event_id"]
    search_help_text = "Exact ESP message id or ESP event id."
    show_full_result_count = False
    fields = readonly_fields = (
        "esp",
        "esp_event_id",
        "event_type",
        "bounce_kind",
        "message_link",
        "esp_message_id",
        "recipient",
        "occurred_at",
        "received_at",
        "description",
        "mta_response",
        "reject_reason",
        "click_url",
        "metadata_display",
        "esp_event_display",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: TrackingEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: TrackingEvent | None = None) -> bool:
        return False

    @admin.display(description="message", ordering="message")
    def message_link(self, obj: TrackingEvent) -> SafeString | str:
        if obj.message_id is None:
            return "-"
        url = reverse("admin:campaigns_message_change", args=[obj.message_id])
        return format_html('<a href="{}">message {}</a>', url, obj.message_id)

    @admin.display(description="metadata")
    def metadata_display(self, obj: TrackingEvent) -> SafeString:
        return _pretty_json(obj.metadata)

    @admin.display(description="raw ESP event")
    def esp_event_display(self, obj: TrackingEvent) -> SafeString:
        return _pretty_json(obj.esp_event)


def _pretty_json(value: object) -> SafeString:
    return format_html(
        "<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    )
