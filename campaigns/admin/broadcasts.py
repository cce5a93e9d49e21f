"""The broadcasts admin: drafts are edited here (the audience rule checked on the form),
and every state change (send now, schedule, pause, resume, cancel) is an action with a
confirmation page that calls campaigns.broadcasts. Progress and rates come from the
counts the sweeper stores; the change page counts live. A draft's audience preview reads
at most PREVIEW_SCAN_LIMIT contacts per page view."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.safestring import SafeString

from campaigns.admin.common import message_status_table
from campaigns.broadcasts import (
    AudienceError,
    audience_preview,
    broadcast_cancel,
    broadcast_message_counts,
    broadcast_pause,
    broadcast_resume,
    broadcast_schedule,
    broadcast_send_now,
)
from campaigns.broadcasts.selectors import PREVIEW_SCAN_LIMIT
from campaigns.models import Broadcast, Message
from campaigns.rules import RuleError, describe_rule
from suppression.reputation import HANDED_TO_ESP

# The progress columns, in the order a marketer reads them; "queued" includes messages
# a worker holds or is handing over, "suppressed" consent and suppression refusals.
PROGRESS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("queued", tuple(Message.IN_PROGRESS)),
    ("sent", (Message.Status.SENT,)),
    ("delivered", (Message.Status.DELIVERED,)),
    ("opened", (Message.Status.OPENED,)),
    ("clicked", (Message.Status.CLICKED,)),
    ("bounced", (Message.Status.BOUNCED,)),
    ("complained", (Message.Status.COMPLAINED,)),
    ("unsubscribed", (Message.Status.UNSUBSCRIBED,)),
    ("suppressed", (Message.Status.SUPPRESSED,)),
    ("failed", (Message.Status.FAILED, Message.Status.DEAD)),
    ("cancelled", (Message.Status.CANCELLED,)),
)
AUDIENCE_PREVIEW_SCAN_LIMIT = PREVIEW_SCAN_LIMIT
# The changelist's audience column: the rule, cut to this many characters.
AUDIENCE_SUMMARY_CHARS = 60
CONFIRMATION_LIST_LIMIT = 100

CONFIRM_PAGE = """{% extends "admin/base_site.html" %}
{% load admin_urls %}
{% block bodyclass %}{{ block.super }} app-{{ opts.app_label }} model-{{ opts.model_name }} delete-confirmation{% endblock %}
{% block breadcrumbs %}<div class="breadcrumbs"><a href="{% url 'admin:index' %}">Home</a>
&rsaquo; <a href="{% url opts|admin_urlname:'changelist' %}">Broadcasts</a> &rsaquo; {{ title }}</div>{% endblock %}
{% block content %}
<p>{{ explanation }}</p>
<ul>{% for b in broadcasts %}<li>{{ b.name }} ({{ b.status }}{% if b.scheduled_at %}, scheduled for {{ b.scheduled_at|date:"Y-m-d H:i e" }}{% endif %})</li>{% endfor %}
{% if more %}<li>… and {{ more }} more</li>{% endif %}</ul>
<form method="post">{% csrf_token %}
{% for pk in selected %}<input type="hidden" name="{{ action_checkbox_name }}" value="{{ pk }}">{% endfor %}
<input type="hidden" name="select_across" value="{{ select_across }}">
<input type="hidden" name="action" value="{{ action_name }}">
<input type="hidden" name="post" value="yes">
{% if error %}<ul class="errorlist"><li>{{ error }}</li></ul>{% endif %}
{% if needs_time %}<p><label for="id_scheduled_at" class="required">Send at (UTC):</label><br>
<input type="datetime-local" name="scheduled_at" id="id_scheduled_at" value="{{ scheduled_at }}" required></p>{% endif %}
{% if needs_reason %}<p><label for="id_reason" class="required">Reason (required):</label><br>
<textarea name="reason" id="id_reason" rows="3" cols="60" required>{{ reason }}</textarea></p>{% endif %}
<input type="submit" value="{{ submit_label }}">
<a href="{% url opts|admin_urlname:'changelist' %}" class="button cancel-link">No, take me back</a>
</form>
{% endblock %}
"""


def _actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"[:150]


def _rate(part: int, whole: int) -> str:
    return f"{part / whole * 100:.2f}%" if whole else "-"


def _progress_rows(counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(label, sum(counts.get(s, 0) for s in statuses)) for label, statuses in PROGRESS]


class BroadcastForm(forms.ModelForm):
    class Meta:
        model = Broadcast
        fields = ["name", "template", "purpose", "audience"]

    # _post_clean, not clean(): the model's own validation (the audience rule, on the
    # audience field) runs there.
    def _post_clean(self) -> None:
        super()._post_clean()  # type: ignore[misc]
        broadcast = self.instance
        if (
            broadcast.status == Broadcast.Status.SCHEDULED
            and not self.errors
            and broadcast.template.latest_published() is None
        ):
            # A scheduled broadcast must stay startable: the same check as scheduling.
            self.add_error("template", f"Template {broadcast.template.name!r} has no published version.")


@admin.register(Broadcast)
class BroadcastAdmin(admin.ModelAdmin):
    form = BroadcastForm
    list_display = [
        "name",
        "status",
        "template",
        "purpose",
        "audience_summary",
        "when",
        "audience_display",
        "progress",
        "bounce_rate",
        "complaint_rate",
        "why",
    ]
    list_filter = ["status", "purpose"]
    list_select_related = ["template"]
    search_fields = ["name"]
    actions = ["send_now", "schedule", "pause", "resume", "cancel"]
    _info_fields = (
        "status",
        "audience_description",
        "audience_preview_display",
        "template_version",
        "scheduled_at",
        "started_at",
        "finished_at",
        "paused_display",
        "start_error",
        "cancelled_reason",
        "audience_display",
        "live_progress",
        "live_rates",
        "created_by",
        "created_at",
        "updated_at",
    )
    readonly_fields = _info_fields

    def get_fieldsets(self, request: HttpRequest, obj: Broadcast | None = None) -> list[tuple[Any, Any]]:
        if obj is None:
            return [(None, {"fields": ["name", "template", "purpose", "audience"]})]
        return [
            (None, {"fields": ["name", "status", "template", "template_version", "purpose"]}),
            ("Audience", {"fields": ["audience", "audience_description", "audience_preview_display"]}),
            (
                "Sending",
                {
                    "fields": [
                        "scheduled_at",
                        "started_at",
                        "finished_at",
                        "paused_display",
                        "start_error",
                        "cancelled_reason",
                        "audience_display",
                        "live_progress",
                        "live_rates",
                    ]
                },
            ),
            ("History", {"fields": ["created_by", "created_at", "updated_at"]}),
        ]

    def has_change_permission(self, request: HttpRequest, obj: Broadcast | None = None) -> bool:
        # Once sending has started the content and audience are history: view only.
        if obj is not None and not obj.is_editable:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Broadcast | None = None) -> bool:
        # Only a draft that never sent anything; the bulk delete action is removed below.
        if obj is not None and obj.status != Broadcast.Status.DRAFT:
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def save_model(self, request: HttpRequest, obj: Broadcast, form: forms.ModelForm, change: bool) -> None:
        if not change:
            obj.created_by = _actor(request)
        obj.updated_at = timezone.now()
        super().save_model(request, obj, form, change)

    # --- columns and read-only fields ---------------------------------------------------

    @admin.display(description="when")
    def when(self, obj: Broadcast) -> str:
        if obj.status == Broadcast.Status.SCHEDULED and obj.scheduled_at:
            return f"scheduled {obj.scheduled_at:%Y-%m-%d %H:%M} UTC"
        moment = obj.finished_at or obj.started_at
        return f"{moment:%Y-%m-%d %H:%M} UTC" if moment else "-"

    @admin.display(description="to")
    def audience_summary(self, obj: Broadcast) -> str:
        text = self.audience_description(obj)
        if len(text) <= AUDIENCE_SUMMARY_CHARS:
            return text
        return text[: AUDIENCE_SUMMARY_CHARS - 1].rstrip() + "…"

    @admin.display(description="audience")
    def audience_display(self, obj: Broadcast) -> str:
        if obj.started_at is None:
            return "not started (see the preview on its page)"
        skipped = obj.audience_size - obj.recipients
        text = f"{obj.audience_size:,} contacts, {obj.recipients:,} messages"
        if skipped:
            text += f" ({skipped:,} skipped: region not allowed or address already included)"
        if obj.audience_done_at is None and obj.status != Broadcast.Status.CANCELLED:
            text += " so far"
        return text

    @admin.display(description="progress")
    def progress(self, obj: Broadcast) -> str:
        if not obj.stats:
            return "-"
        return " · ".join(f"{label} {n:,}" for label, n in _progress_rows(obj.stats) if n)

    @admin.display(description="bounce rate")
    def bounce_rate(self, obj: Broadcast) -> str:
        handed = sum(obj.stats.get(s, 0) for s in HANDED_TO_ESP)
        return _rate(obj.stats.get(Message.Status.BOUNCED, 0), handed)

    @admin.display(description="complaint rate")
    def complaint_rate(self, obj: Broadcast) -> str:
        handed = sum(obj.stats.get(s, 0) for s in HANDED_TO_ESP)
        return _rate(obj.stats.get(Message.Status.COMPLAINED, 0), handed)

    @admin.display(description="why paused / cancelled / not started")
    def why(self, obj: Broadcast) -> str:
        if obj.paused_reason:
            return f"{obj.paused_by}: {obj.paused_reason}" if obj.paused_by else obj.paused_reason
        return obj.cancelled_reason or obj.start_error or ""

    @admin.display(description="paused")
    def paused_display(self, obj: Broadcast) -> str:
        if not obj.paused_reason:
            return "-"
        at = f" at {obj.paused_at:%Y-%m-%d %H:%M} UTC" if obj.paused_at else ""
        return f"by {obj.paused_by or 'unknown'}{at}: {obj.paused_reason}"

    @admin.display(description="audience rule")
    def audience_description(self, obj: Broadcast) -> str:
        try:
            return describe_rule(obj.audience) if obj.audience else "every contact"
        except RuleError as err:
            return f"invalid rule: {err}"

    @admin.display(description="audience preview")
    def audience_preview_display(self, obj: Broadcast) -> str:
        if obj.pk is None:
            return "-"
        if not obj.is_editable:
            return "Fixed when sending started: see the counts below."
        try:
            preview = audience_preview(audience=obj.audience, scan_limit=AUDIENCE_PREVIEW_SCAN_LIMIT)
        except AudienceError as err:
            return f"invalid rule: {err}"
        if preview.complete:
            return f"{preview.matched:,} contacts match now (before region and duplicate-address checks)."
        return (
            f"At least {preview.matched:,} contacts match (only the first {preview.scanned:,} contacts "
            "were checked here; sending checks them all)."
        )

    def _live_counts(self, obj: Broadcast) -> dict[str, int]:
        # Both live fields read one GROUP BY, done once per page view.
        if not hasattr(obj, "_live_counts"):
            obj._live_counts = broadcast_message_counts(broadcast_ids=[obj.pk])[obj.pk]  # type: ignore[attr-defined]
        return obj._live_counts  # type: ignore[attr-defined]

    @admin.display(description="messages by status (live)")
    def live_progress(self, obj: Broadcast) -> SafeString | str:
        if obj.pk is None:
            return "-"
        counts = self._live_counts(obj)
        return message_status_table(counts, broadcast__id__exact=obj.pk)

    @admin.display(description="rates (live)")
    def live_rates(self, obj: Broadcast) -> str:
        if obj.pk is None:
            return "-"
        counts = self._live_counts(obj)
        handed = sum(counts.get(s, 0) for s in HANDED_TO_ESP)
        return (
            f"{handed:,} handed to the ESP; bounce rate {_rate(counts.get(Message.Status.BOUNCED, 0), handed)}, "
            f"complaint rate {_rate(counts.get(Message.Status.COMPLAINED, 0), handed)}"
        )

    # --- actions ---------------------------------------------------------------------------

    @admin.action(description="Send selected broadcasts now", permissions=["change"])
    def send_now(self, request: HttpRequest, queryset: QuerySet[Broadcast]) -> HttpResponse | None:
        return self._confirm(
            request,
            queryset,
            action="send_now",
            title="Send broadcasts now",
            explanation="These broadcasts start sending now, to their audience as it is now, with their "
            "template's latest published version.",
            submit_label="Send now",
            run=lambda b, form: broadcast_send_now(broadcast=b, actor=_actor(request)),
            done="{} broadcast(s) started.",
        )

    @admin.action(description="Schedule selected broadcasts", permissions=["change"])
    def schedule(self, request: HttpRequest, queryset: QuerySet[Broadcast]) -> HttpResponse | None:
        return self._confirm(
            request,
            queryset,
            action="schedule",
            title="Schedule broadcasts",
            explanation="These broadcasts start sending at the time you give (UTC). Until then they can "
            "be edited, rescheduled or cancelled.",
            submit_label="Schedule",
            needs_time=True,
            run=lambda b, form: broadcast_schedule(
                broadcast=b, at=form["scheduled_at"], actor=_actor(request)
            ),
            done="{} broadcast(s) scheduled.",
        )

    @admin.action(description="Pause selected broadcasts", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Broadcast]) -> HttpResponse | None:
        return self._confirm(
            request,
            queryset,
            action="pause",
            title="Pause broadcasts",
            explanation="No more of these broadcasts' messages will be handed to the ESP until they are "
            "resumed (a request already on its way to the ESP still completes).",
            submit_label="Pause",
            needs_reason=True,
            run=lambda b, form: broadcast_pause(broadcast=b, actor=_actor(request), reason=form["reason"]),
            done="{} broadcast(s) paused.",
        )

    @admin.action(description="Resume selected broadcasts", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Broadcast]) -> HttpResponse | None:
        return self._confirm(
            request,
            queryset,
            action="resume",
            title="Resume broadcasts",
            explanation="These broadcasts continue sending where they stopped. The reputation guard "
            "judges them on the mail they send from now on: if its rates go over the limits "
            "again, it pauses them again.",
            submit_label="Resume",
            run=lambda b, form: broadcast_resume(broadcast=b, actor=_actor(request)),
            done="{} broadcast(s) resumed.",
        )

    @admin.action(description="Cancel selected broadcasts", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Broadcast]) -> HttpResponse | None:
        return self._confirm(
            request,
            queryset,
            action="cancel",
            title="Cancel broadcasts",
            explanation="These broadcasts stop for good: their messages not yet sent are cancelled. "
            "This cannot be undone.",
            submit_label="Cancel broadcasts",
            needs_reason=True,
            run=lambda b, form: broadcast_cancel(broadcast=b, actor=_actor(request), reason=form["reason"]),
            done="{} broadcast(s) cancelled.",
        )

    def _confirm(
        self,
        request: HttpRequest,
        queryset: QuerySet[Broadcast],
        *,
        action: str,
        title: str,
        explanation: str,
        submit_label: str,
        run: Callable[[Broadcast, dict[str, Any]], object],
        done: str,
        needs_reason: bool = False,
        needs_time: bool = False,
    ) -> HttpResponse | None:
        """Show a confirmation page; on confirmation run the service for each selected
        broadcast and report how many it changed and why the others were refused."""
        reason = request.POST.get("reason", "").strip()
        raw_time = request.POST.get("scheduled_at", "").strip()
        error = ""
        if request.POST.get("post") == "yes":
            form: dict[str, Any] = {"reason": reason}
            if needs_reason and not reason:
                error = "A reason is required."
            if needs_time:
                at = _parse_time(raw_time)
                if at is None:
                    error = "Give the date and time to send at, e.g. 2025-06-01 09:00."
                form["scheduled_at"] = at
            if not error:
                changed, refused = 0, []
                for broadcast in queryset.select_related("template"):
                    try:
                        run(broadcast, form)
                    except ValidationError as err:
                        refused.append(f"{broadcast.name}: {' '.join(err.messages)}")
                    else:
                        changed += 1
                if refused:
                    self.message_user(request, "Refused: " + " | ".join(refused), messages.ERROR)
                level = messages.SUCCESS if changed else messages.WARNING
                self.message_user(request, done.format(changed), level)
                return None
        total = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "explanation": explanation,
            "broadcasts": queryset[:CONFIRMATION_LIST_LIMIT],
            "more": max(0, total - CONFIRMATION_LIST_LIMIT),
            # Post back exactly what was selected, so the same queryset is rebuilt.
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "action_name": action,
            "needs_reason": needs_reason,
            "needs_time": needs_time,
            "reason": reason,
            "scheduled_at": raw_time,
            "submit_label": submit_label,
            "error": error,
        }
        request.current_app = self.admin_site.name
        return HttpResponse(engines["django"].from_string(CONFIRM_PAGE).render(context, request))


def _parse_time(value: str) -> datetime | None:
    """A datetime-local value ("2025-06-01T09:00"), read as UTC when it has no offset."""
    try:
        parsed = parse_datetime(value.replace(" ", "T", 1)) if value else None
    except ValueError:
        return None
    if parsed is None:
        return None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, UTC)
