"""The Celery application's worker setup."""

from __future__ import annotations

import gc

from celery.signals import worker_process_init
from django.test import SimpleTestCase

from mailauto.celery import freeze_startup_objects


class WorkerProcessInitTests(SimpleTestCase):
    def test_the_freeze_runs_when_a_pool_process_starts(self) -> None:
        self.assertIn(freeze_startup_objects, [ref() for _, ref in worker_process_init.receivers])

    def test_it_freezes_the_objects_alive_at_startup(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        freeze_startup_objects(sender=None)
        self.assertGreater(gc.get_freeze_count(), 0)
