"""Claims and leases of the delivery engine (campaigns/delivery.py) under real concurrency:
several threads, each with its own Postgres connection, against real row locks; and the
race between a worker whose lease expired and the worker that took the message over,
sent through the ESP sandbox over real HTTP."""

from __future__ import annotations

import threading
from datetime import timedelta
from unittest import mock

import time_machine
from django.conf import settings
from django.db import connection
from django.test import TransactionTestCase
from django.utils import timezone

from campaigns import delivery
from campaigns.delivery import SendBatchResult, messages_claim, messages_send_batch
from campaigns.models import Message
from tests import factories
from tests.conftest import use_sandbox

THREADS = 6


def run_in_threads(target, count: int) -> list:  # type: ignore[no-untyped-def]
    """Run `target(index)` in `count` threads released together; each thread uses its
    own database connection (Django's are per thread) and closes it when done."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = target(index)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


class ConcurrentClaimTests(TransactionTestCase):
    """messages_claim from several workers at once: SELECT … FOR UPDATE SKIP LOCKED and
    the conditional UPDATE must hand each claimable message to exactly one of them."""

    def setUp(self) -> None:
        self.assertEqual(connection.vendor, "postgresql")
        version = factories.published_version()
        contacts = [factories.contact(email=f"claim{n}@example.com") for n in range(90)]
        now = timezone.now()
        claimable = []
        for n, contact in enumerate(contacts[:80]):
            if n % 10 == 0:
                # Claimed by a worker that died: its lease has run out.
                kw = {
                    "status": Message.Status.CLAIMED,
                    "locked_until": now - timedelta(seconds=5),
                    "claims": 1,
                }
            else:
                kw = {"status": Message.Status.QUEUED, "send_after": now - timedelta(seconds=n)}
            claimable.append(factories.message(version, contact, **kw).pk)
        self.claimable = set(claimable)
        # Not claimable: not due yet, leased to a live worker, handed to the ESP, sent.
        rest = iter(contacts[80:])
        later = now + timedelta(hours=1)
        for kw in (
            {"status": Message.Status.QUEUED, "send_after": later},
            {"status": Message.Status.QUEUED, "send_after": later},
            {"status": Message.Status.CLAIMED, "locked_until": later},
            {"status": Message.Status.CLAIMED, "locked_until": later},
            {"status": Message.Status.SENDING, "locked_until": now - timedelta(seconds=5)},
            {"status": Message.Status.SENDING, "locked_until": later},
            {"status": Message.Status.UNKNOWN},
            {"status": Message.Status.SENT},
            {"status": Message.Status.DELIVERED},
            {"status": Message.Status.DEAD},
        ):
            factories.message(version, next(rest), **kw)

    def test_concurrent_claims_are_disjoint_and_together_take_every_claimable_message(self) -> None:
        def claim_until_empty(_index: int) -> list[list[int]]:
            batches = []
            while batch := messages_claim(limit=7):
                batches.append([m.pk for m in batch])
            return batches

        per_worker = run_in_threads(claim_until_empty, THREADS)

        claimed = [pk for batches in per_worker for batch in batches for pk in batch]
        self.assertEqual(len(claimed), len(set(claimed)), "a message was claimed by two workers")
        self.assertEqual(set(claimed), self.claimable)
        # Several workers took part (otherwise this shows nothing about concurrency).
        self.assertGreater(sum(1 for batches in per_worker if batches), 1)
        rows = Message.objects.filter(pk__in=self.claimable)
        self.assertEqual(set(rows.values_list("status", flat=True)), {Message.Status.CLAIMED})
        self.assertFalse(rows.filter(locked_until__lte=timezone.now()).exists())

    def test_one_round_of_simultaneous_claims_takes_each_message_once(self) -> None:
        """All workers claim at the same moment, once: the batches are disjoint, and no
        worker comes back empty while messages it could have taken were left over."""
        per_worker = run_in_threads(lambda _index: [m.pk for m in messages_claim(limit=10)], THREADS)

        claimed = [pk for batch in per_worker for pk in batch]
        self.assertEqual(len(claimed), len(set(claimed)), "a message was claimed by two workers")
        self.assertTrue(set(claimed) <= self.claimable)
        # 6 workers x 10 < 80 claimable: nobody goes without while messages are left.
        self.assertEqual([len(batch) for batch in per_worker], [10] * THREADS)


class ExpiredLeaseRaceTests(TransactionTestCase):
    """Worker A claims a message and stalls past its lease; worker B reclaims it. When
    both go on to hand it off, exactly one moves it to SENDING and sends it; the ESP
    receives it once."""

    def setUp(self) -> None:
        self.sandbox = use_sandbox(self)
        version = factories.published_version(subject="Hello {{ contact.first_name }}")
        contact = factories.contact(email="race@example.com", first_name="Ada")
        self.message = factories.message(version, contact)
        self.lease = timedelta(seconds=settings.MAILAUTO["SEND_LEASE_SECONDS"])

    def claim_by_a_then_by_b(self) -> tuple[list[Message], list[Message]]:
        """A claims now; B claims once A's lease has run out (the clock moves on)."""
        claimed_by_a = messages_claim(limit=10)
        self.assertEqual([m.pk for m in claimed_by_a], [self.message.pk])
        with time_machine.travel(timezone.now() + self.lease + timedelta(seconds=1)):
            claimed_by_b = messages_claim(limit=10)
        self.assertEqual([m.pk for m in claimed_by_b], [self.message.pk], "B could not reclaim it")
        return claimed_by_a, claimed_by_b

    @staticmethod
    def send_claimed(batch: list[Message]) -> SendBatchResult:
        """The rest of messages_send_batch for a batch this worker claimed earlier."""
        with mock.patch.object(delivery, "messages_claim", return_value=batch):
            return messages_send_batch()

    def assert_sent_exactly_once(self, results: list[SendBatchResult]) -> None:
        self.assertEqual(sorted(r.sent for r in results), [0, 1])
        self.assertEqual(sorted(r.requests for r in results), [0, 1], "both workers called the ESP")
        self.message.refresh_from_db()
        self.assertEqual(self.message.status, Message.Status.SENT)
        self.assertEqual(self.message.attempts, 1, "handed off twice")
        self.assertEqual(self.message.claims, 2)
        self.assertEqual([m["to"] for m in self.sandbox.messages()], [["race@example.com"]])

    def test_the_worker_that_lost_its_lease_is_refused_after_the_new_owner_sent(self) -> None:
        claimed_by_a, claimed_by_b = self.claim_by_a_then_by_b()
        by_b = self.send_claimed(claimed_by_b)
        by_a = self.send_claimed(claimed_by_a)
        self.assertEqual((by_b.sent, by_a.sent), (1, 0))
        self.assert_sent_exactly_once([by_a, by_b])

    def test_the_stale_worker_is_refused_even_when_it_hands_off_first(self) -> None:
        claimed_by_a, claimed_by_b = self.claim_by_a_then_by_b()
        by_a = self.send_claimed(claimed_by_a)
        # A's hand-off names the lease A took; the row now holds B's: A leaves it alone
        # (no send, no requeue) and B, its owner, sends it.
        self.assertEqual((by_a.sent, by_a.requests), (0, 0))
        self.message.refresh_from_db()
        self.assertEqual(self.message.status, Message.Status.CLAIMED)
        by_b = self.send_claimed(claimed_by_b)
        self.assertEqual(by_b.sent, 1)
        self.assert_sent_exactly_once([by_a, by_b])

    def test_simultaneous_hand_offs_send_it_once(self) -> None:
        claimed_by_a, claimed_by_b = self.claim_by_a_then_by_b()
        batches = {"a": claimed_by_a, "b": claimed_by_b}
        names = ["a", "b"]

        def worker(index: int) -> SendBatchResult:
            # Each thread resumes its own worker's batch, through its own connection.
            return messages_send_batch_for(batches[names[index]])

        real_claim = delivery.messages_claim
        batch_of_thread: dict[int, list[Message]] = {}

        def messages_send_batch_for(batch: list[Message]) -> SendBatchResult:
            batch_of_thread[threading.get_ident()] = batch
            return messages_send_batch()

        def claim(*, limit: int) -> list[Message]:
            return batch_of_thread.get(threading.get_ident()) or real_claim(limit=limit)

        with mock.patch.object(delivery, "messages_claim", side_effect=claim):
            results = run_in_threads(worker, 2)
        self.assert_sent_exactly_once(results)
