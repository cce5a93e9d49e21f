"""The admin for consent and privacy: notices, the consent ledger (read-only, additions
through the services), hashed suppressions and the audit log (read-only), and the
Contact actions `export_contacts_action` / `erase_contacts_action` that ContactAdmin
attaches. Every change goes through suppression.consent / suppression.privacy."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from campaigns.models import Contact
from suppression.consent import consent_grant, consent_withdraw
from suppression.models.consent import AuditLogEntry, ConsentNotice, ConsentRecord, HashedSuppression
from suppression.privacy import EXPORT_FORMAT, contact_erase, contact_export

# An export is built in the request; past this, use `manage.py gdpr_export` per contact.
EXPORT_ACTION_LIMIT = 100
CONFIRMATION_LIST_LIMIT = 100


def _actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"[:150]


# --- Contact actions (campaigns' ContactAdmin takes ContactPrivacyActionsMixin) -------


@admin.action(description="Export personal data (GDPR Art. 15/20) as JSON", permissions=["export"])
def export_contacts_action(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Contact]
) -> HttpResponse | None:
    total = queryset.count()
    if total > EXPORT_ACTION_LIMIT:
        modeladmin.message_user(
            request,
            f"{total} contacts selected; export at most {EXPORT_ACTION_LIMIT} at a time "
            "(or use manage.py gdpr_export).",
            messages.ERROR,
        )
        return None
    actor = _actor(request)
    exports = [contact_export(contact=c, actor=actor, reason="admin export") for c in queryset.order_by("pk")]
    body = json.dumps({"format": EXPORT_FORMAT, "contacts": exports}, indent=2, ensure_ascii=False)
    response = HttpResponse(body, content_type="application/json; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="contacts-export-{timezone.now():%Y%m%d-%H%M%S}.json"'
    )
    response["Cache-Control"] = "no-store"
    return response


@admin.action(description="Erase personal data (GDPR Art. 17)…", permissions=["erase"])
def erase_contacts_action(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Contact]
) -> TemplateResponse | None:
    reason = request.POST.get("reason", "").strip()
    confirmed = request.POST.get("post") == "yes"
    if confirmed and reason:
        actor = _actor(request)
        erased = 0
        for contact in queryset.order_by("pk"):
            contact_erase(contact=contact, actor=actor, reason=reason)
            erased += 1
        modeladmin.message_user(request, f"{erased} contact(s) erased.", messages.SUCCESS)
        return None
    total = queryset.count()
    opts = modeladmin.model._meta
    context: dict[str, Any] = {
        **modeladmin.admin_site.each_context(request),
        "title": "Erase personal data",
        "opts": opts,
        "contacts": queryset.order_by("pk")[:CONFIRMATION_LIST_LIMIT],
        "total": total,
        "more": max(0, total - CONFIRMATION_LIST_LIMIT),
        # Post back exactly what was selected, so the same queryset is rebuilt.
        "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across", "0"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "action_name": "erase_contacts_action",
        "reason": reason,
        "reason_missing": confirmed and not reason,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, "admin/suppression/erase_confirmation.html", context)


class ContactPrivacyActionsMixin:
    """The export and erase actions for a Contact ModelAdmin, offered only to users
    holding suppression's `export_contact` / `erase_contact` permissions: contacts are
    read-only in the admin, so the actions cannot ride on the change permission."""

    actions = [export_contacts_action, erase_contacts_action]

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("suppression.export_contact")

    def has_erase_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("suppression.erase_contact")


# --- Notices ---------------------------------------------------------------------------


@admin.register(ConsentNotice)
class ConsentNoticeAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "created_at", "records_count"]
    search_fields = ["name", "version"]

    @admin.display(description="consent records")
    def records_count(self, obj: ConsentNotice) -> int:
        return obj.records.count()

    def has_change_permission(self, request: HttpRequest, obj: ConsentNotice | None = None) -> bool:
        # A used notice is evidence of what people saw: read-only from then on.
        if obj is not None and obj.is_used:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: ConsentNotice | None = None) -> bool:
        if obj is not None and obj.is_used:
            return False
        return super().has_delete_permission(request, obj)


# --- The ledger ------------------------------------------------------------------------


class ConsentRecordForm(forms.ModelForm):
    action = forms.ChoiceField(
        choices=[
            (ConsentRecord.Action.GRANTED, "granted"),
            (ConsentRecord.Action.WITHDRAWN, "withdrawn"),
        ]
    )
    note = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="How the person told you (e.g. 'phone call, ticket 123'); kept as evidence.",
    )

    class Meta:
        model = ConsentRecord
        fields = ["contact", "purpose", "action", "notice"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "contact" in self.fields:  # nullable in the table (a deleted contact), not here
            self.fields["contact"].required = True


@admin.register(ConsentRecord)
class ConsentRecordAdmin(admin.ModelAdmin):
    form = ConsentRecordForm
    list_display = ["occurred_at", "contact", "purpose", "action", "source", "notice"]
    list_filter = ["action", "purpose", "source"]
    search_fields = ["contact__user_id", "purpose"]
    raw_id_fields = ["contact"]
    date_hierarchy = "occurred_at"
    list_select_related = ["contact", "notice"]

    def get_fields(self, request: HttpRequest, obj: ConsentRecord | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("contact", "purpose", "action", "notice", "note")
        return (
            "contact",
            "purpose",
            "action",
            "occurred_at",
            "source",
            "ip_address",
            "user_agent",
            "notice",
            "evidence",
            "email_hash",
        )

    def save_model(
        self, request: HttpRequest, obj: ConsentRecord, form: forms.ModelForm, change: bool
    ) -> None:
        # Only reachable on add (the ledger is read-only): through the services, which
        # stamp the source, hash the address and audit the staff member.
        service = consent_grant if obj.action == ConsentRecord.Action.GRANTED else consent_withdraw
        note = form.cleaned_data.get("note", "")
        assert obj.contact is not None  # the form requires it
        saved = service(
            contact=obj.contact,
            purpose=obj.purpose,
            source="admin",
            notice=obj.notice,
            evidence={"note": note} if note else None,
            actor=_actor(request),
        )
        for f in saved._meta.concrete_fields:
            setattr(obj, f.attname, getattr(saved, f.attname))
        obj._state.adding = False

    def has_change_permission(self, request: HttpRequest, obj: ConsentRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ConsentRecord | None = None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(HashedSuppression)
class HashedSuppressionAdmin(ReadOnlyAdmin):
    list_display = ["email_hash", "reason", "created_at"]
    search_fields = ["email_hash"]
    date_hierarchy = "created_at"


@admin.register(AuditLogEntry)
class AuditLogEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "contact_pk", "actor", "reason"]
    list_filter = ["action"]
    search_fields = ["actor", "email_hash"]
    date_hierarchy = "created_at"
