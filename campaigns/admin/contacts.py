"""The contacts admin: read-only, searched by exact user id or email."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from campaigns.admin.common import ExactSearchMixin, _changelist_url, _pretty_json
from campaigns.models import Contact, Message
from suppression.admin_compliance import ContactPrivacyActionsMixin


@admin.register(Contact)
class ContactAdmin(ContactPrivacyActionsMixin, ExactSearchMixin, admin.ModelAdmin):
    """Read-only: contacts are written by identify(), and erased by the GDPR service."""

    list_display = ["user_id", "email", "region", "attribute_count", "created_at", "updated_at"]
    list_filter = ["region", "do_not_sell"]
    exact_search_fields = ("user_id", "email")
    search_help_text = "Exact user id or email address (case-sensitive)."
    show_full_result_count = False
    fields = readonly_fields = (
        "user_id",
        "email",
        "region",
        "do_not_sell",
        "erased_at",
        "attributes_display",
        "created_at",
        "updated_at",
        "messages_link",
    )

    @admin.display(description="attributes")
    def attribute_count(self, obj: Contact) -> int:
        return len(obj.attributes) if isinstance(obj.attributes, dict) else 0

    @admin.display(description="attributes")
    def attributes_display(self, obj: Contact) -> SafeString:
        return _pretty_json(obj.attributes)

    @admin.display(description="messages")
    def messages_link(self, obj: Contact) -> SafeString:
        return format_html(
            '<a href="{}">messages to this contact</a>', _changelist_url(Message, contact__id__exact=obj.pk)
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Contact | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Contact | None = None) -> bool:
        return False
