"""The marketer's admin for campaigns. Writes to versions, API sources and automation
activation go through campaigns.services; events and messages are read-only here, and
their actions only re-queue work (the workers do it after commit)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import Count, Max, OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape, format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from campaigns.delivery import messages_replay, nudge_send_workers
from campaigns.events import nudge_event_workers
from campaigns.models import (
    ApiSource,
    Automation,
    Contact,
    EmailTemplate,
    EventType,
    Message,
    OutboxEvent,
    SeedList,
    TemplateVersion,
)
from campaigns.processing import events_replay
from campaigns.rendering import TemplateRejected, validate_template
from campaigns.rules import RuleError, describe_rule
from campaigns.schemas import SchemaError, redact, sensitive_fields
from campaigns.services import (
    PREVIEW_CONTACT,
    api_source_create,
    automation_activation_errors,
    automation_set_active,
    template_version_copy,
    template_version_create,
    template_version_preview,
    template_version_publish,
    template_version_update,
    template_version_validate,
)


def _adopt(target: models.Model, saved: models.Model) -> None:
    """Make the admin's unsaved instance stand for the row a service created, so that
    the admin's log entry and redirect point at it."""
    for field in saved._meta.concrete_fields:
        setattr(target, field.attname, getattr(saved, field.attname))
    target._state.adding = False
    target._state.db = saved._state.db


def _pretty_json(value: object) -> SafeString:
    return format_html(
        "<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    )


def _error_history(history: object) -> SafeString | str:
    if not isinstance(history, list) or not history:
        return "-"
    rows = [entry for entry in history if isinstance(entry, dict)]
    return format_html(
        "<table><thead><tr><th>attempt</th><th>at</th><th>status</th><th>error</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre style='white-space:pre-wrap'>{}</pre></td></tr>",
            (
                (
                    entry.get("attempt", ""),
                    entry.get("at", ""),
                    entry.get("status", ""),
                    entry.get("error", ""),
                )
                for entry in reversed(rows)
            ),
        ),
    )


def _changelist_url(model: type[models.Model], **params: str | int) -> str:
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


class ExactSearchMixin:
    """Search a large table by exact values only, with plain equality so that Postgres
    uses the column's index. Django's "=field" search is iexact, i.e. UPPER(col) =
    UPPER(term), which no plain index serves: a sequential scan of the whole table."""

    exact_search_fields: tuple[str, ...] = ()

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        return self.exact_search_fields  # non-empty: the changelist shows the search box

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q()
        for name in self.exact_search_fields:
            match |= Q(**{name: term})
        return queryset.filter(match), False


# --- contacts, event types, API sources ---------------------------------------------------


