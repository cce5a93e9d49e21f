"""Load a small demo: an event type, a published template, an active automation on
user.signed_up, a seed list and a demo contact. Safe to run again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from campaigns.events import identify
from campaigns.models import Automation, EmailTemplate, EventType, SeedList
from campaigns.services import template_version_create, template_version_publish

WELCOME_HTML = """<h1>Welcome, {{ contact.first_name|default:"there" }}!</h1>
<p>Thanks for signing up{% if payload.plan == "pro" %} for <strong>Pro</strong>{% endif %}.</p>
<p>Here is how to get started:</p>
<ul>
  <li>Finish your profile</li>
  <li>Invite your team</li>
</ul>
<p><a href="https://example.com/start">Open your dashboard</a></p>"""


class Command(BaseCommand):
    help = "Load the demo configuration (idempotent)."

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        event_type, _ = EventType.objects.get_or_create(
            name="user.signed_up",
            defaults={
                "description": "A user created an account.",
                "schema": {
                    "fields": {
                        "plan": {"type": "string", "required": True, "enum": ["free", "pro"]},
                        "referrer": {"type": "string", "max_length": 200},
                    }
                },
            },
        )
        template, created = EmailTemplate.objects.get_or_create(
            name="Welcome", defaults={"description": "Onboarding welcome"}
        )
        if created or template.latest_published() is None:
            version = template_version_create(
                template=template,
                subject="Welcome to mailauto, {{ contact.first_name|default:'friend' }}",
                html=WELCOME_HTML,
            )
            template_version_publish(version=version)
        Automation.objects.get_or_create(
            name="Welcome new users",
            defaults={
                "trigger": event_type,
                "template": template,
                "purpose": "onboarding",
                "conditions": {},
                "active": True,
            },
        )
        SeedList.objects.get_or_create(
            name="Team", defaults={"addresses": "team@mailauto.test\nseed@mailauto.test"}
        )
        identify("demo-user", email="ada@example.com", attributes={"first_name": "Ada"})
        self.stdout.write(
            self.style.SUCCESS("Demo loaded: user.signed_up → 'Welcome new users' → template 'Welcome'.")
        )
