"""The admin for email templates and their versions: versions are validated beside the
inputs and written through the services, published ones are immutable, and a version's
change page shows a preview rendered with sample data."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Max, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import escape, format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from campaigns.admin.common import _adopt
from campaigns.models import Automation, Contact, EmailTemplate, EventType, TemplateVersion
from campaigns.rendering import TemplateRejected, validate_template
from campaigns.services import (
    PREVIEW_CONTACT,
    template_version_copy,
    template_version_create,
    template_version_preview,
    template_version_publish,
    template_version_update,
    template_version_validate,
)


class TemplateVersionInline(admin.TabularInline):
    model = TemplateVersion
    fields = readonly_fields = ("number", "status", "subject", "created_at", "published_at")
    ordering = ["-number"]
    extra = 0
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: EmailTemplate | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: EmailTemplate | None = None) -> bool:
        return False


@admin.register(EmailTemplate)
class EmailTemplateAdmin(admin.ModelAdmin):
    list_display = ["name", "version_count", "latest_published", "created_at"]
    search_fields = ["name", "description"]
    fields = ["name", "description", "created_at", "add_version_link"]
    readonly_fields = ["created_at", "add_version_link"]
    inlines = [TemplateVersionInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[EmailTemplate]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                version_count=Count("versions"),
                latest_published_number=Max("versions__number", filter=Q(versions__status="published")),
            )
        )

    @admin.display(description="versions", ordering="version_count")
    def version_count(self, obj: EmailTemplate) -> int:
        return obj.version_count  # type: ignore[attr-defined]

    @admin.display(description="latest published", ordering="latest_published_number")
    def latest_published(self, obj: EmailTemplate) -> str:
        number = obj.latest_published_number  # type: ignore[attr-defined]
        return f"v{number}" if number is not None else "-"

    @admin.display(description="new version")
    def add_version_link(self, obj: EmailTemplate) -> SafeString | str:
        if obj.pk is None:
            return "Save the template first, then add versions."
        url = reverse("admin:campaigns_templateversion_add")
        return format_html(
            '<a class="addlink" href="{}?{}">Add a version</a>', url, urlencode({"template": obj.pk})
        )


class TemplateVersionForm(forms.ModelForm):
    class Meta:
        model = TemplateVersion
        fields = ["template", "subject", "html", "text", "declared_sensitive_fields"]

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        if self.instance.pk is not None and self.instance.is_published:
            raise ValidationError("published versions are immutable; create a new version")
        if "subject" in cleaned and "html" in cleaned:
            # The same validation the services run, here so that it shows beside the
            # inputs; save_model then calls the services, which check again.
            template_version_validate(
                subject=cleaned["subject"],
                html=cleaned["html"],
                text=cleaned.get("text", ""),
                declared_sensitive_fields=cleaned.get("declared_sensitive_fields"),
            )
        return cleaned


@admin.register(TemplateVersion)
class TemplateVersionAdmin(admin.ModelAdmin):
    form = TemplateVersionForm
    list_display = ["__str__", "template", "number", "status", "subject", "created_at", "published_at"]
    list_display_links = ["__str__"]
    list_filter = ["status", "template"]
    list_select_related = ["template"]
    search_fields = ["template__name", "subject"]
    actions = ["publish_versions", "copy_versions"]

    def get_fieldsets(self, request: HttpRequest, obj: TemplateVersion | None = None) -> list[Any]:
        content = ["subject", "html", "text", "declared_sensitive_fields"]
        if obj is None:
            return [(None, {"fields": ["template", *content]})]
        return [
            (None, {"fields": ["template", "number", "status", "created_at", "published_at"]}),
            ("Content", {"fields": content}),
            ("Preview (sample data)", {"fields": ["preview"]}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: TemplateVersion | None = None) -> list[str]:
        if obj is None:
            return []
        return ["template", "number", "status", "created_at", "published_at", "preview"]

    def has_change_permission(self, request: HttpRequest, obj: TemplateVersion | None = None) -> bool:
        if obj is not None and obj.is_published:
            return False  # immutable: shown read-only; "Copy to new draft" makes an editable one
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: TemplateVersion | None = None) -> bool:
        if obj is not None and obj.is_published:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(
        self, request: HttpRequest, obj: TemplateVersion, form: forms.ModelForm, change: bool
    ) -> None:
        data = form.cleaned_data
        content = {
            "subject": data["subject"],
            "html": data["html"],
            "text": data.get("text", ""),
            "declared_sensitive_fields": data.get("declared_sensitive_fields"),
        }
        if change:
            template_version_update(version=obj, **content)
        else:
            _adopt(obj, template_version_create(template=data["template"], **content))

    @admin.action(description="Publish", permissions=["change"])
    def publish_versions(self, request: HttpRequest, queryset: QuerySet[TemplateVersion]) -> None:
        published, refused = 0, []
        for version in queryset.filter(status=TemplateVersion.Status.DRAFT).select_related("template"):
            try:
                template_version_publish(version=version)
            except ValidationError as err:
                refused.append(f"{version}: {'; '.join(err.messages)}")
            else:
                published += 1
        if refused:
            self.message_user(request, "Not published: " + " | ".join(refused), messages.ERROR)
        self.message_user(request, f"{published} version(s) published.", messages.SUCCESS)

    @admin.action(description="Copy to new draft", permissions=["add"])
    def copy_versions(self, request: HttpRequest, queryset: QuerySet[TemplateVersion]) -> None:
        copies = [template_version_copy(version=version) for version in queryset.select_related("template")]
        self.message_user(request, f"{len(copies)} draft(s) created.", messages.SUCCESS)

    @admin.display(description="preview")
    def preview(self, obj: TemplateVersion) -> SafeString | str:
        if obj.pk is None:
            return "-"
        event_type, contact, payload, note = _preview_sample(obj)
        try:
            rendered = template_version_preview(
                version=obj, contact=contact, payload=payload, event_type=event_type
            )
        except Exception as err:  # a broken draft must not break its own change page
            return format_html(
                '<p class="errornote">Could not render: {}</p>', f"{type(err).__name__}: {err}"
            )
        # escape(), not conditional_escape(): rendered output is marked safe, and it goes
        # into an attribute here. sandbox="" keeps scripts and forms in it inert.
        return format_html(
            "<p><strong>Subject:</strong> {}</p>"
            '<iframe sandbox="" srcdoc="{}" title="preview" '
            'style="width:100%;max-width:800px;height:480px;border:1px solid #ccc;background:#fff"></iframe>'
            "<details><summary>Text part</summary><pre>{}</pre></details>"
            '<p class="help">{}</p>',
            escape(str(rendered.subject)),
            escape(str(rendered.html)),
            escape(str(rendered.text)),
            note,
        )


def _preview_sample(version: TemplateVersion) -> tuple[EventType | None, Contact, dict[str, Any], str]:
    """Sample data to preview a version with: the trigger of an automation that uses its
    template, a payload built from that trigger's schema, and a placeholder for every
    variable the version uses that the sample does not provide."""
    automation = (
        Automation.objects.filter(template_id=version.template_id)
        .select_related("trigger")
        .order_by("-active", "id")
        .first()
    )
    event_type = automation.trigger if automation is not None else None
    payload: dict[str, Any] = {}
    if event_type is not None and isinstance(event_type.schema, dict):
        sample = _sample_value({"type": "object", **event_type.schema}, depth=0)
        payload = sample if isinstance(sample, dict) else {}
    attributes: dict[str, Any] = {}
    try:
        variables = validate_template(subject=version.subject, html=version.html, text=version.text)
    except TemplateRejected:
        variables = set()
    for path in sorted(variables):
        root, _, rest = path.partition(".")
        if root == "payload" and rest:
            _set_placeholder(payload, rest.split("."), f"[{rest}]")
        elif root == "contact" and rest and rest.split(".")[0] not in PREVIEW_CONTACT:
            _set_placeholder(attributes, rest.split("."), f"[{rest}]")
    contact = Contact(
        user_id=PREVIEW_CONTACT["user_id"], email=PREVIEW_CONTACT["email"], attributes=attributes
    )
    note = (
        f"Sample payload for event type {event_type.name} (automation {automation.name})."
        if event_type is not None and automation is not None
        else "No automation uses this template yet: placeholders only."
    )
    note += " Sensitive fields not declared by this version are withheld, as they are when sending."
    return event_type, contact, payload, note


_SAMPLE_SCALARS: dict[str, Any] = {
    "string": "example",
    "email": "someone@example.com",
    "integer": 42,
    "number": 9.99,
    "boolean": True,
    "any": "example",
}


def _sample_value(spec: Any, *, depth: int) -> Any:
    if not isinstance(spec, dict) or depth > 8:
        return None
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return spec["enum"][0]
    field_type = spec.get("type")
    if field_type == "object":
        fields = spec.get("fields")
        if not isinstance(fields, dict):
            return {}
        return {name: _sample_value(child, depth=depth + 1) for name, child in fields.items()}
    if field_type == "array":
        return [_sample_value(spec["items"], depth=depth + 1)] if "items" in spec else []
    if field_type == "datetime":
        return datetime(2024, 6, 1, 12, 0, tzinfo=UTC).isoformat()
    return _SAMPLE_SCALARS.get(str(field_type), "example")


def _set_placeholder(target: dict[str, Any], segments: list[str], value: str) -> None:
    for segment in segments[:-1]:
        child = target.setdefault(segment, {})
        if not isinstance(child, dict):
            return  # the sample already has a value here; keep it
        target = child
    target.setdefault(segments[-1], value)
