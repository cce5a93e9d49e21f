"""Pieces the campaigns admin pages share: exact-value search for the large tables, JSON
and error-history display, changelist links, message counts by status, and adopting a
row a service created."""

from __future__ import annotations

import json
from typing import Any

from django.db import models
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from campaigns.models import Message


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


def message_status_table(counts: dict[str, int], **filters: str | int) -> SafeString | str:
    """Message counts by status, each linking to those messages (`filters` narrow the
    Message changelist to the automation or broadcast the counts are of)."""
    if not counts:
        return "No messages yet."
    return format_html(
        "<table><tbody>{}</tbody></table>",
        format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td></tr>',
            (
                (_changelist_url(Message, **filters, status__exact=status), label, counts[status])
                for status, label in Message.Status.choices
                if status in counts
            ),
        ),
    )


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
