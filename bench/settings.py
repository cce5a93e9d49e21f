"""Django settings for the benchmarks: the project's own settings (from the environment,
as in production) plus django-post-office, the baseline the pipeline is compared with.

bench/pipeline.py sets DATABASE_URL, REDIS_URL and ANYMAIL_POSTMARK_* for every process
it starts; nothing here names a server.
"""

import copy
import os
from typing import Any

from mailauto.settings import *  # noqa: F403
from mailauto.settings import INSTALLED_APPS, LOGGING, MAILAUTO, env

INSTALLED_APPS = [*INSTALLED_APPS, "post_office"]

# post_office's own defaults (mail.py / settings.py in 3.12.0) except for the backend:
# BATCH_SIZE 100 emails per round, THREADS_PER_PROCESS 5, LOG_LEVEL 2 (a Log row for
# every email), sending order "-priority", no retries. The backend is the same Anymail
# Postmark backend mailauto uses, pointed at the same sandbox.
POST_OFFICE = {"BACKENDS": {"default": "anymail.backends.postmark.EmailBackend"}}

# The benchmark measures capacity, not the configured global send rate (100 requests/s
# by default, campaigns/throttle/ still takes a token per request); MAILAUTO_RATE_LIMIT
# wins when it is set.
if "MAILAUTO_RATE_LIMIT" not in os.environ:
    MAILAUTO = {**MAILAUTO, "RATE_LIMIT_PER_SECOND": 1_000_000.0, "RATE_LIMIT_BURST": 1_000_000.0}

# One INFO line per sent message would time the terminal, not the pipeline. post_office
# installs its own INFO handler unless its logger already has one: give it ours.
_logging: dict[str, Any] = copy.deepcopy(LOGGING)
_logging["root"]["level"] = env.str("LOG_LEVEL", default="WARNING")
_logging["loggers"]["post_office"] = {"handlers": ["console"], "level": "WARNING", "propagate": False}
LOGGING = _logging
