"""Django settings, all from the environment (see portal/env.py and README "Configuration").

Two modes share one code path:
- ``OPENTINKER_MODE=embedded`` (default): servers started by ``manage.py opentinker up`` under ``var/``,
  secrets generated once into ``var/secrets.env``, plain HTTP on localhost.
- ``OPENTINKER_MODE=production``: every secret and URL must come from the environment; HTTPS-only cookies,
  HSTS, SSL redirect. ``manage.py check --deploy`` is clean in this mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dj_database_url

from opentinker.egress import parse_networks, parse_scoped_allow_lists
from opentinker.env.archive import MAX_ARCHIVE_BYTES
from portal.env import Env, ensure_embedded_secrets, token_peppers

BASE_DIR = Path(__file__).resolve().parent.parent
_probe = Env()
VAR_DIR = Path(_probe.str("OPENTINKER_VAR_DIR", str(BASE_DIR / "var")))
MODE = _probe.str("OPENTINKER_MODE", "embedded")
if MODE not in ("embedded", "production"):
    raise ValueError(f"OPENTINKER_MODE must be 'embedded' or 'production', got {MODE!r}")
EMBEDDED = MODE == "embedded"

if EMBEDDED:
    ensure_embedded_secrets(VAR_DIR / "secrets.env")
    env = Env(VAR_DIR / "services.env", VAR_DIR / "secrets.env")
else:
    env = Env()

SECRET_KEY = env.str("SECRET_KEY")
# The pepper keys the HMAC of API-token secrets; it lives outside the database so a database dump alone
# cannot be used to check guesses offline.
# Several peppers may be live at once so that one can be rotated without revoking every token (README
# "Rotating the token pepper"): TOKEN_PEPPERS, newest first. TOKEN_PEPPER below is the newest one's value
# (job tokens and other short-lived digests use it).
TOKEN_PEPPERS = token_peppers(env.get("TOKEN_PEPPERS"), env.get("TOKEN_PEPPER"))
TOKEN_PEPPER = next(iter(TOKEN_PEPPERS.values()))
DEBUG = env.bool("DEBUG", False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if EMBEDDED else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", [])

_database_url = env.get("DATABASE_URL")
if not _database_url:
    raise ValueError(
        "DATABASE_URL is not set and no embedded database is running: run `python manage.py opentinker up` "
        "(or `make demo`), or set DATABASE_URL to your PostgreSQL server"
    )
DATABASES = {
    "default": dj_database_url.parse(_database_url, conn_max_age=env.int("DB_CONN_MAX_AGE", 0, minimum=0))
}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ValueError("OpenTinker runs on PostgreSQL only (DATABASE_URL must start with postgres://)")
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = 10
# Under ASGI every request runs in a thread of its own, so DB_CONN_MAX_AGE keeps nothing between requests: the
# production server pools connections per process instead (psycopg_pool; README "Running in production").
DB_POOL_MAX_SIZE = env.int("DB_POOL_MAX_SIZE", 0, minimum=0)
if DB_POOL_MAX_SIZE:
    if DATABASES["default"]["CONN_MAX_AGE"]:
        raise ValueError("DB_POOL_MAX_SIZE and DB_CONN_MAX_AGE exclude each other: set one of them")
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 1, "max_size": DB_POOL_MAX_SIZE, "timeout": 10}
# Seconds a process trusts a token it authenticated without asking the database again (0: never); a revocation
# reaches the other processes within this (portal/services/token_cache.py). deploy/web.py sets 2.
API_AUTH_CACHE_SECONDS = env.seconds("API_AUTH_CACHE_SECONDS", 0, finite=True)

REDIS_URL = env.str("REDIS_URL", "")
if not REDIS_URL:
    raise ValueError(
        "REDIS_URL is not set and no embedded Valkey is running: run `python manage.py opentinker up`, "
        "or set REDIS_URL to your Redis/Valkey server"
    )
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

OBJECT_STORE_URL = env.str("OBJECT_STORE_URL", f"file://{VAR_DIR / 'objects'}")
S3_ENDPOINT_URL = env.get("S3_ENDPOINT_URL") or None  # for S3-compatible stores other than AWS
# Signed download links for checkpoints stay valid this long.
OBJECT_STORE_LINK_SECONDS = env.int("OBJECT_STORE_LINK_SECONDS", 900, minimum=1)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "portal",
    "env_registry",
    "api",
    "api.tinker",
]

# Every one async-capable without a thread hop (portal/async_middleware.py): under ASGI the chain runs on the
# event loop, a sync view costs one hop and an async view (the Tinker API's long poll) none. Django's own and
# WhiteNoise's appear as their portal.async_middleware subclasses; a sync-only middleware added here would put
# the chain back in a thread (tests/portal/test_async_middleware.py fails then).
MIDDLEWARE = [
    "portal.observability.middleware.RequestObservabilityMiddleware",  # request id, per-route metrics
    "portal.async_middleware.AsyncSecurityMiddleware",
    "api.middleware.ApiRequestGuardMiddleware",
    "portal.async_middleware.AsyncWhiteNoiseMiddleware",
    "portal.async_middleware.AsyncSessionMiddleware",
    "portal.async_middleware.AsyncCommonMiddleware",
    "portal.async_middleware.AsyncCsrfViewMiddleware",
    "portal.async_middleware.AsyncAuthenticationMiddleware",
    "portal.middleware.AuditContextMiddleware",
    "portal.async_middleware.AsyncMessageMiddleware",
    "portal.async_middleware.AsyncXFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.web.context.portal",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Every password check goes through the sign-in lock-out (portal/services/throttle.py, counted in Valkey).
AUTHENTICATION_BACKENDS = ["portal.auth_backends.ThrottledModelBackend"]
# Failures per username and client address in this window (the cool-off); per address over all usernames.
SIGNIN_MAX_FAILURES = env.int("SIGNIN_MAX_FAILURES", 5, minimum=1)
SIGNIN_LOCKOUT_SECONDS = env.int("SIGNIN_LOCKOUT_SECONDS", 900, minimum=1)
SIGNIN_MAX_FAILURES_PER_IP = env.int("SIGNIN_MAX_FAILURES_PER_IP", 50, minimum=1)
SIGNUP_MAX_PER_IP = env.int("SIGNUP_MAX_PER_IP", 10, minimum=1)
SIGNUP_WINDOW_SECONDS = env.int("SIGNUP_WINDOW_SECONDS", 3600, minimum=1)
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
# The embedded default serves static files straight from the apps (no collectstatic step);
# production serves the collected, compressed and hashed copies.
WHITENOISE_USE_FINDERS = EMBEDDED
STATIC_ROOT = None if EMBEDDED else Path(env.str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if EMBEDDED
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Request size limits. API bodies are capped by api.parsers (API_MAX_BODY_BYTES, answered with 413);
# these cap form posts and uploads everywhere else.
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", 256 * 1024, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
DATA_UPLOAD_MAX_NUMBER_FIELDS = 500

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["api.permissions.HasScope"],
    "DEFAULT_PARSER_CLASSES": ["api.parsers.LimitedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["api.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env.rate("API_RATE_LIMIT", "1200/min")},
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "OpenTinker API",
    "DESCRIPTION": "Reinforcement learning as a service for LLM agents: jobs, metrics, checkpoints, tokens.",
    "VERSION": "1.0.0",
    # 3.1 speaks JSON Schema 2020-12, which is what pydantic emits for the JobSpec body.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and ReDoc from the sidecar package: the docs work with no CDN and no outside network.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "ENUM_NAME_OVERRIDES": {
        "JobStateEnum": "opentinker.spec.JobState",
        "JobKindEnum": "opentinker.spec.JobKind",
        "RoleEnum": "portal.models.orgs.Role",
        "ScopeEnum": "portal.models.tokens.Scope",
        "UploadKindEnum": "env_registry.models.Upload.Kind",
        "ValidationStatusEnum": "env_registry.models.ValidationStatus",
    },
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "ApiToken": {"type": "http", "scheme": "bearer", "bearerFormat": "otk_<lookup>_<secret>"}
        }
    },
    "SECURITY": [{"ApiToken": []}],
}

# Celery: the database row is the truth, a message only nudges (see ARCHITECTURE.md).
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = False  # opted into per idempotent task
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Longer than any task's time limit, so a slow task is never delivered to a second worker while it runs.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TIMEZONE = "UTC"
CELERY_IMPORTS = ["workers.env_tasks"]

# Environment packages are validated (imported, one smoke episode in the sandbox) on upload: inline in the
# embedded default, by a Celery task in production so a hostile package never holds a web worker.
ENV_VALIDATION_MODE = env.choice(
    "ENV_VALIDATION_MODE", "inline" if EMBEDDED else "celery", ("inline", "celery")
)
# The validation's smoke episode: each call into the package may take this long.
ENV_VALIDATION_CALL_TIMEOUT_S = env.seconds("ENV_VALIDATION_CALL_TIMEOUT_S", 5, finite=True, positive=True)
# The largest environment package archive an upload may carry (web form and API alike); never more than the
# runtime fetches (opentinker.env.archive.MAX_ARCHIVE_BYTES), or a package would upload that no job can run.
ENV_ARCHIVE_MAX_BYTES = env.int(
    "ENV_ARCHIVE_MAX_BYTES", MAX_ARCHIVE_BYTES, minimum=1, maximum=MAX_ARCHIVE_BYTES
)
# What one organization's registry models, datasets and uploads in progress may take in all (the uploads
# declare their sizes first, so an upload that would pass it is refused before a byte arrives). 20 GiB.
REGISTRY_MAX_BYTES = env.int("REGISTRY_MAX_BYTES", 20 * 1024**3, minimum=1)
# Hugging Face Hub repositories that `manage.py registry_import_model` may copy into a registry: fnmatch
# patterns (`Qwen/*`, `HuggingFaceTB/SmolLM2-135M`), comma-separated; none by default (imports off).
HUB_IMPORT_ALLOW = env.list("HUB_IMPORT_ALLOW", [])
# Where imports fetch from: the Hub's API (or a server mirroring it), or `file:///dir`, a local mirror laid
# out as `<dir>/<owner>/<name>/` (air-gapped servers, and the tests: these machines cannot reach the Hub).
HUB_ENDPOINT = env.str("HUB_ENDPOINT", "https://huggingface.co")

# Where job runtimes reach the ingest API (the launcher hands it to each job with a job token).
INGEST_BASE_URL = env.str("INGEST_BASE_URL", "http://127.0.0.1:8000")
# Per job: guards against a runtime stuck in a retry loop, not against normal reporting.
INGEST_RATE_LIMIT = env.rate("INGEST_RATE_LIMIT", "100/s")
# The Tinker-compatible API (api/tinker/): how long retrieve_future holds a poll open (under the SDK's 45 s),
# and its body limit (the SDK splits forward_backward at ~5 MB).
TINKER_POLL_HOLD_SECONDS = env.int("TINKER_POLL_HOLD_SECONDS", 25, minimum=1, maximum=40)
TINKER_MAX_BODY_BYTES = env.int("TINKER_MAX_BODY_BYTES", 16 * 1024 * 1024, minimum=1024)
# The shared model servers' work limits per call: a sequence's tokens (prompt plus max_tokens; a datum), a
# forward_backward's tokens in all, and the calls an organization may have in flight (more get a 429).
TINKER_MAX_CONTEXT_TOKENS = env.int("TINKER_MAX_CONTEXT_TOKENS", 32768, minimum=16)
TINKER_MAX_CALL_TOKENS = env.int("TINKER_MAX_CALL_TOKENS", 1_048_576, minimum=16)
TINKER_MAX_PENDING_FUTURES = env.int("TINKER_MAX_PENDING_FUTURES", 1024, minimum=1)
# The model servers' outcome ingest: a forward_backward's log-probs are ~40 bytes of JSON a token (a model
# server posts at most 8 MiB at once, one larger outcome alone).
TINKER_MAX_INGEST_BYTES = env.int("TINKER_MAX_INGEST_BYTES", 64 * 1024 * 1024, minimum=1024)
# Model servers started on demand (portal/services/model_servers.py): a Tinker call for a base model with no
# server enqueues a model-server job of the platform organization; it exits after this long without work
# (0: never), holds this many GPUs (0: a CPU slot), prefers this pool ("" any), and its one-server lease lasts
# this long (a killed server's successor waits for it). AUTOSTART off: operators start servers by hand.
OPENTINKER_TINKER_AUTOSTART = env.bool("OPENTINKER_TINKER_AUTOSTART", True)
OPENTINKER_TINKER_IDLE_EXIT_S = env.seconds("OPENTINKER_TINKER_IDLE_EXIT_S", 600, finite=True)
OPENTINKER_TINKER_SERVER_GPUS = env.int("OPENTINKER_TINKER_SERVER_GPUS", 0, minimum=0, maximum=64)
OPENTINKER_TINKER_POOL = env.str("OPENTINKER_TINKER_POOL", "")
# Who serves a model server's sample / compute_logprobs: our decode loop, or vLLM's multi-LoRA (GPUs)
OPENTINKER_TINKER_SAMPLER = env.choice("OPENTINKER_TINKER_SAMPLER", "decode", ("decode", "vllm"))
OPENTINKER_TINKER_LEASE_TTL_S = env.seconds("OPENTINKER_TINKER_LEASE_TTL_S", 60, finite=True, positive=True)
# Job tokens live this long (0: the job's max_hours plus an hour); a bootstrap token (single-use, it fetches
# the job token and the environment secret on a Ray cluster) this long, never forever.
JOB_TOKEN_TTL_SECONDS = env.int("JOB_TOKEN_TTL_SECONDS", 0, minimum=0)
OPENTINKER_BOOTSTRAP_TTL_S = env.seconds("OPENTINKER_BOOTSTRAP_TTL_S", 600, finite=True)

# Live metrics and logs (portal/services/live.py, api/views/stream.py): the Valkey stream per job, kept this
# long and this many entries; what a fresh viewer replays; how often the stream is read and kept alive.
LIVE_STREAM_MAXLEN = env.int("LIVE_STREAM_MAXLEN", 10_000, minimum=1)
LIVE_STREAM_TTL_SECONDS = env.int("LIVE_STREAM_TTL_SECONDS", 7 * 86400, minimum=1)
LIVE_LOG_REPLAY_LINES = env.int("LIVE_LOG_REPLAY_LINES", 1000, minimum=0)
LIVE_REPLAY_MARGIN_SECONDS = env.seconds("LIVE_REPLAY_MARGIN_SECONDS", 30, finite=True)
LIVE_POLL_SECONDS = env.seconds("LIVE_POLL_SECONDS", 2, finite=True, positive=True)
SSE_HEARTBEAT_SECONDS = env.seconds("SSE_HEARTBEAT_SECONDS", 15, finite=True, positive=True)
# Readiness: how long Celery beat or the workers may stay silent before /readyz answers 503.
HEALTH_MAX_SILENCE_S = env.seconds("HEALTH_MAX_SILENCE_S", 60)

# Scheduling (portal/services/scheduler.py, portal/scheduling/): fair-share usage decays with this half-life;
# a queued job reserves capacity after waiting this long (inf: never); the queue's explanation is shared
# this long (at most 60 s). Celery beat runs the passes this often (workers/beat.py).
OPENTINKER_FAIR_SHARE_HALF_LIFE_S = env.seconds("OPENTINKER_FAIR_SHARE_HALF_LIFE_S", 7 * 86400, positive=True)
OPENTINKER_RESERVE_AFTER_S = env.seconds("OPENTINKER_RESERVE_AFTER_S", 300)
OPENTINKER_QUEUE_EXPLAIN_S = env.seconds("OPENTINKER_QUEUE_EXPLAIN_S", 5)
OPENTINKER_SCHEDULE_EVERY_S = env.seconds("OPENTINKER_SCHEDULE_EVERY_S", 5, finite=True, positive=True)
OPENTINKER_SUPERVISE_EVERY_S = env.seconds("OPENTINKER_SUPERVISE_EVERY_S", 5, finite=True, positive=True)
OPENTINKER_POOLS_REFRESH_EVERY_S = env.seconds(
    "OPENTINKER_POOLS_REFRESH_EVERY_S", 30, finite=True, positive=True
)

# Supervision (workers/supervisor.py): re-queues of a lost job before it fails; the silence that counts as
# lost (of the runner, of the runtime itself); how long a launch may stay unfinished.
OPENTINKER_JOB_MAX_RETRIES = env.int("OPENTINKER_JOB_MAX_RETRIES", 3, minimum=0)
OPENTINKER_HEARTBEAT_TIMEOUT_S = env.seconds("OPENTINKER_HEARTBEAT_TIMEOUT_S", 30)
OPENTINKER_RUNTIME_HEARTBEAT_TIMEOUT_S = env.seconds("OPENTINKER_RUNTIME_HEARTBEAT_TIMEOUT_S", 300)
OPENTINKER_LAUNCH_TIMEOUT_S = env.seconds("OPENTINKER_LAUNCH_TIMEOUT_S", 120)

# Pools and drivers (workers/drivers/): the embedded local pool (empty name: none; 0 slots: one per core);
# where attempts' work directories go; the runtime's command (a JSON list; unset: this Python's
# `-m gpu_runtime run`, on a Ray cluster its own `python`); which of the runner's variables the runtime
# inherits; how often the runner heartbeats; how long a stopped runtime has to checkpoint before SIGKILL;
# variables added to every Ray job (a JSON object).
OPENTINKER_LOCAL_POOL = env.str("OPENTINKER_LOCAL_POOL", "local" if EMBEDDED else "")
OPENTINKER_LOCAL_CPU_SLOTS = env.int("OPENTINKER_LOCAL_CPU_SLOTS", 0, minimum=0)
OPENTINKER_JOBS_DIR = env.str("OPENTINKER_JOBS_DIR", str(VAR_DIR / "jobs"))
OPENTINKER_RUNTIME_COMMAND = env.command("OPENTINKER_RUNTIME_COMMAND")
OPENTINKER_RUNTIME_PASS_ENV = env.list("OPENTINKER_RUNTIME_PASS_ENV", [])
OPENTINKER_RUNNER_HEARTBEAT_S = env.seconds("OPENTINKER_RUNNER_HEARTBEAT_S", 5, finite=True, positive=True)
OPENTINKER_STOP_GRACE_S = env.seconds("OPENTINKER_STOP_GRACE_S", 30, finite=True)
OPENTINKER_RAY_RUNTIME_COMMAND = env.command("OPENTINKER_RAY_RUNTIME_COMMAND")
OPENTINKER_RAY_ENV_VARS = env.mapping("OPENTINKER_RAY_ENV_VARS")

# Egress policy for remote environments (README "Environments"; portal/services/egress.py): allow-lists that
# admit private environment servers, by scope (JSON {"*"|"org:<slug>"|"pool:<name>": [host, address or
# CIDR, optional :port]}), validated here so a bad entry stops the start; the platform's own public addresses
# (refused like private ones); the resolver's dotted path (default the system's; tests inject a table).
OPENTINKER_EGRESS_ALLOW = parse_scoped_allow_lists(json.loads(env.str("OPENTINKER_EGRESS_ALLOW", "{}")))
OPENTINKER_EGRESS_PLATFORM = [str(n) for n in parse_networks(env.str("OPENTINKER_EGRESS_PLATFORM", ""))]
OPENTINKER_EGRESS_RESOLVER = env.str("OPENTINKER_EGRESS_RESOLVER", "")

# Defaults for a new organization's quota (platform staff change them per organization).
DEFAULT_QUOTA = {
    "max_gpus": env.int("DEFAULT_QUOTA_MAX_GPUS", 1, minimum=0),
    "borrowing_limit_gpus": env.int("DEFAULT_QUOTA_BORROWING_GPUS", 0, minimum=0),
    "gpu_hours_per_month": env.int("DEFAULT_QUOTA_GPU_HOURS", 100, minimum=0),
    "max_queued_jobs": env.int("DEFAULT_QUOTA_MAX_QUEUED", 20, minimum=0),
    "max_cpus_per_job": env.int("DEFAULT_QUOTA_MAX_CPUS", 8, minimum=0),
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Observability (portal/observability/, README "Observability"). `json`: one JSON object per line carrying the
# request, organization and job ids, an access line per request (opentinker.access), and uvicorn's and
# Celery's own lines through the same handler; `text` keeps the plain lines (the ids are on every record).
LOG_FORMAT = env.choice("LOG_FORMAT", "text", ("text", "json"))
_JSON_LOGS = LOG_FORMAT == "json"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"ids": {"()": "portal.observability.logs.ContextFilter"}},
    "formatters": {"json": {"()": "portal.observability.logs.JsonFormatter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["ids"],
            **({"formatter": "json"} if _JSON_LOGS else {}),
        }
    },
    "root": {"handlers": ["console"], "level": env.choice("LOG_LEVEL", "INFO", _LOG_LEVELS)},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "opentinker.access": {"level": "INFO" if _JSON_LOGS else "WARNING"},
        **(
            {
                "uvicorn": {"handlers": ["console"], "propagate": False},
                "uvicorn.error": {"handlers": [], "propagate": True},
                "uvicorn.access": {"level": "WARNING"},  # opentinker.access says it, with the request id
            }
            if _JSON_LOGS
            else {}
        ),
    },
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = not _JSON_LOGS
# /metrics (api/views/metrics.py): 404 unless one of these is set; then the bearer token or a direct peer in
# the allow-list (addresses or CIDRs) is let in. With several server processes, the directory they share
# (wiped before they start) for prometheus_client's multiprocess mode; it must be in the process environment.
METRICS_TOKEN = env.str("METRICS_TOKEN", "")
METRICS_ALLOW_FROM = parse_networks(env.str("METRICS_ALLOW_FROM", ""))
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", "")
if PROMETHEUS_MULTIPROC_DIR:
    # prometheus_client reads it from the environment when first imported (after the settings): a value from
    # var/services.env must reach it too, or the processes would count in memory while /metrics reads files.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", PROMETHEUS_MULTIPROC_DIR)
# Error reports to Sentry when set (needs `pip install sentry-sdk`; portal/observability/errors.py).
SENTRY_DSN = env.str("SENTRY_DSN", "")

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the cookie
# Lax: a link from another site still arrives signed in; a cross-site POST, image or frame does not.
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = env.int("SESSION_COOKIE_AGE", 14 * 24 * 3600, minimum=1)
# Reverse proxies in front of the server that append the client's address to X-Forwarded-For: the audit log
# and the sign-in limits believe that many entries from the right, and never more (0: REMOTE_ADDR only).
TRUSTED_PROXIES = env.int("TRUSTED_PROXIES", 0, minimum=0)
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Production: cookies only over HTTPS, HSTS, redirect to HTTPS. The embedded default serves plain HTTP on
# localhost and so sets none of them (DEBUG never turns them off in production).
SESSION_COOKIE_SECURE = not EMBEDDED
CSRF_COOKIE_SECURE = not EMBEDDED
# Trusted only because production runs behind a proxy that sets (overwrites) X-Forwarded-Proto itself:
# SECURE_PROXY_SSL_HEADER="" turns it off for a server that faces clients directly.
_proxy_ssl_header = env.str("SECURE_PROXY_SSL_HEADER", "" if EMBEDDED else "HTTP_X_FORWARDED_PROTO")
SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header, "https") if _proxy_ssl_header else None
if not EMBEDDED:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", True)
    # Probes talk plain HTTP to the pod: a redirect would read as success (README "Operations").
    SECURE_REDIRECT_EXEMPT = [r"^(livez|readyz|healthz|metrics)$"]
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", True)
    if len(SECRET_KEY) < 50 or SECRET_KEY.startswith("django-insecure"):
        raise ValueError("SECRET_KEY must be at least 50 random characters in production")
    if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
        raise ValueError("METRICS_TOKEN must be at least 32 random characters in production")
    if any(len(p) < 32 for p in TOKEN_PEPPERS.values()):
        raise ValueError(
            "TOKEN_PEPPER must be at least 32 random characters in production (each of TOKEN_PEPPERS)"
        )
