"""/webhooks/<esp>/tracking/ for every ESP Anymail has a tracking webhook for, each view
guarded by webhooks.views.tracking_view. Mounted at /webhooks/ by mailauto/urls.py."""

from __future__ import annotations

from anymail import urls as anymail_urls
from django.urls import URLPattern, path

from webhooks.views import tracking_view

app_name = "webhooks"

TRACKING_SUFFIX = "_tracking_webhook"


def _tracking_patterns() -> list[URLPattern]:
    # Taken from anymail.urls so that an ESP a later Anymail adds is mounted too. (Its
    # Mandrill view is combined tracking + inbound; it is mounted here at
    # mandrill/tracking/ like the others, and we receive only its tracking events.)
    patterns = []
    for pattern in anymail_urls.urlpatterns:
        name = pattern.name or ""
        if not isinstance(pattern, URLPattern) or not name.endswith(TRACKING_SUFFIX):
            continue
        esp = name.removesuffix(TRACKING_SUFFIX)
        view_class = pattern.callback.view_class  # type: ignore[attr-defined]
        patterns.append(path(f"{esp}/tracking/", tracking_view(esp, view_class), name=f"{esp}-tracking"))
    return patterns


urlpatterns = _tracking_patterns()
