"""Settings for mailauto: everything infrastructural comes from the environment.

With nothing set, the project runs on one machine with no servers: SQLite in WAL mode,
a filesystem Celery broker, and the local ESP sandbox as the ESP. With DATABASE_URL and
REDIS_URL set it runs on Postgres and Redis. The code paths are the same in both; only
the stores differ. Every MAILAUTO option is documented in the README ("Settings").
"""

from __future__ import annotations

import os
from pathlib import Path

import environ
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("MAILAUTO_VAR_DIR", BASE_DIR / "var"))

env = environ.Env()
# An optional .env file for local overrides; real environment variables win.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def env_secret(name: str, default: str | None = None) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE (Docker/K8s secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return env.str(name, default=default)


DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env_secret("SECRET_KEY") or "insecure-dev-key-set-SECRET_KEY-in-production"
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# The public base URL, used for links in emails (unsubscribe, preferences).
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "anymail",
    "django_celery_beat",
    "mailauto",
    "campaigns",
    "suppression",
    "webhooks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Sessions, auth and messages are Django's, except that they stand aside for the
    # paths below (mailauto/lib/sessionless.py).
    "mailauto.lib.sessionless.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "mailauto.lib.sessionless.AuthenticationMiddleware",
    "mailauto.lib.sessionless.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# Machine endpoints: no cookies, no users, no flash messages. The ESP webhooks
# (mailauto/urls.py mounts webhooks.urls here).
SESSIONLESS_PATH_PREFIXES = ["/webhooks/"]

ROOT_URLCONF = "mailauto.urls"
WSGI_APPLICATION = "mailauto.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------
# Embedded default: SQLite in WAL mode, with IMMEDIATE transactions so that two
# processes claiming work serialise on the write lock instead of failing with
# "database is locked" half-way through a transaction.
if env.str("DATABASE_URL", default=""):
    DATABASES = {"default": env.db("DATABASE_URL")}
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend with a health check that needs no SELECT 1 per request.
        DATABASES["default"]["ENGINE"] = "mailauto.lib.postgresql"
        # The hot statements (emit()'s INSERT, the webhook receiver's) prepare themselves
        # after this many runs on a connection (mailauto/lib/prepared.py); Django's own
        # queries bind on the client and never prepare. Off for a transaction-mode pooler
        # that cannot keep prepared statements.
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
            env.int("DB_PREPARE_THRESHOLD", default=5)
            if env.bool("DB_PREPARED_STATEMENTS", default=True)
            else None
        )
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "mailauto.sqlite3",
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache and Celery -----------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "mailauto.lib.redis_cache.RedisCache",
            "LOCATION": REDIS_URL,
            # Fail fast when Redis is unreachable: every cache user here (nudge markers,
            # rate limits, the suppression mirror) has a fallback, and none should hang
            # a request or a worker for the OS's connect timeout.
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 5},
        },
        # django-ratelimit's counters, one round trip per request (mailauto/lib/redis_cache.py).
        "ratelimit": {
            "BACKEND": "mailauto.lib.redis_cache.RateLimitCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 5},
        },
    }
    RATELIMIT_USE_CACHE = "ratelimit"
    CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
    # An unacknowledged task is redelivered after this long (acks_late); tasks hand over
    # to a fresh task within ~20 s, so an hour only ever matters for a dead worker.
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"visibility_timeout": 3600}
else:
    # No server: a cache shared by every process on this machine (files), and kombu's
    # filesystem transport as the broker. Both work across web, worker and beat.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }
    _broker_dir = VAR_DIR / "broker"
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
    CELERY_BROKER_TRANSPORT_OPTIONS = {  # type: ignore[no-redef]
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Exchange tables; kombu's default is ./control in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }

# Celery. The Postgres row is the truth and the queue only says "look now", so a lost
# task message delays work until the beat sweeper runs, never loses it.
CELERY_TIMEZONE = "UTC"
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=1)
CELERY_TASK_DEFAULT_QUEUE = "events"
CELERY_TASK_ROUTES = {
    "campaigns.tasks.events_*": {"queue": "events"},
    "campaigns.tasks.messages_*": {"queue": "sends"},
    "webhooks.tasks.*": {"queue": "webhooks"},
    "campaigns.tasks.sweep_*": {"queue": "housekeeping"},
    "suppression.tasks.*": {"queue": "housekeeping"},
    "suppression.compliance_tasks.*": {"queue": "housekeeping"},
}
# Autodiscovery finds only modules named tasks.py.
CELERY_IMPORTS = ["suppression.compliance_tasks"]
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- The ESP -------------------------------------------------------------------------
# MAILAUTO_ESP names any ESP Anymail supports ("postmark", "sendgrid", "mailgun", ...);
# its options come from ANYMAIL_<ESP>_<OPTION> variables (e.g. ANYMAIL_POSTMARK_SERVER_TOKEN,
# ANYMAIL_MAILGUN_API_KEY), exactly as Anymail names them. With nothing set, the ESP is
# Postmark pointed at the local sandbox.
ESP_SANDBOX_PORT = env.int("ESP_SANDBOX_PORT", default=8025)
ESP_NAME = env.str("MAILAUTO_ESP", default="postmark").lower()
# Resend takes an idempotency key only as an HTTP header, which Anymail cannot set: a
# thin subclass adds it (campaigns/esp_idempotency.py).
_BACKENDS = {"resend": "campaigns.esp_idempotency.ResendEmailBackend"}
EMAIL_BACKEND = env.str(
    "EMAIL_BACKEND", default=_BACKENDS.get(ESP_NAME, f"anymail.backends.{ESP_NAME}.EmailBackend")
)
ANYMAIL: dict[str, object] = {
    key.removeprefix("ANYMAIL_"): value
    for key, value in os.environ.items()
    if key.startswith("ANYMAIL_") and not key.endswith("_FILE")
}
for _key in [k for k in os.environ if k.startswith("ANYMAIL_") and k.endswith("_FILE")]:
    ANYMAIL[_key.removeprefix("ANYMAIL_").removesuffix("_FILE")] = Path(os.environ[_key]).read_text().strip()
