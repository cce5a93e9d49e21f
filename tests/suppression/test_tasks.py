"""The beat task that keeps the Redis mirror in step with Postgres."""

from __future__ import annotations

import redis
from django.conf import settings
from django.test import SimpleTestCase, override_settings

from suppression import cache, tasks


class MirrorSyncTaskTests(SimpleTestCase):
    def test_beat_runs_the_sync_every_interval_on_the_housekeeping_queue(self) -> None:
        entry = settings.CELERY_BEAT_SCHEDULE["suppression-mirror-sync"]

        self.assertEqual(entry["task"], tasks.suppression_mirror_sync.name)
        self.assertEqual(entry["schedule"], float(settings.MAILAUTO["SUPPRESSION_SYNC_INTERVAL_SECONDS"]))
        self.assertEqual(entry["options"]["queue"], "housekeeping")

    def test_with_database_storage_the_task_deletes_a_leftover_mirror(self) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL)
        self.addCleanup(client.close)
        client.hset(cache.MIRROR_KEY, cache.COMPLETE_FIELD, "left over from redis storage")

        with override_settings(MAILAUTO={**settings.MAILAUTO, "SUPPRESSION_STORAGE": "database"}):
            self.assertEqual(tasks.suppression_mirror_sync(), 0)

        self.assertFalse(client.exists(cache.MIRROR_KEY))
