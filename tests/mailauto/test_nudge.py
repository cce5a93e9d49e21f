"""Debounced nudges: one pending nudge per kind, and no work left behind at the edge."""

from __future__ import annotations

from unittest import mock

from django.core.cache import cache
from django.test import SimpleTestCase

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

        def run_batch() -> int:
            calls.append(1)
            return next(batches)

        again = mock.Mock()
        with mock.patch.object(nudge, "settle", wraps=nudge.settle) as settle:
            handled = tasks._drain("test", run_batch, again)
        self.assertEqual(handled, 8)
        self.assertEqual(len(calls), 5)
        self.assertEqual(settle.call_count, 2)
        again.apply_async.assert_not_called()
