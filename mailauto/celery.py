"""The Celery application. Tasks are thin: they take ids and call one service."""

import gc
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailauto.settings")

app = Celery("mailauto")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def freeze_startup_objects(**kwargs: Any) -> None:
    """Move everything alive when a pool process starts (Django, its settings, URLconf,
    apps, models, the task modules: nearly all of it lives as long as the process) out
    of the garbage collector's reach, so its collections scan only what the tasks
    allocate. gc.freeze() frees nothing and never collects what stays referenced; a
    frozen object that later becomes garbage in a cycle is simply never freed."""
    gc.freeze()
