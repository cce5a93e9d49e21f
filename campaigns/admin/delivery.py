"""Admin for delivery at scale: warm-up schedules with their daily counters, and a
read-only page showing the shared send rate (effective rate against the configured
ceiling, when and why it last changed), linked from the warm-up schedules list."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from campaigns import throttle
from campaigns.models import WarmupDay, WarmupSchedule
from campaigns.warmup import utc_today

RATE_PAGE = """{% extends "admin/base_site.html" %}
{% block breadcrumbs %}<div class="breadcrumbs"><a href="{% url 'admin:index' %}">Home</a>
&rsaquo; <a href="{{ schedules_url }}">Warm-up schedules</a> &rsaquo; {{ title }}</div>{% endblock %}
{% block content %}
<p>Shared by every worker through {{ backend }}; ESP account <code>{{ namespace }}</code>.
Requests/s for <code>esp</code> (one per ESP request, however many messages it carries);
messages/s for the <code>provider:</code> limits.</p>
{% if error %}<p class="errornote">{{ error }}</p>{% endif %}
<table>
<thead><tr><th>bucket</th><th>effective rate</th><th>configured</th><th>tokens now</th>
<th>why it last changed</th><th>changed at</th><th>paused until</th></tr></thead>
<tbody>
{% for s in states %}<tr>
<td>{{ s.bucket }}</td>
<td>{{ s.rate|floatformat:2 }}/s{% if s.throttled %} <strong>(throttled)</strong>{% endif %}</td>
<td>{{ s.ceiling|floatformat:2 }}/s</td>
<td>{{ s.available|floatformat:1 }}</td>
<td>{{ s.reason }}</td>
<td>{{ s.changed_at|default:"-" }}</td>
<td>{{ s.paused_until|default:"-" }}</td>
</tr>{% endfor %}
</tbody>
</table>
{% endblock %}
"""


class WarmupDayInline(admin.TabularInline):
    """The counters are written only by campaigns.warmup: read-only here."""

    model = WarmupDay
    fields = ("day", "step_display", "cap_display", "sent", "held", "reason")
    readonly_fields = fields
    ordering = ("-day",)
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="step")
    def step_display(self, obj: WarmupDay) -> int:
        return obj.step + 1

    @admin.display(description="cap")
    def cap_display(self, obj: WarmupDay) -> str:
        return "unlimited" if obj.cap is None else str(obj.cap)


@admin.register(WarmupSchedule)
class WarmupScheduleAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "active",
        "start_date",
        "step_display",
        "cap_today",
        "sent_today",
        "held",
        "reason",
    ]
    list_filter = ["active", "held"]
    search_fields = ["name"]
    readonly_fields = ["held", "reason", "evaluated_on", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ("name", "active", "start_date", "daily_caps", "step")}),
        ("Hold the curve when a day's rates exceed", {"fields": ("max_bounce_rate", "max_complaint_rate")}),
        ("Daily review", {"fields": ("held", "reason", "evaluated_on", "created_at", "updated_at")}),
    ]
    inlines = [WarmupDayInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[WarmupSchedule]:
        today = WarmupDay.objects.filter(schedule=OuterRef("pk"), day=utc_today())
        return (
            super()
            .get_queryset(request)
            .annotate(
                sent_today_value=Subquery(today.values("sent")[:1]),
                cap_today_value=Subquery(today.values("cap")[:1]),
                has_today=Subquery(today.values("pk")[:1]),
            )
        )

    @admin.display(description="step")
    def step_display(self, obj: WarmupSchedule) -> str:
        return f"{obj.step + 1} of {len(obj.daily_caps or [])}"

    @admin.display(description="cap today")
    def cap_today(self, obj: WarmupSchedule) -> str:
        cap = obj.cap_today_value if getattr(obj, "has_today", None) else obj.current_cap  # type: ignore[attr-defined]
        return "unlimited" if cap is None else str(cap)

    @admin.display(description="sent today")
    def sent_today(self, obj: WarmupSchedule) -> int:
        return getattr(obj, "sent_today_value", None) or 0

    def save_model(self, request: HttpRequest, obj: WarmupSchedule, form: Any, change: bool) -> None:
        obj.updated_at = timezone.now()
        super().save_model(request, obj, form, change)

    # -- the shared send rate

    def get_urls(self) -> list[URLPattern]:
        rate = path(
            "delivery-rate/",
            self.admin_site.admin_view(self.delivery_rate_view),
            name="campaigns_delivery_rate",
        )
        return [rate, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().changelist_view(request, {"subtitle": _rate_summary(), **(extra_context or {})})

    def delivery_rate_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        default = throttle.default_throttle()
        error = ""
        states: list[throttle.RateState] = []
        try:
            states = default.rate_states()
        except (throttle.ThrottleError, ImproperlyConfigured) as err:
            error = f"The rate-limit state cannot be read: {err}"
        context = {
            **self.admin_site.each_context(request),
            "title": "Delivery rate",
            "subtitle": None,
            "states": states,
            "error": error,
            "backend": default.backend.describe(),  # type: ignore[attr-defined]
            "namespace": default.namespace,
            "schedules_url": reverse("admin:campaigns_warmupschedule_changelist"),
        }
        return HttpResponse(engines["django"].from_string(RATE_PAGE).render(context, request))


def _rate_summary() -> SafeString:
    url = reverse("admin:campaigns_delivery_rate")
    try:
        state = throttle.effective_rate()
    except (throttle.ThrottleError, ImproperlyConfigured) as err:
        return format_html('Delivery rate unavailable ({}). <a href="{}">Details</a>', err, url)
    return format_html(
        'Delivery rate: {} of {} requests/s ({}). <a href="{}">Details</a>',
        f"{state.rate:g}",
        f"{state.ceiling:g}",
        state.reason,
        url,
    )
