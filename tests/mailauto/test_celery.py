"""The Celery application's worker setup."""

from __future__ import annotations

import gc
from pathlib import Path

from celery.signals import worker_process_init
from django.conf import settings
from django.test import SimpleTestCase

from mailauto.celery import app, freeze_startup_objects


class WorkerProcessInitTests(SimpleTestCase):
    def test_the_freeze_runs_when_a_pool_process_starts(self) -> None:
        self.assertIn(freeze_startup_objects, [ref() for _, ref in worker_process_init.receivers])

    def test_it_freezes_the_objects_alive_at_startup(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        freeze_startup_objects(sender=None)
        self.assertGreater(gc.get_freeze_count(), 0)


class DocumentedSettingsTests(SimpleTestCase):
    """The Celery settings DESIGN.md documents ("Celery settings, and why"), read from
    the configured application."""

    def test_a_task_is_acknowledged_only_after_it_ran(self) -> None:
        self.assertIs(app.conf.task_acks_late, True)

    def test_a_task_whose_worker_process_was_killed_is_redelivered(self) -> None:
        self.assertIs(app.conf.task_reject_on_worker_lost, True)

    def test_a_worker_process_holds_at_most_one_task(self) -> None:
        self.assertEqual(app.conf.worker_prefetch_multiplier, 1)

    def test_no_results_are_stored(self) -> None:
        self.assertIs(app.conf.task_ignore_result, True)
        self.assertIsNone(app.conf.result_backend)

    def test_the_redis_broker_redelivers_an_unacknowledged_task_after_an_hour(self) -> None:
        self.assertEqual(app.conf.broker_transport_options["visibility_timeout"], 3600)
        # As the Redis transport actually applies it (a real connection to the broker).
        with app.connection_for_write() as connection:
            self.assertEqual(connection.transport.driver_type, "redis")
            self.assertEqual(connection.default_channel.visibility_timeout, 3600)


# Every task, by name, and the queue DESIGN.md puts it on.
TASK_QUEUES = {
    "campaigns.tasks.events_process": "events",
    "campaigns.tasks.messages_send": "sends",
    "campaigns.tasks.sweep_outbox": "housekeeping",
    "campaigns.tasks.sweep_warmup": "housekeeping",
    "campaigns.tasks.sweep_broadcasts": "housekeeping",
    "suppression.tasks.suppression_mirror_sync": "housekeeping",
    "suppression.compliance_tasks.reputation_check": "housekeeping",
}
QUEUES = {"events", "sends", "webhooks", "housekeeping"}


def routed_queue(name: str) -> str:
    """The queue a task message for `name` is published to, as apply_async decides."""
    return app.amqp.router.route({}, name)["queue"].name


class TaskRoutingTests(SimpleTestCase):
    def test_each_task_goes_to_its_queue(self) -> None:
        app.loader.import_default_modules()
        routed = {name: routed_queue(name) for name in TASK_QUEUES}
        self.assertEqual(routed, TASK_QUEUES)

    def test_every_registered_task_is_listed_here(self) -> None:
        """A new task must be given a queue (and added to TASK_QUEUES) deliberately."""
        app.loader.import_default_modules()
        ours = {name for name in app.tasks if not name.startswith("celery.")}
        self.assertEqual(ours, set(TASK_QUEUES))

    def test_webhooks_tasks_go_to_the_webhooks_queue(self) -> None:
        self.assertEqual(routed_queue("webhooks.tasks.anything"), "webhooks")

    def test_the_default_queue_is_one_the_workers_consume(self) -> None:
        self.assertIn(app.conf.task_default_queue, QUEUES)

    def test_beat_sends_each_scheduled_task_to_a_consumed_queue(self) -> None:
        for entry in settings.CELERY_BEAT_SCHEDULE.values():
            queue = entry.get("options", {}).get("queue") or routed_queue(entry["task"])
            self.assertEqual(queue, TASK_QUEUES[entry["task"]], entry["task"])

    def test_the_worker_processes_consume_every_queue(self) -> None:
        procfile = (Path(__file__).resolve().parents[2] / "Procfile").read_text()
        [worker] = [line for line in procfile.splitlines() if line.startswith("worker:")]
        consumed = worker.split(" -Q ", 1)[1].split()[0].split(",")
        self.assertEqual(set(consumed), QUEUES)
