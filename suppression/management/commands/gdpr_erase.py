"""manage.py gdpr_erase --user-id X --reason "..." --actor "...": erase a contact (GDPR Art. 17)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from suppression.privacy import contact_erase, contact_for_user_id


class Command(BaseCommand):
    help = "Erase one contact's personal data everywhere (atomic, audited, irreversible)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user-id", required=True, help="The application's user id.")
        parser.add_argument("--reason", required=True, help="Why, e.g. 'Art. 17 request, ticket 123'.")
        parser.add_argument("--actor", required=True, help="Who performs it.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["reason"].strip() or not options["actor"].strip():
            raise CommandError("--reason and --actor must not be empty.")
        contact = contact_for_user_id(options["user_id"])
        if contact is None:
            raise CommandError(f"No contact with user id {options['user_id']!r}.")
        result = contact_erase(contact=contact, actor=options["actor"], reason=options["reason"])
        self.stdout.write(
            f"Erased contact {result.contact_id}: {result.messages} message(s) "
            f"({result.messages_stopped} stopped before sending), {result.events} event(s), "
            f"{result.consent_records} consent record(s), {result.suppressions} suppression(s) "
            f"replaced by a hashed one."
        )
        if result.messages_in_flight:
            self.stderr.write(
                f"{result.messages_in_flight} message(s) were being handed to the ESP; "
                "run the erasure again once they settle."
            )
        if result.other_contacts_with_address:
            self.stderr.write(
                f"Other contacts share this address (not erased, but now suppressed): "
                f"{result.other_contacts_with_address}"
            )
