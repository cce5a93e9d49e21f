"""End to end: emit → outbox → a real Celery worker → Anymail → the ESP sandbox.

Real processes, real Postgres, real Redis as the broker, real HTTP.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from django.db import transaction
from django.test import TransactionTestCase
from django.utils import timezone

import campaigns
from campaigns.models import Automation, EmailTemplate, EventType, Message, OutboxEvent, TemplateVersion
from mailauto.sandbox import SandboxServer
from tests import e2e

N = 40


@pytest.mark.e2e
class PipelineEndToEndTests(TransactionTestCase):
    def setUp(self) -> None:
        e2e.purge_broker()
        self.sandbox = SandboxServer(port=0).start()
        self.addCleanup(self.sandbox.stop)
        self.log = Path(tempfile.mkstemp(prefix="mailauto-worker-", suffix=".log")[1])
        self.worker = e2e.start_worker(self.sandbox.url, log_path=self.log)
        self.addCleanup(e2e.stop_worker, self.worker)

        signed_up = EventType.objects.create(
            name="user.signed_up", schema={"fields": {"plan": {"type": "string", "required": True}}}
        )
        template = EmailTemplate.objects.create(name="Welcome")
        TemplateVersion.objects.create(
            template=template,
            number=1,
            status=TemplateVersion.Status.PUBLISHED,
            published_at=timezone.now(),
            subject="Welcome {{ contact.first_name }}",
            html="<p>Hello {{ contact.first_name }}, you are on {{ payload.plan }}.</p>",
        )
        Automation.objects.create(name="Welcome", trigger=signed_up, template=template, active=True)

    def worker_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def test_n_events_become_exactly_n_emails_each_rendered_for_its_contact(self) -> None:
        for n in range(N):
            campaigns.identify(
                f"u-{n}", email=f"person{n}@example.com", attributes={"first_name": f"Name{n}"}
            )
        with transaction.atomic():
            for n in range(N):
                campaigns.emit(
                    "user.signed_up", f"u-{n}", {"plan": "pro" if n % 2 else "free"}, event_id=f"e-{n}"
                )
            # A retried emit of an event already emitted is the same event.
            campaigns.emit("user.signed_up", "u-0", {"plan": "free"}, event_id="e-0")

        arrived = e2e.wait_until(lambda: len(self.sandbox.messages()) >= N, timeout=90)
        self.assertTrue(arrived, f"only {len(self.sandbox.messages())} of {N} arrived\n{self.worker_log()}")
        # Let any duplicate that was going to happen arrive too before counting.
        e2e.wait_until(
            lambda: not Message.objects.filter(status__in=Message.IN_PROGRESS).exists(), timeout=30
        )

        accepted = self.sandbox.messages()
        self.assertEqual(len(accepted), N)
        by_recipient = {m["to"][0]: m for m in accepted}
        self.assertEqual(len(by_recipient), N, "a recipient got two emails")
        for n in range(N):
            email = by_recipient[f"person{n}@example.com"]
            self.assertEqual(email["subject"], f"Welcome Name{n}")
            self.assertIn(f"Hello Name{n}, you are on {'pro' if n % 2 else 'free'}.", email["html"])
        self.assertEqual(Message.objects.filter(status=Message.Status.SENT).count(), N)
        self.assertEqual(OutboxEvent.objects.filter(status=OutboxEvent.Status.PROCESSED).count(), N)
        self.assertEqual(
            set(Message.objects.values_list("esp_message_id", flat=True)), {m["message_id"] for m in accepted}
        )
