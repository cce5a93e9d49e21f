"""Emit one event from the command line, exactly as application code would."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from campaigns.events import emit
from campaigns.exceptions import InvalidEvent


class Command(BaseCommand):
    help = 'Emit an event: manage.py emit_event user.signed_up demo-user \'{"plan": "pro"}\''

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("event_type")
        parser.add_argument("user_id")
        parser.add_argument("payload", nargs="?", default="{}", help="JSON object")
        parser.add_argument("--event-id", default=None)
        parser.add_argument("--source", default="cli")

    def handle(
        self,
        *args: Any,
        event_type: str,
        user_id: str,
        payload: str,
        event_id: str | None,
        source: str,
        **options: Any,
    ) -> None:
        try:
            data = json.loads(payload)
        except ValueError as err:
            raise CommandError(f"payload is not valid JSON: {err}") from None
        try:
            with transaction.atomic():
                emitted = emit(event_type, user_id, data, event_id=event_id, source=source)
        except InvalidEvent as err:
            raise CommandError(str(err)) from None
        self.stdout.write(self.style.SUCCESS(f"emitted {event_type} for {user_id}: event id {emitted}"))
