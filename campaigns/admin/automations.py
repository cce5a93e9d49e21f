"""The admin for automations (activation through the services, the same checks on edits
of an active one) and for seed lists."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django.utils.safestring import SafeString

from campaigns.admin.common import message_status_table
from campaigns.models import Automation, Message, SeedList, TemplateVersion
from campaigns.rules import RuleError, describe_rule
from campaigns.services import automation_activation_errors, automation_set_active


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
        "paused_display",
        "conditions_description",
    ]
    list_filter = ["active", "trigger", "purpose", "is_transactional"]
    list_select_related = ["trigger", "template", "pinned_version"]
    search_fields = ["name"]
    readonly_fields = [
        "active",
        "paused_display",
        "conditions_description",
        "created_at",
        "updated_at",
        "message_counts",
    ]
    actions = ["activate", "deactivate"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "active",
                    "paused_display",
                    "trigger",
                    "conditions",
                    "conditions_description",
                ]
            },
        ),
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

    @admin.display(description="paused")
    def paused_display(self, obj: Automation) -> str:
        # Set by the reputation guard (suppression/reputation.py); cleared on activation.
        if obj.active or not obj.paused_reason:
            return "-"
        at = f" at {obj.paused_at:%Y-%m-%d %H:%M} UTC" if obj.paused_at else ""
        return f"automatically{at}: {obj.paused_reason}"

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
        return message_status_table(counts, automation__id__exact=obj.pk)

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