if ESP_NAME == "postmark" and "POSTMARK_SERVER_TOKEN" not in ANYMAIL:
    ANYMAIL["POSTMARK_SERVER_TOKEN"] = "sandbox-server-token"
    ANYMAIL.setdefault("POSTMARK_API_URL", f"http://127.0.0.1:{ESP_SANDBOX_PORT}/")
if ESP_NAME == "resend" and "RESEND_API_KEY" not in ANYMAIL:  # the sandbox speaks Resend too
    ANYMAIL["RESEND_API_KEY"] = "sandbox-server-token"
    ANYMAIL.setdefault("RESEND_API_URL", f"http://127.0.0.1:{ESP_SANDBOX_PORT}/")
ANYMAIL.setdefault(
    "WEBHOOK_SECRET", env_secret("MAILAUTO_WEBHOOK_SECRET") or "sandbox:sandbox-webhook-secret"
)
ANYMAIL.setdefault("REQUESTS_TIMEOUT", (3.05, env.float("MAILAUTO_ESP_TIMEOUT", default=10.0)))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="mailauto demo <hello@mailauto.test>")

# --- mailauto's own options (documented in the README, "Settings") --------------------
MAILAUTO = {
    # Delivery
    "RATE_LIMIT_PER_SECOND": env.float("MAILAUTO_RATE_LIMIT", default=100.0),
    "RETRY_MAX_ATTEMPTS": env.int("MAILAUTO_RETRY_MAX_ATTEMPTS", default=5),
    "RETRY_BACKOFF_BASE_SECONDS": env.float("MAILAUTO_RETRY_BACKOFF_BASE", default=30.0),
    "RETRY_BACKOFF_MAX_SECONDS": env.float("MAILAUTO_RETRY_BACKOFF_MAX", default=3600.0),
    "SEND_BATCH_SIZE": env.int("MAILAUTO_SEND_BATCH_SIZE", default=500),
    "SEND_LEASE_SECONDS": env.int("MAILAUTO_SEND_LEASE_SECONDS", default=300),
    "UNKNOWN_RESEND_GRACE_SECONDS": env.int("MAILAUTO_UNKNOWN_RESEND_GRACE", default=6 * 3600),
    # The shared rate limit (campaigns/throttle/): a token bucket per ESP account in
    # Redis (or a state file under VAR_DIR without Redis). BURST: requests that may go
    # at once after a quiet spell (default: one second's worth). ACCOUNT: names the ESP
    # account the limit belongs to (default: a hash of the ESP's API key).
    "RATE_LIMIT_BURST": env.float(
        "MAILAUTO_RATE_LIMIT_BURST", default=env.float("MAILAUTO_RATE_LIMIT", default=100.0)
    ),
    "RATE_LIMIT_ACCOUNT": env.str("MAILAUTO_RATE_LIMIT_ACCOUNT", default=""),
    # Per mailbox provider (gmail, outlook, yahoo, icloud, other), messages/s, as JSON,
    # e.g. '{"gmail": 50, "yahoo": 20}'. Empty: no per-provider limit.
    "PROVIDER_RATE_LIMITS": env.json("MAILAUTO_PROVIDER_RATE_LIMITS", default={}),
    # Adaptive throttling (AIMD) of the shared rate: a 429 multiplies it by the factor
    # (not below MIN_RATE, not twice within the cooldown); clean sends add
    # INCREASE_FRACTION of the configured rate per ~second's worth of requests.
    "THROTTLE_DECREASE_FACTOR": env.float("MAILAUTO_THROTTLE_DECREASE_FACTOR", default=0.5),
    "THROTTLE_MIN_RATE": env.float("MAILAUTO_THROTTLE_MIN_RATE", default=1.0),
    "THROTTLE_INCREASE_FRACTION": env.float("MAILAUTO_THROTTLE_INCREASE_FRACTION", default=0.02),
    "THROTTLE_DECREASE_COOLDOWN_SECONDS": env.float("MAILAUTO_THROTTLE_DECREASE_COOLDOWN", default=2.0),
    # Warm-up (campaigns/warmup.py): the WarmupSchedule that applies is the one named
    # after this stream, or, when empty, after the domain of DEFAULT_FROM_EMAIL.
    "WARMUP_STREAM": env.str("MAILAUTO_WARMUP_STREAM", default=""),
    # Events
    "EVENTS_API_RATE_LIMIT": env.str("MAILAUTO_EVENTS_API_RATE_LIMIT", default="6000/m"),
    # ESP webhooks (webhooks/): per client IP, django-ratelimit syntax. ESPs post from a
    # few addresses in bursts after a broadcast, so the default is high.
    "WEBHOOK_RATE_LIMIT": env.str("MAILAUTO_WEBHOOK_RATE_LIMIT", default="60000/m"),
    # Suppress an address after this many soft bounces within this many days.
    "SOFT_BOUNCE_LIMIT": env.int("MAILAUTO_SOFT_BOUNCE_LIMIT", default=3),
    "SOFT_BOUNCE_WINDOW_DAYS": env.int("MAILAUTO_SOFT_BOUNCE_WINDOW_DAYS", default=7),
    "EVENT_BATCH_SIZE": env.int("MAILAUTO_EVENT_BATCH_SIZE", default=200),
    # How many tasks of each kind may drain a backlog at once (campaigns/tasks.py): set
    # to the worker processes that serve the events / sends queue (Procfile: 3).
    "EVENT_DRAINS": env.int("MAILAUTO_EVENT_DRAINS", default=3),
    "SEND_DRAINS": env.int("MAILAUTO_SEND_DRAINS", default=3),
    "EVENT_MAX_ATTEMPTS": env.int("MAILAUTO_EVENT_MAX_ATTEMPTS", default=5),
    "EVENT_LEASE_SECONDS": env.int("MAILAUTO_EVENT_LEASE_SECONDS", default=300),
    "SWEEP_INTERVAL_SECONDS": env.int("MAILAUTO_SWEEP_INTERVAL", default=30),
    # Templates
    "TEMPLATE_CACHE_TTL_SECONDS": env.int("MAILAUTO_TEMPLATE_CACHE_TTL", default=300),
    # Suppression
    "SUPPRESSION_STORAGE": env.str("MAILAUTO_SUPPRESSION_STORAGE", default="database"),
    "SUPPRESSION_SYNC_INTERVAL_SECONDS": env.int("MAILAUTO_SUPPRESSION_SYNC_INTERVAL", default=300),
    # Recipient pages (suppression/unsubscribe.py): unsubscribe links work whatever their
    # age; a preference-centre link (which can opt back in) for this many days.
    "PREFERENCES_LINK_MAX_AGE_DAYS": env.int("MAILAUTO_PREFERENCES_LINK_MAX_AGE_DAYS", default=365),
    # Per client IP on /u/ and /preferences/ (django-ratelimit syntax). An authentic
    # opt-out is honoured even over the limit.
    "RECIPIENT_RATE_LIMIT": env.str("MAILAUTO_RECIPIENT_RATE_LIMIT", default="60/m"),
    # Operations
    "METRICS_TOKEN": env_secret("MAILAUTO_METRICS_TOKEN") or "",
    # Compliance switches
    "GDPR": env.bool("MAILAUTO_GDPR", default=True),
    "CCPA": env.bool("MAILAUTO_CCPA", default=False),
    "CONSENT_CHECK": env.bool("MAILAUTO_CONSENT_CHECK", default=False),
    # Regions (Contact.region values, lower case) where GDPR makes consent a condition
    # of marketing mail; "unknown" stands for an empty region. Default: the EU/EEA
    # countries and "eu"/"eea", plus the UK (UK GDPR + PECR). See suppression/consent.py.
    "GDPR_REGIONS": [
        region.strip().lower()
        for region in env.list(
            "MAILAUTO_GDPR_REGIONS",
            default=[
                *["eu", "eea", "at", "be", "bg", "hr", "cy", "cz", "dk", "ee", "fi", "fr", "de", "gr"],
                *["hu", "ie", "it", "lv", "lt", "lu", "mt", "nl", "pl", "pt", "ro", "sk", "si", "es"],
                *["se", "is", "li", "no", "gb", "uk"],
            ],
        )
    ],
    # Purposes whose mail shares personal data with third parties (ads, partners):
    # blocked for contacts with do_not_sell when CCPA is on.
    "CCPA_SHARING_PURPOSES": env.list(
        "MAILAUTO_CCPA_SHARING_PURPOSES", default=["advertising", "partner-offers", "sponsored"]
    ),
    # Double opt-in: consent_collect() asks for confirmation by email instead of granting.
    "CONSENT_CONFIRM_MAX_AGE_SECONDS": env.int("MAILAUTO_CONSENT_CONFIRM_MAX_AGE", default=7 * 86400),
    # Data residency: regions whose contacts may be processed; empty means all.
    "ALLOWED_REGIONS": [
        region.strip().lower() for region in env.list("MAILAUTO_ALLOWED_REGIONS", default=[])
    ],
    # Reputation guard: pause an automation whose rates over the trailing window reach
    # these limits (with at least MIN_VOLUME messages handed to the ESP in the window).
    "REPUTATION_COMPLAINT_RATE": env.float("MAILAUTO_REPUTATION_COMPLAINT_RATE", default=0.003),
    "REPUTATION_BOUNCE_RATE": env.float("MAILAUTO_REPUTATION_BOUNCE_RATE", default=0.05),
    "REPUTATION_MIN_VOLUME": env.int("MAILAUTO_REPUTATION_MIN_VOLUME", default=100),
    "REPUTATION_WINDOW_HOURS": env.int("MAILAUTO_REPUTATION_WINDOW_HOURS", default=24),
}

