"""Debounced nudges: one pending nudge per kind, and no work left behind at the edge."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

from django.core.cache import cache
from django.test import SimpleTestCase, override_settings

from campaigns import tasks
from mailauto.lib import nudge


class NudgeTests(SimpleTestCase):
    def setUp(self) -> None:
        cache.delete("mailauto:nudge:test")

    def test_only_the_first_nudge_publishes_until_settled(self) -> None:
        task = mock.Mock()
        for _ in range(100):
            nudge.nudge(task, kind="test")
        self.assertEqual(task.apply_async.call_count, 1)
        nudge.settle("test")
        nudge.nudge(task, kind="test")
        self.assertEqual(task.apply_async.call_count, 2)

    def test_a_failed_publish_does_not_block_the_next_nudge(self) -> None:
        task = mock.Mock()
        task.apply_async.side_effect = [ConnectionError("broker down"), None]
        nudge.nudge(task, kind="test")  # must not raise
        nudge.nudge(task, kind="test")
        self.assertEqual(task.apply_async.call_count, 2)

    def test_drain_looks_once_more_after_settling(self) -> None:
        # Work appears right after the first empty batch (an emitter whose nudge was
        # swallowed by the marker): the final look must still pick it up.
        batches = iter([5, 0, 3, 0, 0])
        calls: list[int] = []

        def run_batch() -> tuple[int, bool]:
            calls.append(1)
            return next(batches), False

        again = mock.Mock()
        with mock.patch.object(nudge, "settle", wraps=nudge.settle) as settle:
            handled = tasks._drain("test", run_batch, again, slot=0, drains=1)
        self.assertEqual(handled, 8)
        self.assertEqual(len(calls), 5)
        self.assertEqual(settle.call_count, 2)
        again.apply_async.assert_not_called()

    def test_full_batches_recruit_up_to_the_configured_drains(self) -> None:
        again = mock.Mock()
        batches = iter([(10, True)] * 5 + [(0, False), (0, False)])
        tasks._drain("test", lambda: next(batches), again, slot=0, drains=3)
        slots = sorted(c.kwargs["kwargs"]["slot"] for c in again.apply_async.call_args_list)
        self.assertEqual(slots, [1, 2])  # slot 0 is this task; two helpers, no more
        cache.delete_many(["mailauto:nudge:test:1", "mailauto:nudge:test:2"])

    def test_a_drain_under_way_holds_its_marker_past_the_marker_ttl(self) -> None:
        # The emitter's marker lasts MARKER_TTL_SECONDS; a drain can outlive it (a task
        # runs up to TASK_TIME_BUDGET_SECONDS, then its continuation). After each batch
        # with work the drain re-sets the marker for HOLD_TTL_SECONDS, so emitters and
        # the sweeper publish no duplicate task behind it.
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        key = cache.make_key("mailauto:nudge:test")
        first, emitter_task = mock.Mock(), mock.Mock()
        nudge.nudge(first, kind="test")  # the nudge that started this drain
        ttls: list[int] = []

        def run_batch() -> tuple[int, bool]:
            if len(ttls) < 3:
                ttls.append(client.ttl(key))
                nudge.nudge(emitter_task, kind="test")
                return 5, False
            return 0, False

        tasks._drain("test", run_batch, mock.Mock(), slot=0, drains=1)
        self.assertTrue(all(ttl > nudge.MARKER_TTL_SECONDS for ttl in ttls), ttls)  # taken, then held
        emitter_task.apply_async.assert_not_called()
        # Drained and settled: the next emitter's nudge publishes again.
        nudge.nudge(emitter_task, kind="test")
        emitter_task.apply_async.assert_called_once_with(retry=False)


class DrainFailureAndRecruitTests(SimpleTestCase):
    def setUp(self) -> None:
        keys = ["mailauto:nudge:test", "mailauto:nudge:test:1", "mailauto:nudge:test:2"]
        cache.delete_many(keys)
        self.addCleanup(cache.delete_many, keys)

    def test_a_batch_that_raises_lets_go_of_the_marker(self) -> None:
        batches = iter([(5, False)])

        def run_batch() -> tuple[int, bool]:
            try:
                return next(batches)
            except StopIteration:
                raise RuntimeError("database went away") from None

        with self.assertRaises(RuntimeError):
            tasks._drain("test", run_batch, mock.Mock(), slot=0, drains=1)
        # Not held for HOLD_TTL_SECONDS: the next nudge (or the sweeper's) publishes.
        task = mock.Mock()
        nudge.nudge(task, kind="test")
        task.apply_async.assert_called_once_with(retry=False)

    def test_a_recruit_keeps_its_slot_while_it_waits_in_the_queue(self) -> None:
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        nudge.take("test")  # the drain recruiting
        recruit = mock.Mock()
        nudge.nudge(recruit, kind="test", slots=3)
        recruit.apply_async.assert_called_once_with(kwargs={"slot": 1}, retry=False)
        self.assertGreater(client.ttl(cache.make_key("mailauto:nudge:test:1")), nudge.MARKER_TTL_SECONDS)

    def test_without_the_marker_store_no_helper_is_recruited(self) -> None:
        recruit, emitted = mock.Mock(), mock.Mock()
        with mock.patch.object(nudge.cache, "add", side_effect=ConnectionError("redis down")):
            nudge.nudge(recruit, kind="test", slots=3)
            nudge.nudge(emitted, kind="test")
        recruit.apply_async.assert_not_called()  # helpers would multiply unchecked
        emitted.apply_async.assert_called_once_with(retry=False)  # an emitter still nudges


class DrainOwnershipTests(SimpleTestCase):
    def setUp(self) -> None:
        cache.delete("mailauto:nudge:test")
        self.addCleanup(cache.delete, "mailauto:nudge:test")

    def test_of_two_drains_on_one_slot_the_older_stops_and_hands_over_nothing(self) -> None:
        # A duplicate started (say the marker expired under a batch longer than its TTL):
        # the newer task takes the slot, the older one stops after its current batch.
        older_again, newer_again = mock.Mock(), mock.Mock()
        batches = 0

        def older_batch() -> tuple[int, bool]:
            nonlocal batches
            batches += 1
            if batches == 2:  # meanwhile the newer task starts and drains everything
                tasks._drain("test", lambda: (0, False), newer_again, slot=0, drains=1)
                nudge.take("test")  # ... and a third one is running now
            return 5, False

        with mock.patch.object(tasks, "TASK_TIME_BUDGET_SECONDS", 60.0):
            handled = tasks._drain("test", older_batch, older_again, slot=0, drains=1)
        self.assertEqual((handled, batches), (10, 2))  # stopped after the batch it had
        older_again.apply_async.assert_not_called()  # no continuation from the older one
        self.assertIsNotNone(cache.get("mailauto:nudge:test"))  # the newest task's marker stays

    def test_ownership_without_redis_follows_the_same_rules(self) -> None:
        # The embedded defaults use a file cache: no Lua, the same checks in Python.
        locmem = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
        with override_settings(CACHES=locmem):
            first = nudge.take("test")
            self.assertTrue(nudge.hold("test", 0, first))
            second = nudge.take("test")
            self.assertFalse(nudge.hold("test", 0, first))
            nudge.settle("test", token=first)  # not its slot any more: leaves the marker
            self.assertEqual(cache.get("mailauto:nudge:test"), second)
            nudge.settle("test", token=second)
            self.assertIsNone(cache.get("mailauto:nudge:test"))

    def test_a_drain_out_of_time_hands_over_to_one_fresh_task(self) -> None:
        again = mock.Mock()
        with mock.patch.object(tasks, "TASK_TIME_BUDGET_SECONDS", 0.05):
            tasks._drain("test", lambda: (5, False), again, slot=0, drains=1)
        again.apply_async.assert_called_once_with(kwargs={"slot": 0}, retry=False)
        # Its marker still held for the continuation: an emitter publishes nothing.
        emitter = mock.Mock()
        nudge.nudge(emitter, kind="test")
        emitter.apply_async.assert_not_called()


class NudgeSoonTests(SimpleTestCase):
    """nudge_soon(): the same nudge, from a background thread of the process."""

    def setUp(self) -> None:
        nudge.flush_pending()
        cache.delete("mailauto:nudge:test")
        self.addCleanup(cache.delete, "mailauto:nudge:test")

    def test_the_caller_does_not_wait_for_the_publish(self) -> None:
        release = threading.Event()
        task = mock.Mock()
        task.apply_async.side_effect = lambda **kwargs: release.wait(10)
        done = threading.Event()

        def caller() -> None:
            nudge.nudge_soon(task, kind="test")
            done.set()

        threading.Thread(target=caller).start()
        self.assertTrue(done.wait(5))  # returned while the publish is still blocked
        release.set()
        nudge.flush_pending()
        task.apply_async.assert_called_once_with(retry=False)

    def test_flush_sends_what_is_pending_and_keeps_the_marker_protocol(self) -> None:
        task = mock.Mock()
        for _ in range(50):
            nudge.nudge_soon(task, kind="test")
        nudge.flush_pending()
        self.assertEqual(task.apply_async.call_count, 1)  # one pending nudge per kind
        nudge.settle("test")
        nudge.nudge_soon(task, kind="test")
        nudge.flush_pending()
        self.assertEqual(task.apply_async.call_count, 2)

    def test_a_forked_child_nudges_from_its_own_thread(self) -> None:
        # Celery's prefork pool and WSGI servers fork after import; a child has none of
        # its parent's threads and must start its own.
        nudge.nudge_soon(mock.Mock(), kind="test")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into the test runner
            report = b"no report"
            try:
                called = threading.Event()
                task = mock.Mock()
                task.apply_async.side_effect = lambda **kwargs: called.set()
                # Its own kind: the parent's thread may set "test"'s marker at any moment.
                cache.delete("mailauto:nudge:test-child")
                nudge.nudge_soon(task, kind="test-child")
                report = b"ok" if called.wait(60) else b"not nudged within 60 s"
            except BaseException as err:
                report = repr(err).encode()
            finally:
                os.write(write_end, report)
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            self.assertEqual(pipe.read(), b"ok")
        cache.delete("mailauto:nudge:test-child")


def test_a_deferred_nudge_is_sent_at_exit_if_the_thread_never_ran(tmp_path: Path) -> None:
    # A management command emits and exits at once; its nudge must not die with it.
    sent = tmp_path / "sent"
    script = f"""
import django
from django.conf import settings
settings.configure(CACHES={{"default": {{"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}}})
django.setup()
from mailauto.lib import nudge
nudge._Deferred._run = lambda self: None  # the background thread never gets to it

class Task:
    def apply_async(self, **options):
        open({str(sent)!r}, "w").write(repr(options))

nudge.nudge_soon(Task(), kind="exit")
"""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=True, timeout=120)
    assert sent.read_text() == "{'retry': False}"
