"""The messages admin: read-only, searched by exact values; dead or failed messages can
be replayed."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.safestring import SafeString

from campaigns.admin.common import ExactSearchMixin, _error_history
from campaigns.delivery import messages_replay, nudge_send_workers
from campaigns.models import Message

_MESSAGE_FIELDS: dict[str | None, tuple[str, ...]] = {
    None: ("to_email", "status", "status_reason", "subject", "purpose", "transactional"),
    "Origin": ("event", "automation", "broadcast", "contact", "template_version", "idempotency_key"),
    "Delivery": (
        "attempts",
        "send_after",
        "locked_until",
        "resent_after_unknown",
        "esp_message_id",
        "created_at",
        "sent_at",
        "updated_at",
    ),
    "Errors": ("last_error", "error_history_display"),
}


@admin.register(Message)
class MessageAdmin(ExactSearchMixin, admin.ModelAdmin):
    """Read-only: messages change only through the delivery engine and ESP webhooks."""

    list_display = [
        "id",
        "to_email",
        "status",
        "status_reason",
        "automation",
        "template_version",
        "attempts",
        "esp_message_id",
        "sent_at",
    ]
    list_filter = ["status", "automation", "broadcast", "purpose", "transactional"]
    list_select_related = ["automation", "template_version__template"]
    exact_search_fields = ("to_email", "esp_message_id", "idempotency_key")
    search_help_text = "Exact recipient address, ESP message id or idempotency key."
    raw_id_fields = ["event", "automation", "broadcast", "contact", "template_version"]
    show_full_result_count = False
    actions = ["replay_messages"]
    fieldsets = [(title, {"fields": names}) for title, names in _MESSAGE_FIELDS.items()]
    readonly_fields = tuple(name for names in _MESSAGE_FIELDS.values() for name in names)

    @admin.display(description="error history")
    def error_history_display(self, obj: Message) -> SafeString | str:
        return _error_history(obj.error_history)

    @admin.action(description="Replay selected dead/failed messages", permissions=["replay"])
    def replay_messages(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        result = messages_replay(message_ids=list(queryset.values_list("id", flat=True)))
        if result.replayed:
            nudge_send_workers()  # schedules the nudge on commit
        level = messages.WARNING if result.refused_maybe_delivered else messages.SUCCESS
        self.message_user(request, result.summary(), level)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("campaigns.change_message")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False
