"""manage.py gdpr_export --user-id X [--output file]: a contact's data as JSON (GDPR Art. 15/20)."""

from __future__ import annotations

import getpass
import json
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from suppression.privacy import contact_export, contact_for_user_id


class Command(BaseCommand):
    help = "Export everything held about one contact as JSON (audited)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user-id", required=True, help="The application's user id.")
        parser.add_argument("--output", help="Write to this file (created 0600) instead of stdout.")
        parser.add_argument("--actor", default="", help="Who asks (default: command:<os user>).")
        parser.add_argument("--reason", default="", help="Why, e.g. a ticket reference.")

    def handle(self, *args: Any, **options: Any) -> None:
        contact = contact_for_user_id(options["user_id"])
        if contact is None:
            raise CommandError(f"No contact with user id {options['user_id']!r}.")
        actor = options["actor"] or f"command:{getpass.getuser()}"
        data = contact_export(contact=contact, actor=actor, reason=options["reason"])
        text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)
        if options["output"]:
            # The export is personal data: readable by the operator only.
            fd = os.open(options["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            self.stderr.write(f"Exported contact {contact.pk} to {options['output']}.")
        else:
            self.stdout.write(text)