@admin.register(Contact)
class ContactAdmin(ExactSearchMixin, admin.ModelAdmin):
    """Read-only: contacts are written by identify(), and erased by the GDPR service."""

    list_display = ["user_id", "email", "attribute_count", "created_at", "updated_at"]
    exact_search_fields = ("user_id", "email")
    search_help_text = "Exact user id or email address (case-sensitive)."
    show_full_result_count = False
    fields = readonly_fields = (
        "user_id",
        "email",
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


# --- the outbox -------------------------------------------------------------------------


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


# --- templates and versions ---------------------------------------------------------------


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


# --- automations --------------------------------------------------------------------------


class AutomationForm(forms.ModelForm):
    class Meta:
        model = Automation
        fields = [
            "name",
            "trigger",
            "conditions",
            "template",
            "pinned_version",
            "delay",
            "purpose",
            "is_transactional",
        ]

    # _post_clean, not clean(): the instance has the submitted values only after the
    # model's own validation, which runs there.
    def _post_clean(self) -> None:
        super()._post_clean()  # type: ignore[misc]
        # An active automation must stay sendable after an edit: same checks as activation.
        if self.instance.active and not self.errors:
            for field, message in automation_activation_errors(automation=self.instance).items():
                self.add_error(field if field in self.fields else None, message)


@admin.register(Automation)
class AutomationAdmin(admin.ModelAdmin):
    form = AutomationForm
    list_display = [
        "name",
        "trigger",
        "template",
        "version_used",
        "purpose",
        "active",
        "conditions_description",
    ]
    list_filter = ["active", "trigger", "purpose", "is_transactional"]
    list_select_related = ["trigger", "template", "pinned_version"]
    search_fields = ["name"]
    readonly_fields = ["active", "conditions_description", "created_at", "updated_at", "message_counts"]
    actions = ["activate", "deactivate"]
    fieldsets = [
        (None, {"fields": ["name", "active", "trigger", "conditions", "conditions_description"]}),
        ("Email", {"fields": ["template", "pinned_version", "delay", "purpose", "is_transactional"]}),
        ("Messages", {"fields": ["message_counts", "created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Automation]:
        latest = (
            TemplateVersion.objects.filter(
                template=OuterRef("template"), status=TemplateVersion.Status.PUBLISHED
            )
            .order_by("-number")
            .values("number")[:1]
        )
        return super().get_queryset(request).annotate(latest_published_number=Subquery(latest))

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "pinned_version":
            kwargs["queryset"] = TemplateVersion.objects.filter(
                status=TemplateVersion.Status.PUBLISHED
            ).select_related("template")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: Automation, form: forms.ModelForm, change: bool) -> None:
        obj.updated_at = timezone.now()
        super().save_model(request, obj, form, change)

    @admin.display(description="version used")
    def version_used(self, obj: Automation) -> str:
        if obj.pinned_version_id is not None:
            return f"v{obj.pinned_version.number} (pinned)" if obj.pinned_version else "-"
        number = getattr(obj, "latest_published_number", None)
        return f"latest (v{number})" if number is not None else "none published"

    @admin.display(description="conditions")
    def conditions_description(self, obj: Automation) -> str:
        try:
            return describe_rule(obj.conditions)
        except RuleError as err:
            return f"invalid rule: {err}"

    @admin.display(description="messages by status")
    def message_counts(self, obj: Automation) -> SafeString | str:
        if obj.pk is None:
            return "-"
        counts = dict(
            Message.objects.filter(automation=obj).order_by().values_list("status").annotate(n=Count("id"))
        )
        if not counts:
            return "No messages yet."
        return format_html(
            "<table><tbody>{}</tbody></table>",
            format_html_join(
                "",
                '<tr><td><a href="{}">{}</a></td><td>{}</td></tr>',
                (
                    (
                        _changelist_url(Message, automation__id__exact=obj.pk, status__exact=status),
                        label,
                        counts[status],
                    )
                    for status, label in Message.Status.choices
                    if status in counts
                ),
            ),
        )

    @admin.action(description="Activate", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[Automation]) -> None:
        self._set_active(request, queryset, active=True)

    @admin.action(description="Deactivate", permissions=["change"])
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Automation]) -> None:
        self._set_active(request, queryset, active=False)

    def _set_active(self, request: HttpRequest, queryset: QuerySet[Automation], *, active: bool) -> None:
        changed, refused = 0, []
        for automation in queryset:
            try:
                automation_set_active(automation=automation, active=active)
            except ValidationError as err:
                refused.append(f"{automation.name}: {'; '.join(err.messages)}")
            else:
                changed += 1
        if refused:
            self.message_user(request, "Not activated: " + " | ".join(refused), messages.ERROR)
        verb = "activated" if active else "deactivated"
        self.message_user(request, f"{changed} automation(s) {verb}.", messages.SUCCESS)


# --- seed lists ---------------------------------------------------------------------------


class SeedListForm(forms.ModelForm):
    class Meta:
        model = SeedList
        fields = ["name", "addresses"]

    def clean_addresses(self) -> str:
        addresses = self.cleaned_data["addresses"]
        bad = []
        for line in addresses.splitlines():
            try:
                if line.strip():
                    validate_email(line.strip())
            except ValidationError:
                bad.append(line.strip())
        if bad:
            raise ValidationError(f"Not valid email addresses: {', '.join(bad[:10])}")
        return addresses


@admin.register(SeedList)
class SeedListAdmin(admin.ModelAdmin):
    form = SeedListForm
    list_display = ["name", "address_count", "created_at"]
    search_fields = ["name", "addresses"]
    readonly_fields = ["created_at"]

    @admin.display(description="addresses")
    def address_count(self, obj: SeedList) -> int:
        return len(obj.address_list)


# --- messages -----------------------------------------------------------------------------


_MESSAGE_FIELDS: dict[str | None, tuple[str, ...]] = {
    None: ("to_email", "status", "status_reason", "subject", "purpose", "transactional"),
    "Origin": ("event", "automation", "contact", "template_version", "idempotency_key"),
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
    list_filter = ["status", "automation", "purpose", "transactional"]
    list_select_related = ["automation", "template_version__template"]
    exact_search_fields = ("to_email", "esp_message_id", "idempotency_key")
    search_help_text = "Exact recipient address, ESP message id or idempotency key."
    raw_id_fields = ["event", "automation", "contact", "template_version"]
    show_full_result_count = False
    actions = ["replay_messages"]
    fieldsets = [(title, {"fields": names}) for title, names in _MESSAGE_FIELDS.items()]
    readonly_fields = tuple(name for names in _MESSAGE_FIELDS.values() for name in names)

    @admin.display(description="error history")
    def error_history_display(self, obj: Message) -> SafeString | str:
        return _error_history(obj.error_history)

    @admin.action(description="Replay selected dead/failed messages", permissions=["replay"])
    def replay_messages(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        count = messages_replay(message_ids=list(queryset.values_list("id", flat=True)))
        if count:
            nudge_send_workers()  # schedules the nudge on commit
        self.message_user(request, f"{count} message(s) queued for replay.", messages.SUCCESS)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("campaigns.change_message")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False
