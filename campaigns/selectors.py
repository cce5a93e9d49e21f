"""Reads that decide what gets sent: which template version an automation uses now."""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache

from campaigns.models import Automation, TemplateVersion


def _latest_key(template_id: int) -> str:
    return f"mailauto:template:{template_id}:latest-published"


def template_version_for(automation: Automation) -> TemplateVersion | None:
    """The version an automation sends right now: its pinned version, or the template's
    latest published one.

    The latest-version lookup is cached in the shared cache for
    MAILAUTO['TEMPLATE_CACHE_TTL_SECONDS'] (publishing clears it at once, so the TTL is
    only a bound on staleness if a clear is lost). Versions themselves are immutable once
    published, so caching their id is safe.
    """
    if automation.pinned_version_id:
        return automation.pinned_version
    key = _latest_key(automation.template_id)
    version_id = cache.get(key)
    if version_id is not None:
        version = TemplateVersion.objects.filter(
            pk=version_id, status=TemplateVersion.Status.PUBLISHED
        ).first()
        if version is not None:
            return version
    version = automation.template.latest_published()
    if version is not None:
        cache.set(key, version.pk, timeout=settings.MAILAUTO["TEMPLATE_CACHE_TTL_SECONDS"])
    return version


def template_versions_forget(template_id: int) -> None:
    """Drop the cached latest version of a template (called after a publish commits)."""
    cache.delete(_latest_key(template_id))
