"""The suppression list in the admin. Adding goes through suppression_add; removing is an
action that asks for a reason and goes through suppression_remove; nothing is edited.
Topics (what the preference centre lists) are edited here too."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

from suppression.models import Suppression, SuppressionLogEntry, Topic
from suppression.privacy import is_hashed_suppressed
from suppression.services import normalize_email, suppression_add, suppression_remove

# The confirmation page lists at most this many; the action still covers the whole selection.
CONFIRMATION_LIST_LIMIT = 100


def _admin_source(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"[:100]


class SuppressionForm(forms.ModelForm):
    class Meta:
        model = Suppression
        fields = ["email", "topic", "reason", "detail"]
        help_texts = {"topic": "Leave empty to suppress the address for every purpose."}

    def clean_email(self) -> str:
        # Normalised before the unique (email, topic) check, as suppression_add stores it.
        email = normalize_email(self.cleaned_data["email"])
        if is_hashed_suppressed(email):
            raise forms.ValidationError(
                "This address was erased (GDPR Art. 17) and is already suppressed for every "
                "purpose, stored only as a hash (Hashed suppressions); a plain entry would "
                "store the address again."
            )
        return email


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    form = SuppressionForm
    list_display = ["email", "topic", "reason", "source", "created_at"]
    list_filter = ["reason", "topic"]
    search_fields = ["email"]
    date_hierarchy = "created_at"
    actions = ["remove_suppressions"]

    def get_fields(self, request: HttpRequest, obj: Suppression | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("email", "topic", "reason", "detail")  # the source is the signed-in user
        return ("email", "topic", "reason", "source", "detail", "created_at")

    def save_model(self, request: HttpRequest, obj: Suppression, form: forms.ModelForm, change: bool) -> None:
        # Only reachable on add (existing suppressions are read-only): the one mutation path.
        saved = suppression_add(
            email=obj.email,
            reason=obj.reason,
            source=_admin_source(request),
            topic=obj.topic,
            detail=obj.detail,
        )
        assert saved is not None, "clean_email refuses erased addresses"
        for field in saved._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))
        obj._state.adding = False

    @admin.action(description="Remove selected suppressions", permissions=["remove"])
    def remove_suppressions(
        self, request: HttpRequest, queryset: QuerySet[Suppression]
    ) -> TemplateResponse | None:
        reason = request.POST.get("reason", "").strip()
        confirmed = request.POST.get("post") == "yes"
        if confirmed and reason:
            source = _admin_source(request)
            removed = sum(
                suppression_remove(email=row.email, topic=row.topic, reason=reason, source=source)
                for row in queryset
            )
            self.message_user(request, f"{removed} suppression(s) removed.", messages.SUCCESS)
            return None
        total = queryset.count()
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": "Remove suppressions",
            "opts": self.model._meta,
            "suppressions": queryset[:CONFIRMATION_LIST_LIMIT],
            "total": total,
            "more": max(0, total - CONFIRMATION_LIST_LIMIT),
            # Post back exactly what was selected, so the same queryset is rebuilt.
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "action_name": "remove_suppressions",
            "reason": reason,
            "reason_missing": confirmed and not reason,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/suppression/remove_confirmation.html", context)

    def has_remove_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("suppression.delete_suppression")

    def has_change_permission(self, request: HttpRequest, obj: Suppression | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Suppression | None = None) -> bool:
        # The default delete would bypass suppression_remove (no reason, no log entry).
        return False


@admin.register(SuppressionLogEntry)
class SuppressionLogEntryAdmin(admin.ModelAdmin):
    list_display = ["created_at", "email", "topic", "action", "reason", "source"]
    list_filter = ["action", "topic"]
    search_fields = ["email"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SuppressionLogEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SuppressionLogEntry | None = None) -> bool:
        return False


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "public", "position"]
    list_editable = ["public", "position"]
    list_filter = ["public"]
    search_fields = ["name", "slug"]

    def get_readonly_fields(self, request: HttpRequest, obj: Topic | None = None) -> tuple[str, ...]:
        # Opt-outs are Suppression rows keyed on the slug: renaming it would silently
        # re-subscribe everyone who opted out.
        return ("slug", "created_at") if obj is not None else ("created_at",)


# Consent ledger, hashed suppressions and the privacy audit log.
import suppression.admin_compliance  # noqa: E402,F401
