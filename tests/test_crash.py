"""Crash safety, end to end: SIGKILL a real worker mid-batch; nothing lost, nothing twice.

A real Celery worker sends through the sandbox; the sandbox posts Postmark webhooks to
this app's live server, which is how messages whose fate the dead worker never recorded
are reconciled. The kill is timed by state, not by the clock: the sandbox is slowed down
and told to drop the next answer, and the worker is killed only once that request has
reached the sandbox (its messages committed as SENDING, the answer not yet given), or,
for event processing, once the worker is blocked inside its transaction after claiming.
The test process runs the sweeper as beat would (sweep_outbox), with the same short
leases and grace period as the worker.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import LiveServerTestCase, override_settings
from django.utils import timezone

import campaigns
from campaigns.models import Automation, EmailTemplate, EventType, Message, OutboxEvent, TemplateVersion
from campaigns.tasks import sweep_outbox
from mailauto.sandbox import SandboxServer
from tests import e2e

N = 150
FINAL = {Message.Status.SENT, Message.Status.DELIVERED}
LEASE_SECONDS = 3
GRACE_SECONDS = 6
# The held request is answered (and its webhooks posted) only after its messages' lease
# has run out, so the sweeper has turned them UNKNOWN first, and well before the grace
# period has passed.
SLOW_ANSWER_MS = 5000
LATENCY_MS = 150

WORKER_ENV = {
    # Short leases so a dead worker's claims come back within the test; small batches
    # so many requests are made; a short grace so an unknown message with no webhook is
    # resent within the test.
    "MAILAUTO_SEND_LEASE_SECONDS": str(LEASE_SECONDS),
    "MAILAUTO_EVENT_LEASE_SECONDS": str(LEASE_SECONDS),
    "MAILAUTO_SEND_BATCH_SIZE": "10",
    "MAILAUTO_EVENT_BATCH_SIZE": "20",
    "MAILAUTO_UNKNOWN_RESEND_GRACE": str(GRACE_SECONDS),
    "MAILAUTO_RATE_LIMIT": "1000",
}


def sweeper_settings() -> override_settings:
    """The sweeper in this process uses the worker's grace period."""
    return override_settings(MAILAUTO={**settings.MAILAUTO, "UNKNOWN_RESEND_GRACE_SECONDS": GRACE_SECONDS})


