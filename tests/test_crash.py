"""Crash safety, end to end: SIGKILL a real worker mid-batch; nothing lost, nothing twice.

A real Celery worker sends through the sandbox (with latency, so requests are in flight
when it dies); the sandbox posts Postmark webhooks to this app's live server, which is
how messages whose fate the dead worker never recorded are reconciled.
"""

from __future__ import annotations

import collections
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from django.db import transaction
from django.test import LiveServerTestCase
from django.utils import timezone

import campaigns
from campaigns.models import Automation, EmailTemplate, EventType, Message, OutboxEvent, TemplateVersion
from campaigns.tasks import sweep_outbox
from mailauto.sandbox import SandboxServer
from tests import e2e

N = 150
FINAL = {Message.Status.SENT, Message.Status.DELIVERED}

WORKER_ENV = {
    # Short leases so a dead worker's claims come back within the test; small batches
    # so many requests are in flight; a short grace so a message whose request never
    # left is resent within the test (the sandbox's webhooks arrive in milliseconds).
    "MAILAUTO_SEND_LEASE_SECONDS": "3",
    "MAILAUTO_EVENT_LEASE_SECONDS": "3",
    "MAILAUTO_SEND_BATCH_SIZE": "10",
    "MAILAUTO_EVENT_BATCH_SIZE": "20",
    "MAILAUTO_UNKNOWN_RESEND_GRACE": "8",
    "MAILAUTO_RATE_LIMIT": "1000",
}


@pytest.mark.e2e
class KillWorkerTests(LiveServerTestCase):
    def setUp(self) -> None:
        e2e.purge_broker()
        self.sandbox = SandboxServer(
            port=0,
            latency_ms=150,
            webhook_url=f"{self.live_server_url}/webhooks/postmark/tracking/",
            webhook_auth="sandbox:sandbox-webhook-secret",
        ).start()
        self.addCleanup(self.sandbox.stop)
        self.log = Path(tempfile.mkstemp(prefix="mailauto-crash-", suffix=".log")[1])

        signed_up = EventType.objects.create(name="user.signed_up", schema={})
        template = EmailTemplate.objects.create(name="Welcome")
        TemplateVersion.objects.create(
            template=template,
            number=1,
            status=TemplateVersion.Status.PUBLISHED,
            published_at=timezone.now(),
            subject="Welcome {{ contact.first_name }}",
            html="<p>Hello {{ contact.first_name }}</p>",
        )
        Automation.objects.create(name="Welcome", trigger=signed_up, template=template, active=True)

    def start_worker(self):  # type: ignore[no-untyped-def]
        worker = e2e.start_worker(self.sandbox.url, log_path=self.log, extra_env=WORKER_ENV)
        self.addCleanup(e2e.stop_worker, worker)
        return worker

    def test_sigkill_mid_batch_loses_nothing_and_sends_nothing_twice(self) -> None:
        for n in range(N):
            campaigns.identify(f"u-{n}", email=f"person{n}@example.com", attributes={"first_name": f"N{n}"})
        with transaction.atomic():
            for n in range(N):
                campaigns.emit("user.signed_up", f"u-{n}", {}, event_id=f"e-{n}")

        first = self.start_worker()
        started = e2e.wait_until(lambda: len(self.sandbox.messages()) >= N // 4, timeout=60, interval=0.05)
        self.assertTrue(started, self.log.read_text()[-3000:])
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool children, mid-flight
        first.wait(timeout=10)
        sent_before_kill = len(self.sandbox.messages())
        unfinished = (
            Message.objects.exclude(status__in=FINAL).count()
            + OutboxEvent.objects.exclude(status=OutboxEvent.Status.PROCESSED).count()
        )

        self.start_worker()

        def settled() -> bool:
            sweep_outbox()  # what beat does: expire leases, resend after grace, nudge
            return (
                not OutboxEvent.objects.exclude(status=OutboxEvent.Status.PROCESSED).exists()
                and Message.objects.count() == N
                and not Message.objects.exclude(status__in=FINAL).exists()
            )

        done = e2e.wait_until(settled, timeout=120, interval=1.0)
        time.sleep(1)  # anything sent twice would have arrived by now
        statuses = collections.Counter(Message.objects.values_list("status", flat=True))
        self.assertTrue(done, f"not settled: {statuses}\n{self.log.read_text()[-3000:]}")

        received = collections.Counter(m["to"][0] for m in self.sandbox.messages())
        duplicates = {to: count for to, count in received.items() if count > 1}
        self.assertEqual(duplicates, {}, "sent twice")
        self.assertEqual(set(received), {f"person{n}@example.com" for n in range(N)}, "lost")
        # The kill really happened mid-run (otherwise this test proves nothing).
        self.assertLess(sent_before_kill, N)
        self.assertGreater(unfinished, 0, "the worker had finished before it was killed")
