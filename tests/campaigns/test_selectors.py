"""Which template version an automation sends, and its cache."""

from __future__ import annotations

from django.core.cache import cache
from django.test import TestCase

from campaigns.selectors import template_version_for
from campaigns.services import template_version_create, template_version_publish
from tests import factories


class TemplateVersionForTests(TestCase):
    def setUp(self) -> None:
        cache.clear()
        self.v1 = factories.published_version()
        self.automation = factories.automation(factories.event_type(), self.v1)

    def test_latest_published_is_cached_then_refreshed_when_a_new_version_is_published(self) -> None:
        self.assertEqual(template_version_for(self.automation), self.v1)
        with self.assertNumQueries(1):  # the cached id, checked to be still published
            self.assertEqual(template_version_for(self.automation), self.v1)
        with self.captureOnCommitCallbacks(execute=True):
            v2 = template_version_create(template=self.v1.template, subject="v2", html="<p>v2</p>")
            template_version_publish(version=v2)
        self.assertEqual(template_version_for(self.automation), v2)

    def test_drafts_are_never_used(self) -> None:
        template_version_create(template=self.v1.template, subject="draft", html="<p>draft</p>")
        self.assertEqual(template_version_for(self.automation), self.v1)

    def test_pinned_version_wins(self) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            v2 = template_version_create(template=self.v1.template, subject="v2", html="<p>v2</p>")
            template_version_publish(version=v2)
        self.automation.pinned_version = self.v1
        self.assertEqual(template_version_for(self.automation), self.v1)
