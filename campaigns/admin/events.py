"""The admin for what comes in: event types, the API sources that send events (a new
source's token is shown once), and the outbox, read-only, whose dead or failed events can
be replayed."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from campaigns.admin.common import ExactSearchMixin, _adopt, _changelist_url, _error_history, _pretty_json
from campaigns.events import nudge_event_workers
from campaigns.models import ApiSource, EventType, Message, OutboxEvent
from campaigns.processing import events_replay
from campaigns.schemas import SchemaError, redact, sensitive_fields
from campaigns.services import api_source_create


@admin.register(EventType)
class EventTypeAdmin(admin.ModelAdmin):
    list_display = ["name", "active", "field_count", "sensitive_field_list", "event_count", "created_at"]
    list_filter = ["active"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[EventType]:
        # One GROUP BY for the whole page instead of a COUNT per row.
        return super().get_queryset(request).annotate(event_count=Count("events"))

    @admin.display(description="fields")
    def field_count(self, obj: EventType) -> int:
        fields = obj.schema.get("fields") if isinstance(obj.schema, dict) else None
        return len(fields) if isinstance(fields, dict) else 0

    @admin.display(description="sensitive fields")
    def sensitive_field_list(self, obj: EventType) -> str:
        try:
            return ", ".join(sorted(sensitive_fields(obj.schema))) or "-"
        except SchemaError:
            return "(invalid schema)"

    @admin.display(description="events", ordering="event_count")
    def event_count(self, obj: EventType) -> int:
        return obj.event_count  # type: ignore[attr-defined]


@admin.register(ApiSource)
class ApiSourceAdmin(admin.ModelAdmin):
    list_display = ["name", "token_prefix", "active", "created_at", "last_used_at"]
    list_filter = ["active"]
    search_fields = ["name", "=token_prefix"]

    def get_fields(self, request: HttpRequest, obj: ApiSource | None = None) -> tuple[str, ...]:
        # The token hash is never shown; the token itself only once, as a message.
        if obj is None:
            return ("name",)
        return ("name", "active", "token_prefix", "created_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiSource | None = None) -> tuple[str, ...]:
        return () if obj is None else ("token_prefix", "created_at", "last_used_at")

    def save_model(self, request: HttpRequest, obj: ApiSource, form: forms.ModelForm, change: bool) -> None:
        if change:
            obj.save(update_fields=["name", "active"])
            return
        source, token = api_source_create(name=form.cleaned_data["name"])
        _adopt(obj, source)
        # The only time the token exists outside the caller's hands: we keep its hash.
        messages.success(
            request,
            f"The API token for {source.name} is: {token} — copy it now; it is not stored and will not be shown again.",
        )


@admin.register(OutboxEvent)
class OutboxEventAdmin(ExactSearchMixin, admin.ModelAdmin):
    """Read-only: events are facts. Dead or failed ones can be replayed."""

    list_display = ["event_id", "event_type", "user_id", "status", "attempts", "result", "created_at"]
    list_filter = ["status", "event_type", "source"]
    list_select_related = ["event_type"]
    exact_search_fields = ("event_id", "user_id")
    search_help_text = "Exact event id or user id."
    raw_id_fields = ["event_type"]
    # The outbox is the largest table: no COUNT(*) of everything on each page view.
    show_full_result_count = False
    actions = ["replay_events"]
    fields = readonly_fields = (
        "event_id",
        "event_type",
        "user_id",
        "source",
        "occurred_at",
        "created_at",
        "status",
        "attempts",
        "available_at",
        "locked_until",
        "processed_at",
        "result",
        "last_error",
        "error_history_display",
        "redacted_payload",
        "messages_link",
    )

    @admin.display(description="payload (sensitive fields redacted)")
    def redacted_payload(self, obj: OutboxEvent) -> SafeString | str:
        # Without a valid schema we cannot tell which fields are sensitive: show nothing.
        if not isinstance(obj.payload, dict):
            return "(hidden: the payload is not an object)"
        try:
            return _pretty_json(redact(obj.event_type.schema, obj.payload))
        except SchemaError:
            return "(hidden: the event type's schema is invalid, so sensitive fields are unknown)"

    @admin.display(description="error history")
    def error_history_display(self, obj: OutboxEvent) -> SafeString | str:
        return _error_history(obj.error_history)

    @admin.display(description="messages")
    def messages_link(self, obj: OutboxEvent) -> SafeString:
        return format_html(
            '<a href="{}">messages from this event</a>', _changelist_url(Message, event__id__exact=obj.pk)
        )

    @admin.action(description="Replay selected dead/failed events", permissions=["replay"])
    def replay_events(self, request: HttpRequest, queryset: QuerySet[OutboxEvent]) -> None:
        count = events_replay(event_ids=list(queryset.values_list("id", flat=True)))
        if count:
            transaction.on_commit(nudge_event_workers)
        self.message_user(request, f"{count} event(s) queued for replay.", messages.SUCCESS)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("campaigns.change_outboxevent")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: OutboxEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: OutboxEvent | None = None) -> bool:
        return False