# --- The rest of Django ----------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG and SITE_URL.startswith("https"))
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "mailauto.lib.structured_logs.KeyValueFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "mailauto.lib.structured_logs.JsonFormatter"},
    },
    # LOG_FORMAT=json for log shippers; key=value lines otherwise. Either way the ids
    # passed as `extra=` (event_id, message_id, …) are in the line, never PII.
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": env.str("LOG_FORMAT", default="plain")}
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

CELERY_BEAT_SCHEDULE = {
    "sweep-outbox": {
        "task": "campaigns.tasks.sweep_outbox",
        "schedule": float(MAILAUTO["SWEEP_INTERVAL_SECONDS"]),
    },
    "sweep-broadcasts": {
        # Starts scheduled broadcasts (so within this interval of their time) and
        # continues any audience a lost nudge or a killed worker left half-materialised.
        "task": "campaigns.tasks.sweep_broadcasts",
        "schedule": float(MAILAUTO["SWEEP_INTERVAL_SECONDS"]),
        "options": {"expires": float(MAILAUTO["SWEEP_INTERVAL_SECONDS"])},
    },
    "suppression-mirror-sync": {
        "task": "suppression.tasks.suppression_mirror_sync",
        "schedule": float(MAILAUTO["SUPPRESSION_SYNC_INTERVAL_SECONDS"]),
        # A rebuild still queued when the next one is due is superseded by it.
        "options": {"queue": "housekeeping", "expires": float(MAILAUTO["SUPPRESSION_SYNC_INTERVAL_SECONDS"])},
    },
    "warmup-advance": {
        # Shortly after midnight UTC: review yesterday, move each warm-up one step on or hold.
        "task": "campaigns.tasks.sweep_warmup",
        "schedule": crontab(hour=0, minute=5),
    },
    "reputation-check": {
        "task": "suppression.compliance_tasks.reputation_check",
        "schedule": 300.0,
        "options": {"expires": 300.0},
    },
}