@pytest.mark.e2e
class KillWorkerTestCase(LiveServerTestCase):
    delivery_webhooks = True

    def setUp(self) -> None:
        e2e.purge_broker()
        self.sandbox = SandboxServer(
            port=0,
            latency_ms=LATENCY_MS,
            webhook_url=f"{self.live_server_url}/webhooks/postmark/tracking/",
            webhook_auth="sandbox:sandbox-webhook-secret",
            delivery_webhooks=self.delivery_webhooks,
        ).start()
        self.addCleanup(self.sandbox.stop)
        self.log = Path(tempfile.mkstemp(prefix="mailauto-crash-", suffix=".log")[1])
        override = sweeper_settings()
        override.enable()
        self.addCleanup(override.disable)

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

    def emit_signups(self) -> None:
        for n in range(N):
            campaigns.identify(f"u-{n}", email=f"person{n}@example.com", attributes={"first_name": f"N{n}"})
        with transaction.atomic():
            for n in range(N):
                campaigns.emit("user.signed_up", f"u-{n}", {}, event_id=f"e-{n}")

    def start_worker(self) -> subprocess.Popen:
        worker = e2e.start_worker(self.sandbox.url, log_path=self.log, extra_env=WORKER_ENV)
        self.addCleanup(e2e.stop_worker, worker)
        return worker

    def kill(self, worker: subprocess.Popen) -> None:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool children
        worker.wait(timeout=10)

    def kill_while_a_request_is_in_flight(self, worker: subprocess.Popen) -> set[int]:
        """Kill `worker` while the sandbox holds one of its requests; return the ids of
        the messages that were SENDING at that moment."""
        started = e2e.wait_until(lambda: len(self.sandbox.messages()) >= N // 4, timeout=60, interval=0.05)
        self.assertTrue(started, self.log.read_text()[-3000:])
        # The next request is answered late and then not at all: once the sandbox has
        # taken the fault, that request's body is in and its batch is SENDING.
        self.sandbox.set_faults(latency_ms=SLOW_ANSWER_MS, drop=1)
        in_flight = e2e.wait_until(lambda: self.sandbox.faults()["drop"] == 0, timeout=30, interval=0.005)
        self.assertTrue(in_flight, self.log.read_text()[-3000:])
        self.kill(worker)
        sending = set(Message.objects.filter(status=Message.Status.SENDING).values_list("pk", flat=True))
        self.sandbox.set_faults(latency_ms=LATENCY_MS, drop=0)
        self.assertTrue(sending, "no message was SENDING when the worker was killed")
        self.assertLess(len(self.sandbox.messages()), N, "the worker had sent everything already")
        return sending

    def wait_until_settled(self, final: set[str]) -> set[int]:
        """Sweep until every event and message is done; return the ids of the messages
        seen UNKNOWN on the way."""
        seen_unknown: set[int] = set()

        def settled() -> bool:
            sweep_outbox()  # what beat does: expire leases, resend after grace, nudge
            seen_unknown.update(
                Message.objects.filter(status=Message.Status.UNKNOWN).values_list("pk", flat=True)
            )
            return (
                not OutboxEvent.objects.exclude(status=OutboxEvent.Status.PROCESSED).exists()
                and Message.objects.count() == N
                and not Message.objects.exclude(status__in=final).exists()
            )

        done = e2e.wait_until(settled, timeout=120, interval=0.5)
        self.sandbox.wait_for_webhooks(timeout=30)
        time.sleep(1)  # anything sent twice would have arrived by now
        statuses = collections.Counter(Message.objects.values_list("status", flat=True))
        self.assertTrue(done, f"not settled: {statuses}\n{self.log.read_text()[-3000:]}")
        return seen_unknown

    def received(self) -> collections.Counter[int]:
        """How many times the sandbox accepted each message (by its Message id)."""
        return collections.Counter(int(m["metadata"]["mailauto_message_id"]) for m in self.sandbox.messages())

    def assert_each_message_received_once(self) -> None:
        received = self.received()
        duplicates = {pk: count for pk, count in received.items() if count > 1}
        self.assertEqual(duplicates, {}, "sent twice")
        self.assertEqual(set(received), set(Message.objects.values_list("pk", flat=True)), "lost")
        addresses = collections.Counter(m["to"][0] for m in self.sandbox.messages())
        self.assertEqual(set(addresses), {f"person{n}@example.com" for n in range(N)}, "lost")
        self.assertEqual(max(addresses.values()), 1, "an address got two messages")


class KillWorkerTests(KillWorkerTestCase):
    def test_sigkill_mid_batch_loses_nothing_and_sends_nothing_twice(self) -> None:
        """Messages SENDING when their worker dies are held as UNKNOWN when their lease
        runs out and settled by the ESP's webhooks, not resent: the sandbox holds every
        message exactly once."""
        self.emit_signups()
        sending_at_kill = self.kill_while_a_request_is_in_flight(self.start_worker())

        self.start_worker()
        seen_unknown = self.wait_until_settled(FINAL)

        self.assert_each_message_received_once()
        # The batch the sandbox held when the worker died (the worker never heard the
        # answer) went SENDING → UNKNOWN → DELIVERED by its webhooks, handed off once.
        reconciled = Message.objects.filter(
            pk__in=sending_at_kill & seen_unknown,
            status=Message.Status.DELIVERED,
            resent_after_unknown=False,
            attempts=1,
        )
        self.assertTrue(reconciled.exists(), "no in-flight message was held as unknown and reconciled")
        self.assertFalse(Message.objects.filter(attempts__gt=1, resent_after_unknown=False).exists())


class KillWorkerWithoutWebhooksTests(KillWorkerTestCase):
    """The ESP never reports on the messages (no delivery webhooks), so the in-flight
    batch of the killed worker cannot be reconciled.

    What DESIGN.md promises ("Delivery engine"; delivery.messages_resend_unknown): such
    a message is held as UNKNOWN when its lease runs out and, after the grace period
    with no webhook, resent exactly once (a second unknown outcome would make it dead,
    never a third send). Postmark takes no idempotency key, so a message whose first
    request did reach the ESP is then received twice: that second delivery is the
    design's price for losing nothing, and it is the only duplicate allowed here.
    """

    delivery_webhooks = False

    def test_unreconciled_messages_are_resent_once_after_the_grace_period(self) -> None:
        self.emit_signups()
        sending_at_kill = self.kill_while_a_request_is_in_flight(self.start_worker())

        self.start_worker()
        self.wait_until_settled({Message.Status.SENT})

        resent = set(Message.objects.filter(resent_after_unknown=True).values_list("pk", flat=True))
        self.assertEqual(resent, sending_at_kill, "resent exactly the messages in flight at the kill")
        # Handed to the ESP twice: once before the kill, once after the grace period.
        attempts = collections.Counter(
            Message.objects.filter(pk__in=resent).values_list("attempts", flat=True)
        )
        self.assertEqual(attempts, {2: len(resent)})

        received = self.received()
        self.assertEqual(set(received), set(Message.objects.values_list("pk", flat=True)), "lost")
        twice = {pk for pk, count in received.items() if count == 2}
        self.assertEqual({pk: c for pk, c in received.items() if c > 2}, {}, "resent more than once")
        self.assertEqual(
            {pk for pk, c in received.items() if c > 1 and pk not in resent}, set(), "sent twice"
        )
        # The request the sandbox held when the worker died was accepted, so its
        # messages are exactly the ones delivered a second time by the resend.
        self.assertTrue(twice, "no resend reached the ESP a second time")
        self.assertTrue(twice <= resent)


class KillEventWorkerTests(KillWorkerTestCase):
    def test_sigkill_while_processing_events_loses_no_event_and_creates_no_message_twice(self) -> None:
        """The worker is killed after committing its claim on a batch of events and
        before its transaction creating their messages commits (it is held on a table
        lock that this test takes on the message table): the events come back when the
        lease runs out, and each still yields exactly one message, sent once."""
        self.emit_signups()
        table = Message._meta.db_table
        db = connection.settings_dict
        blocker = psycopg.connect(
            dbname=db["NAME"], user=db["USER"], host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432
        )
        self.addCleanup(blocker.close)
        blocker.execute(f'LOCK TABLE "{table}" IN SHARE MODE')  # blocks INSERTs, not reads

        worker = self.start_worker()

        def blocked_inserting_messages() -> bool:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query ILIKE %s",
                    [f'INSERT INTO "{table}"%'],
                )
                (waiting,) = cursor.fetchone()
            return waiting > 0

        held = e2e.wait_until(blocked_inserting_messages, timeout=60, interval=0.05)
        self.assertTrue(held, self.log.read_text()[-3000:])
        self.kill(worker)
        processing_at_kill = set(
            OutboxEvent.objects.filter(status=OutboxEvent.Status.PROCESSING).values_list("pk", flat=True)
        )
        self.assertTrue(processing_at_kill, "no event was claimed when the worker was killed")
        self.assertEqual(Message.objects.count(), 0)
        blocker.rollback()  # the dead worker's transaction can now only be rolled back

        self.start_worker()
        self.wait_until_settled(FINAL)

        self.assertEqual(OutboxEvent.objects.filter(status=OutboxEvent.Status.PROCESSED).count(), N)
        per_event = collections.Counter(Message.objects.values_list("event_id", flat=True))
        self.assertEqual(len(per_event), N, "an event has no message")
        self.assertEqual(max(per_event.values()), 1, "an event has two messages")
        # The claimed events were processed again after their lease ran out.
        reclaimed = OutboxEvent.objects.filter(pk__in=processing_at_kill, attempts__gte=2)
        self.assertEqual(reclaimed.count(), len(processing_at_kill))
        self.assert_each_message_received_once()
